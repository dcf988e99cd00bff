"""Evaluation of a policy on every env of the experiment, against each env's optimal return; `return_scorer`, the
score the merge gate and the merge search compare policies by."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from colearn.config import EnvSpec, EvalConfig, RolloutConfig
from colearn.experience.rollout import EpisodeMeta, acting_mode, collect, env_info
from colearn.models.partner import Partner
from envs import text_env_model
from envs.text import TabularModel


@dataclass
class EnvScore:
    env: str  # env name
    policy: str  # greedy | sampled
    mean_return: float  # mean undiscounted episode return
    success: float  # fraction of episodes that reached the goal
    optimal: float | None  # optimal expected return (value iteration), None when unknown
    normalized: float  # normalized_return(mean_return, optimal, random): 1 optimal, 0 the floor
    episodes: int  # episodes played (0 when scored exactly)
    exact: bool = False  # scored by dynamic programming over the env's transition table: expected values, no noise
    random: float | None = None  # the uniformly random policy's expected return (exact), None when unknown

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def score_of(rows: list[dict[str, Any]], env: EnvSpec, policy: str) -> EnvScore:
    """Returns the score of the episodes in `rows` (step records of one env)."""
    finals = [r for r in rows if r["done"]]
    mean_return = sum(r["episode_return"] for r in finals) / max(len(finals), 1)
    success = sum(r["success"] for r in finals) / max(len(finals), 1)
    return env_score(env, policy, mean_return, success, len(finals))


def env_score(
    env: EnvSpec, policy: str, mean_return: float, success: float, episodes: int, exact: bool = False
) -> EnvScore:
    """Returns the score of a policy's mean return and success in the env, against the env's optimum."""
    info = env_info(env)
    optimal, random = info["optimal_return"], info["random_return"]
    normalized = normalized_return(mean_return, optimal, random)
    return EnvScore(env.name, policy, mean_return, success, optimal, normalized, episodes, exact, random)


def normalized_return(mean_return: float, optimal: float | None, random: float | None) -> float:
    """Returns `(mean_return - floor) / (optimal - floor)` with floor = min(random, 0): 1 for an optimal policy,
    0 at the floor, below 0 under it, for rewards of any sign.

    Where the random policy loses reward (CliffWalking: optimal -13, random -1083 in 100 steps; Taxi: 7.93 and
    -771) the floor is that policy's exact return, so a random policy scores 0. Where its return is positive
    the floor is 0, what a policy collecting nothing gets, and the score is mean_return / optimal: a random
    policy scores 0.014 on FrozenLake 4x4, and on a map without holes, where a random walk reaches the goal
    within the time limit (0.99995 on "SFG"), a policy that never gets there still scores 0, not -20000.
    `random` None (no transition table: Addition, Blackjack) counts as 0. Without a known optimum, or where
    no policy can beat the floor (optimal <= floor), returns mean_return - floor.
    """
    floor = min(random or 0.0, 0.0)
    if optimal is None or optimal <= floor:
        return mean_return - floor
    return (mean_return - floor) / (optimal - floor)


def evaluate(
    partner: Partner, suite: list[EnvSpec], cfg: EvalConfig, rollout: RolloutConfig, venvs: dict | None = None
) -> list[EnvScore]:
    """Returns one score per env and per evaluated policy (greedy and/or sampled): exact expected values where
    eval.exact and the env has a transition table (the policy's `policy_probs` in every state), else the mean
    over episodes on fixed seeds (the same for every partner and generation, so scores are comparable)."""
    policies = [p for p, on in (("greedy", cfg.greedy), ("sampled", cfg.sampled)) if on]
    seeds = [cfg.seed + i for i in range(cfg.episodes)]
    scores = []
    for env in suite:
        model = tabular_model(env, rollout.mode) if cfg.exact else None
        for policy in policies:
            if model is not None:
                scores.append(exact_score(partner, env, model, policy, rollout.temperature))
                continue
            generator = torch.Generator().manual_seed(cfg.seed)
            rows = collect(
                partner,
                env,
                seeds,
                rollout,
                generator,
                EpisodeMeta(partner=partner.name),
                greedy=policy == "greedy",
                venvs=venvs,
            )
            scores.append(score_of(rows, env, policy))
    return scores


def tabular_model(env: EnvSpec, mode: str) -> TabularModel | None:
    """Returns the env's tabular model when a policy acting in it can be scored exactly (constrained acting
    over a transition table), else None."""
    if acting_mode(env, mode) is None:
        return None
    return text_env_model(env.id, **env.kwargs)


def random_transition_envs(suite: list[EnvSpec], mode: str) -> set[str]:
    """Returns the names of the suite's envs whose transition table leaves outcomes to chance (envs without a table
    count as deterministic)."""
    return {env.name for env in suite if (model := tabular_model(env, mode)) is not None and model.random_transitions}


def exact_score(partner: Partner, env: EnvSpec, model: TabularModel, policy: str, temperature: float) -> EnvScore:
    """Returns the partner's exact score in the env: its action distribution in every state (the argmax for
    the greedy policy) run through the transition table for the time limit."""
    legal = env_info(env)["action_names"]
    probs = partner.policy_probs(model.observations, legal, temperature, policy == "greedy").double().cpu().numpy()
    probs /= probs.sum(1, keepdims=True)  # (states, K)
    mean_return, success = model.score(probs)
    if hasattr(partner, "count_decisions") and policy == "greedy":  # an integration mode: who decided, per visit
        partner.count_decisions(model.observations, legal, temperature, model.visits(probs))
    return env_score(env, policy, mean_return, success, 0, exact=True)


def normalized_by_env(scores: list[EnvScore]) -> dict[str, float]:
    """Returns {env: normalized return} of the greedy policy, or of the sampled one when greedy was not evaluated."""
    policy = "greedy" if any(s.policy == "greedy" for s in scores) else "sampled"
    return {s.env: s.normalized for s in scores if s.policy == policy}


def headline(scores: list[EnvScore]) -> float:
    """Returns the mean normalized return over envs, using the greedy policy when it was evaluated."""
    return mean_over_envs(normalized_by_env(scores))


def mean_over_envs(by_env: dict[str, float]) -> float:
    """Returns the mean of {env: value} over its envs (0 for none)."""
    return sum(by_env.values()) / max(len(by_env), 1)


def return_scorer(
    suite: Sequence[EnvSpec], cfg: EvalConfig, rollout: RolloutConfig, seed: int, episodes: int | None = None
) -> Callable[[Partner], float]:
    """Returns policy -> mean normalized greedy return over the suite on episodes seeded seed, seed+1, ...

    Give the search and the held-out validation different seeds (e.g. eval.seed + 20000 and
    eval.seed + 30000) so neither reuses the episodes the loop reports.
    """
    by_env = env_scorer(suite, cfg, rollout, seed, episodes)
    return lambda partner: mean_over_envs(by_env(partner))


def env_scorer(
    suite: Sequence[EnvSpec], cfg: EvalConfig, rollout: RolloutConfig, seed: int, episodes: int | None = None
) -> Callable[[Partner], dict[str, float]]:
    """Returns policy -> {env: normalized greedy return} on episodes seeded seed, seed+1, ... (`return_scorer` is the
    mean of these)."""
    here = dataclasses.replace(cfg, seed=seed, episodes=episodes or cfg.episodes, greedy=True, sampled=False)
    return lambda partner: normalized_by_env(evaluate(partner, list(suite), here, rollout))
