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
from colearn.partner import Partner


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
        raise ColearnError(f"env id {spec.id!r} is not registered: {e}; known colearn ids: {colearn_envs.ENV_IDS}")


def acting_mode(spec: EnvSpec, mode: str) -> list[str] | None:
    """Returns the legal action names for constrained acting, or None to generate free text."""
    names = env_info(spec)["action_names"]
    if mode == "generate":
        return None
    if mode == "constrained" and not names:
        raise ColearnError(f"rollout.mode=constrained but env {spec.id!r} has no action names; use mode=generate")
    return list(names) if names else None


def group_seeds(rng: np.random.Generator, episodes: int, group_size: int) -> list[int]:
    """Returns one reset seed per episode; consecutive groups of `group_size` share a seed."""
    groups = rng.integers(0, 2**31 - 1, size=episodes // group_size)
    return [int(s) for s in np.repeat(groups, group_size)]


def make_vector_env(spec: EnvSpec, n: int, vectorization: str) -> gym.vector.VectorEnv:
    """Returns a vector env of `n` copies whose sub-envs colearn resets itself (autoreset disabled)."""
    kwargs: dict[str, Any] = {"autoreset_mode": AutoresetMode.DISABLED}
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
) -> list[dict[str, Any]]:
    """Returns the step records of one episode per seed, played by `partner` in env `spec`.

    Sub-environments that finish an episode are reset at once with the next queued seed, so the
    batch stays full; each step makes one batched forward pass over every running episode.
    """
    legal = acting_mode(spec, cfg.mode)
    n = min(cfg.num_envs, len(seeds))
    venv = make_vector_env(spec, n, cfg.vectorization)
    queue = deque(enumerate(seeds))
    slots: list[tuple[int, int] | None] = [queue.popleft() for _ in range(n)]
    steps: list[list[dict[str, Any]]] = [[] for _ in range(n)]
    episodes: list[list[dict[str, Any]]] = []
    obs, _ = venv.reset(seed=[s for _, s in slots])
    while any(slots):
        live = [i for i in range(n) if slots[i] is not None]
        acts = partner.act([obs[i] for i in live], legal, greedy, generator, cfg.temperature, cfg.max_new_tokens)
        actions = [legal[0] if legal else ""] * n  # finished slots step a throwaway episode
        for j, i in enumerate(live):
            actions[i] = acts.texts[j]
        next_obs, rewards, terms, truncs, infos = venv.step(tuple(actions))
        for j, i in enumerate(live):
            steps[i].append(step_row(obs[i], acts, j, partner, float(rewards[i]), infos, i, legal))
            if terms[i] or truncs[i]:
                episodes.append(finish_episode(steps[i], slots[i], meta, spec, bool(terms[i]), cfg.gamma))
                steps[i] = []
                slots[i] = queue.popleft() if queue else None
        done_mask = np.logical_or(terms, truncs)
        if done_mask.any():
            reset_seeds = [slots[i][1] if (done_mask[i] and slots[i]) else None for i in range(n)]
            next_obs, _ = venv.reset(seed=reset_seeds, options={"reset_mask": done_mask})
        obs = next_obs
    venv.close()
    episodes.sort(key=lambda ep: ep[0]["episode_id"])
    return [row for ep in episodes for row in ep]


def step_row(
    obs: str, acts: Any, j: int, partner: Partner, reward: float, infos: dict, i: int, legal: list[str] | None
) -> dict[str, Any]:
    """Returns the per-step fields known right after the env step."""
    return {
        "legal_actions": legal or [],
        "observation": obs,
        "action": acts.texts[j],
        "prompt_ids": partner.prompt_ids([obs])[0],
        "action_ids": acts.token_ids[j],
        "logprob": float(acts.logprobs[j]),
        "reward": reward,
        "invalid": bool(infos.get("invalid_action", np.zeros(i + 1, dtype=bool))[i]),
        "step_success": bool(infos.get("success", np.zeros(i + 1, dtype=bool))[i]),
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
            run_id=meta.run_id, generation=meta.generation, round=meta.round, partner=meta.partner,
            env_id=spec.id, env=spec.name, episode_id=episode_id, seed=seed, step=t,
            return_to_go=rtg[t], done=t == len(rows) - 1, terminated=terminated and t == len(rows) - 1,
            success=success, episode_return=float(sum(rewards)),
        )
    return rows
