"""Rollouts: a partner plays N episodes in a vector env, one batched forward pass per step."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import AutoresetMode

import envs as colearn_envs
from colearn.config import EnvSpec, RolloutConfig
from colearn.errors import ColearnError
from colearn.models.partner import Partner


@dataclass
class EpisodeMeta:
    """Where an episode's steps belong in the experience store."""

    run_id: str = ""
    generation: int = 0
    round: int = 0
    partner: str = ""


def env_info(spec: EnvSpec) -> dict[str, Any]:
    """Returns {"action_names", "optimal_return", "max_episode_steps"} of an env, or a ColearnError."""
    try:
        return colearn_envs.text_env_info(spec.id, **spec.kwargs)
    except gym.error.Error as e:
        raise ColearnError(
            f"env id {spec.id!r} is not registered: {e}; known colearn ids: {colearn_envs.ENV_IDS}"
        ) from e


def acting_mode(spec: EnvSpec, mode: str) -> list[str] | None:
    """Returns the legal action names for constrained acting, or None to generate free text."""
    names = env_info(spec)["action_names"]
    if mode == "generate":
        return None
    if mode == "constrained" and not names:
        raise ColearnError(f"rollout.mode=constrained but env {spec.id!r} has no action names; use mode=generate")
    return list(names) if names else None


def answer_format(spec: EnvSpec, legal: list[str] | None, max_new_tokens: int) -> tuple[str | None, int]:
    """Returns (the characters a generated answer may use, the most tokens it may take): the free-form env's
    answer alphabet and length (an end-of-sequence token included) when it declares them, else (None,
    `max_new_tokens`)."""
    info = env_info(spec)
    if legal or not info["answer_charset"]:
        return None, max_new_tokens
    return info["answer_charset"], min(max_new_tokens, info["answer_length"] + 1)


def group_seeds(rng: np.random.Generator, episodes: int, group_size: int) -> list[int]:
    """Returns one reset seed per episode; consecutive groups of `group_size` share a seed."""
    groups = rng.integers(0, 2**31 - 1, size=episodes // group_size)
    return [int(s) for s in np.repeat(groups, group_size)]


def make_vector_env(spec: EnvSpec, n: int, vectorization: str) -> gym.vector.VectorEnv:
    """Returns a vector env of `n` copies whose sub-envs colearn resets itself (autoreset disabled)."""
    # copy=False: observations are immutable strings, so the per-step deepcopy of the batch buys nothing
    kwargs: dict[str, Any] = {"autoreset_mode": AutoresetMode.DISABLED, "copy": False}
    if vectorization == "async":
        kwargs["shared_memory"] = False  # text observations cannot live in shared memory
    return gym.make_vec(spec.id, num_envs=n, vectorization_mode=vectorization, vector_kwargs=kwargs, **spec.kwargs)


def collect(
    partner: Partner,
    spec: EnvSpec,
    seeds: list[int],
    cfg: RolloutConfig,
    generator: torch.Generator,
    meta: EpisodeMeta,
    greedy: bool = False,
    venvs: dict[tuple[str, int], gym.vector.VectorEnv] | None = None,
) -> list[dict[str, Any]]:
    """Returns the step records of one episode per seed, played by `partner` in env `spec`.

    Sub-environments that finish an episode are reset at once with the next queued seed, so the
    batch stays full; each step makes one batched forward pass over every running episode. With `venvs`
    (a run's cache, keyed by env name and size) vector envs are made once and reused across calls:
    every episode is reset with its own seed, so reuse changes no number, only the set-up time.
    """
    legal = acting_mode(spec, cfg.mode)
    charset, max_new_tokens = answer_format(spec, legal, cfg.max_new_tokens)
    n = min(cfg.num_envs, len(seeds))
    if venvs is not None and (spec.name, n) not in venvs:
        venvs[(spec.name, n)] = make_vector_env(spec, n, cfg.vectorization)
    venv = venvs[(spec.name, n)] if venvs is not None else make_vector_env(spec, n, cfg.vectorization)
    queue = deque(enumerate(seeds))
    slots: dict[int, tuple[int, int]] = {i: queue.popleft() for i in range(n)}  # running slot -> (episode, seed)
    steps: list[list[dict[str, Any]]] = [[] for _ in range(n)]
    episodes: list[list[dict[str, Any]]] = []
    obs = reset_slots(venv, {i: seed for i, (_, seed) in slots.items()})
    cache: dict = {}  # the weights are fixed while the episodes play: each distinct state is scored once
    while slots:
        live = sorted(slots)
        observations = [obs[i] for i in live]
        acts = partner.act(observations, legal, greedy, generator, cfg.temperature, max_new_tokens, cache, charset)
        prompts = partner.prompt_ids(observations)
        outcomes = step_slots(venv, dict(zip(live, acts.texts)), legal[0] if legal else "")
        reset_seeds: dict[int, int] = {}
        for j, i in enumerate(live):
            obs[i], reward, terminated, truncated, info = outcomes[i]
            steps[i].append(
                {
                    "legal_actions": legal or [],
                    "action_charset": charset or "",
                    "observation": observations[j],
                    "action": acts.texts[j],
                    "prompt_ids": prompts[j],
                    "action_ids": acts.token_ids[j],
                    "logprob": float(acts.logprobs[j]),
                    "reward": float(reward),
                    "invalid": bool(info.get("invalid_action", False)),
                    "step_success": bool(info.get("success", False)),
                }
            )
            if terminated or truncated:
                episodes.append(finish_episode(steps[i], slots.pop(i), meta, spec, bool(terminated), cfg.gamma))
                steps[i] = []
                if queue:
                    slots[i] = queue.popleft()
                    reset_seeds[i] = slots[i][1]
        if reset_seeds:
            obs.update(reset_slots(venv, reset_seeds))
    if venvs is None:
        venv.close()
    episodes.sort(key=lambda ep: int(ep[0]["episode_id"].rsplit("/", 1)[1]))  # the order of `seeds`
    return [row for ep in episodes for row in ep]


# A sync vector env's sub-envs are stepped and reset directly, and only those with a running episode:
# no throwaway steps of finished slots while the last episodes play out, no batching of the infos.
# Other vector envs (async) go through the vector API, which steps every sub-env.


def reset_slots(venv: gym.vector.VectorEnv, seeds: dict[int, int]) -> dict[int, str]:
    """Resets the sub-envs `seeds` names (slot -> seed); returns slot -> first observation."""
    if isinstance(venv, gym.vector.SyncVectorEnv):
        return {i: venv.envs[i].reset(seed=seed)[0] for i, seed in seeds.items()}
    mask = np.array([i in seeds for i in range(venv.num_envs)])
    obs, _ = venv.reset(seed=[seeds.get(i) for i in range(venv.num_envs)], options={"reset_mask": mask})
    return {i: obs[i] for i in seeds}


def step_slots(venv: gym.vector.VectorEnv, actions: dict[int, str], filler: str) -> dict[int, tuple]:
    """Steps the sub-envs `actions` names (slot -> action); returns slot -> (obs, reward, terminated,
    truncated, info). Through the vector API the other sub-envs step a throwaway `filler` action and
    are reset when that throwaway episode ends."""
    if isinstance(venv, gym.vector.SyncVectorEnv):
        return {i: venv.envs[i].step(action) for i, action in actions.items()}
    obs, rewards, terms, truncs, infos = venv.step(tuple(actions.get(i, filler) for i in range(venv.num_envs)))
    done = np.logical_or(terms, truncs)
    idle = np.array([i not in actions for i in range(venv.num_envs)])
    if (done & idle).any():
        venv.reset(options={"reset_mask": done & idle})
    return {
        i: (obs[i], rewards[i], terms[i], truncs[i], {k: v[i] for k, v in infos.items() if not k.startswith("_")})
        for i in actions
    }


def finish_episode(
    rows: list[dict[str, Any]], slot: tuple[int, int], meta: EpisodeMeta, spec: EnvSpec, terminated: bool, gamma: float
) -> list[dict[str, Any]]:
    """Returns the episode's rows completed with return-to-go, done, success and identifiers."""
    episode_index, seed = slot
    rewards = [r["reward"] for r in rows]
    rtg, g = [0.0] * len(rows), 0.0
    for t in reversed(range(len(rows))):
        g = rewards[t] + gamma * g
        rtg[t] = g
    success = any(r.pop("step_success") for r in rows)
    episode_id = f"{meta.partner}/g{meta.generation}/r{meta.round}/{spec.name}/{episode_index}"
    for t, r in enumerate(rows):
        r.update(
            run_id=meta.run_id,
            generation=meta.generation,
            round=meta.round,
            partner=meta.partner,
            env_id=spec.id,
            env=spec.name,
            episode_id=episode_id,
            seed=seed,
            step=t,
            return_to_go=rtg[t],
            done=t == len(rows) - 1,
            terminated=terminated and t == len(rows) - 1,
            success=success,
            episode_return=float(sum(rewards)),
        )
    return rows
