"""Register the ``colearn/...`` text environments with gymnasium.

Each id's entry point is a factory below. Inner envs are built without their
own TimeLimit; the time limit sits outside ``TextEnv`` (from ``max_episode_steps``
in the registration) so invalid actions count toward truncation.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import gymnasium as gym
from gymnasium import spaces
from gymnasium.wrappers import TimeLimit

from envs.addition import AdditionEnv
from envs.errors import EnvConfigError
from envs.render import render_frozen_lake_map
from envs.text import TabularModel, TextEnv

FROZEN_LAKE_ACTIONS = ["left", "down", "right", "up"]
TAXI_ACTIONS = ["south", "north", "east", "west", "pickup", "dropoff"]
TAXI_SUCCESS_REWARD = 20.0
DEFAULT_MAX_EPISODE_STEPS = 100


def make_inner(env_id: str, **env_kwargs: Any) -> gym.Env:
    """Return ``gymnasium.make(env_id)`` without a TimeLimit or env checker.

    Raises EnvConfigError if ``env_id`` cannot be made (unknown, or a deprecated version).
    """
    inner_spec = _registered_spec(env_id)
    # max_episode_steps=-1 is gymnasium's switch for "no TimeLimit" (None keeps the spec's)
    return gym.make(inner_spec.id, max_episode_steps=-1, disable_env_checker=True, **env_kwargs)


def _registered_spec(env_id: str) -> gym.envs.registration.EnvSpec:
    """Return the spec of ``env_id``; raise EnvConfigError with gymnasium's reason if it cannot be made."""
    try:
        return gym.spec(env_id)
    except gym.error.Error as error:
        # gymnasium's own message names the fix (e.g. "v3 ... is deprecated. Please use `Taxi-v4` instead.")
        raise EnvConfigError(
            f"env_id={env_id!r}: {error} (gymnasium.pprint_registry() lists the registered ids)"
        ) from error


def make_frozen_lake(
    map_name: str = "4x4",
    is_slippery: bool = False,
    invalid_penalty: float = -1.0,
    horizon: int | None = None,
    position_line: bool = True,
    render_mode: str | None = None,
    **env_kwargs: Any,
) -> TextEnv:
    """Return a text FrozenLake (actions ``left down right up``); ``position_line=False`` shows only the map."""
    inner = make_inner("FrozenLake-v1", map_name=map_name, is_slippery=is_slippery, **env_kwargs)
    renderer = None if position_line else render_frozen_lake_map
    return TextEnv(
        inner,
        FROZEN_LAKE_ACTIONS,
        invalid_penalty=invalid_penalty,
        horizon=horizon,
        renderer=renderer,
        render_mode=render_mode,
    )


def make_taxi(
    invalid_penalty: float = -1.0, horizon: int | None = None, render_mode: str | None = None, **env_kwargs: Any
) -> TextEnv:
    """Return a text Taxi-v4; success means a correct dropoff (reward 20)."""
    inner = make_inner("Taxi-v4", **env_kwargs)
    return TextEnv(
        inner,
        TAXI_ACTIONS,
        invalid_penalty=invalid_penalty,
        success_reward=TAXI_SUCCESS_REWARD,
        horizon=horizon,
        render_mode=render_mode,
    )


def make_addition(digits: int = 2, invalid_penalty: float = 0.0) -> AdditionEnv:
    """Return an ``AdditionEnv``."""
    return AdditionEnv(digits=digits, invalid_penalty=invalid_penalty)


def make_text_env(
    env_id: str,
    action_names: Sequence[str],
    env_kwargs: dict[str, Any] | None = None,
    invalid_penalty: float = -1.0,
    success_reward: float | None = None,
    max_episode_steps: int | None = None,
    render_mode: str | None = None,
) -> gym.Env:
    """Return ``TimeLimit(TextEnv(gymnasium.make(env_id)))`` for any discrete-action env.

    The limit defaults to ``env_id``'s registered ``max_episode_steps`` (100 if
    it has none). Note ``gymnasium.make`` consumes its own ``max_episode_steps``
    argument and adds a second TimeLimit on top, so through ``gymnasium.make``
    it can only shorten this default.
    """
    inner_spec = _registered_spec(env_id)
    if max_episode_steps is None:
        max_episode_steps = inner_spec.max_episode_steps or DEFAULT_MAX_EPISODE_STEPS
    inner = make_inner(env_id, **(env_kwargs or {}))
    text_env = TextEnv(
        inner,
        action_names,
        invalid_penalty=invalid_penalty,
        success_reward=success_reward,
        horizon=max_episode_steps,
        render_mode=render_mode,
    )
    return TimeLimit(text_env, max_episode_steps)


def _entry(factory_name: str) -> str:
    """Return the gymnasium entry-point string of a factory in this module."""
    return f"{__name__}:{factory_name}"


# id -> (factory, max_episode_steps, kwargs); TextEnv's planning horizon mirrors the limit
_REGISTRATIONS: dict[str, tuple[str, int | None, dict[str, Any]]] = {
    "colearn/FrozenLake-v0": ("make_frozen_lake", 100, {"map_name": "4x4", "is_slippery": False, "horizon": 100}),
    "colearn/FrozenLakeSlippery-v0": (
        "make_frozen_lake",
        100,
        {"map_name": "4x4", "is_slippery": True, "horizon": 100},
    ),
    "colearn/FrozenLake8x8-v0": ("make_frozen_lake", 200, {"map_name": "8x8", "is_slippery": False, "horizon": 200}),
    "colearn/FrozenLake8x8Slippery-v0": (
        "make_frozen_lake",
        200,
        {"map_name": "8x8", "is_slippery": True, "horizon": 200},
    ),
    "colearn/Taxi-v0": ("make_taxi", 200, {"horizon": 200}),
    # one answer ends the episode (terminated), so no TimeLimit: it would also report truncation on that step
    "colearn/Addition-v0": ("make_addition", None, {"digits": 2}),
    # the limit depends on env_id, so make_text_env applies it itself
    "colearn/Text-v0": ("make_text_env", None, {}),
}

ENV_IDS: list[str] = list(_REGISTRATIONS)


def register_all() -> None:
    """Register every colearn id with gymnasium (idempotent)."""
    for env_id, (factory, max_steps, kwargs) in _REGISTRATIONS.items():
        if env_id in gym.registry:
            continue
        gym.register(
            id=env_id,
            entry_point=_entry(factory),
            max_episode_steps=max_steps,
            kwargs=kwargs,
            # Text spaces make the passive checker noisy; TextEnv is tested here instead
            disable_env_checker=True,
        )


_INFO_CACHE: dict[tuple[str, str], dict[str, Any]] = {}


def text_env_info(env_id: str, /, **kwargs: Any) -> dict[str, Any]:
    """Return ``{"action_names", "optimal_return", "random_return", "max_episode_steps", "answer_charset",
    "answer_length"}``.

    The env is ``gymnasium.make(env_id, **kwargs)``.

    ``action_names`` is None for free-form envs (Addition); ``optimal_return``
    is None when the env has no transition table; ``random_return`` is the expected
    return of the uniformly random policy over the action names (exact, by dynamic
    programming over the table), 0.0 for Addition and None for other envs without a
    table; ``max_episode_steps`` is the
    effective (smallest) time limit, which is also the planning horizon (None
    without one: Addition ends every episode after one answer). A free-form env's answers are held to
    ``answer_charset`` (its action space's characters) and ``answer_length`` characters; both are None
    for envs with action names. The
    env is made once per (id, kwargs) and the result cached. ``env_id`` is
    positional-only so ``colearn/Text-v0``'s own ``env_id`` kwarg can pass through.
    """
    key = (env_id, json.dumps(kwargs, sort_keys=True, default=repr))
    if key not in _INFO_CACHE:
        _INFO_CACHE[key] = _compute_info(env_id, kwargs)
    # deep copy so callers cannot mutate the cached action_names list
    return copy.deepcopy(_INFO_CACHE[key])


_MODEL_CACHE: dict[tuple[str, str], TabularModel | None] = {}


def text_env_model(env_id: str, /, **kwargs: Any) -> TabularModel | None:
    """Return the tabular model of ``gymnasium.make(env_id, **kwargs)`` (states as text, transitions,
    start distribution, effective time limit), or None when the env has no transition table. Cached."""
    key = (env_id, json.dumps(kwargs, sort_keys=True, default=repr))
    if key not in _MODEL_CACHE:
        env = gym.make(env_id, **kwargs)
        try:
            model = env.get_wrapper_attr("tabular_model")()
        except AttributeError:
            model = None
        limit = effective_time_limit(env)
        env.close()
        _MODEL_CACHE[key] = dataclasses.replace(model, horizon=limit) if model and limit else model
    return _MODEL_CACHE[key]


def _compute_info(env_id: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Make the env once and read the fields of ``text_env_info``."""
    env = gym.make(env_id, **kwargs)
    try:
        limit = effective_time_limit(env)
        names = env.get_wrapper_attr("action_names")
        space = env.action_space
        free_text = names is None and isinstance(space, spaces.Text)
        return {
            "action_names": names,
            "optimal_return": env.get_wrapper_attr("optimal_return")(horizon=limit),
            "random_return": env.get_wrapper_attr("random_return")(horizon=limit),
            "max_episode_steps": limit,
            "answer_charset": "".join(sorted(space.character_set)) if free_text else None,
            "answer_length": space.max_length if free_text else None,
        }
    finally:
        env.close()


def effective_time_limit(env: gym.Env) -> int | None:
    """Return the smallest TimeLimit in ``env``'s wrapper chain, or None if there is none."""
    limits = []
    while isinstance(env, gym.Wrapper):
        if isinstance(env, TimeLimit):
            limits.append(env._max_episode_steps)
        env = env.env
    return min(limits) if limits else None
