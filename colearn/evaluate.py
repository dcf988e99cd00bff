"""Evaluation of a policy on every env of the experiment, against each env's optimal return."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from colearn.config import EnvSpec, EvalConfig, RolloutConfig
from colearn.partner import Partner
from colearn.rollout import EpisodeMeta, collect, env_info


@dataclass
class EnvScore:
    env: str  # env name
    policy: str  # greedy | sampled
    mean_return: float  # mean undiscounted episode return
    success: float  # fraction of episodes that reached the goal
    optimal: float | None  # optimal expected return (value iteration), None when unknown
    normalized: float  # mean_return / optimal (mean_return when the optimum is unknown or not positive)
    episodes: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def score_of(rows: list[dict[str, Any]], env: EnvSpec, policy: str) -> EnvScore:
    """Returns the score of the episodes in `rows` (step records of one env)."""
    finals = [r for r in rows if r["done"]]
    mean_return = sum(r["episode_return"] for r in finals) / max(len(finals), 1)
    success = sum(r["success"] for r in finals) / max(len(finals), 1)
    optimal = env_info(env)["optimal_return"]
    normalized = mean_return / optimal if optimal and optimal > 0 else mean_return
    return EnvScore(env.name, policy, mean_return, success, optimal, normalized, len(finals))


def evaluate(
    partner: Partner, suite: list[EnvSpec], cfg: EvalConfig, rollout: RolloutConfig, venvs: dict | None = None
) -> list[EnvScore]:
    """Returns one score per env and per evaluated policy (greedy and/or sampled), on fixed seeds
    (the same for every partner and generation, so scores are comparable)."""
    policies = [p for p, on in (("greedy", cfg.greedy), ("sampled", cfg.sampled)) if on]
    seeds = [cfg.seed + i for i in range(cfg.episodes)]
    scores = []
    for env in suite:
        for policy in policies:
            generator = torch.Generator().manual_seed(cfg.seed)
            rows = collect(partner, env, seeds, rollout, generator, EpisodeMeta(partner=partner.name),
                           greedy=policy == "greedy", venvs=venvs)
            scores.append(score_of(rows, env, policy))
    return scores


def normalized_by_env(scores: list[EnvScore]) -> dict[str, float]:
    """Returns {env: normalized return} of the greedy policy, or of the sampled one when greedy was not evaluated."""
    policy = "greedy" if any(s.policy == "greedy" for s in scores) else "sampled"
    return {s.env: s.normalized for s in scores if s.policy == policy}


def headline(scores: list[EnvScore]) -> float:
    """Returns the mean normalized return over envs, using the greedy policy when it was evaluated."""
    chosen = list(normalized_by_env(scores).values())
    return sum(chosen) / max(len(chosen), 1)
