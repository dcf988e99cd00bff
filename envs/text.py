"""``TextEnv``: a wrapper that gives a discrete gymnasium env text observations and actions."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, SupportsFloat

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from envs.errors import EnvConfigError
from envs.planning import dense_model, expected_visits, policy_values
from envs.planning import optimal_return as plan_optimal_return
from envs.planning import random_return as plan_random_return
from envs.render import TEXT_CHARSET, Renderer, renderer_for

OBS_MAX_LENGTH = 4096
ACTION_MAX_LENGTH = 64


class TextEnv(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """Text observations (rendered state) and text actions (one of ``action_names``).

    An action that does not parse never steps the inner env and never raises:
    the observation repeats, the reward is ``invalid_penalty`` and
    ``info["invalid_action"]`` is True. Apply the time limit *outside* this
    wrapper so invalid actions still count toward truncation.

    ``info["success"]`` marks a terminating step that reached the goal: the inner env's own
    ``info["success"]`` when it sets one, else a reward of at least ``success_reward`` when given,
    else the goal reward of the env's transition table (``goal_reward``: CliffWalking's goal step
    earns -1 and is a success), else a positive reward.

    The constructor's arguments are recorded (``RecordConstructorArgs``), so
    ``gymnasium.make(env.spec)`` rebuilds the env and gymnasium's checker accepts
    it. ``render_mode="ansi"`` makes ``render()`` return the text observation.
    """

    metadata: dict[str, Any] = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(
        self,
        env: gym.Env,
        action_names: Sequence[str],
        invalid_penalty: float = -1.0,
        renderer: Renderer | None = None,
        success_reward: float | None = None,
        *,
        horizon: int | None = None,
        render_mode: str | None = None,
    ) -> None:
        """Wrap ``env``; ``horizon`` is the outer time limit, used by ``optimal_return``."""
        # render_mode is left out: gymnasium passes it to the entry point (spec.kwargs), and check_env remakes
        # the env with each render mode, which must not change the recorded wrapper
        gym.utils.RecordConstructorArgs.__init__(
            self,
            action_names=action_names,
            invalid_penalty=invalid_penalty,
            renderer=renderer,
            success_reward=success_reward,
            horizon=horizon,
        )
        super().__init__(env)
        # env.unwrapped.spec, not env.spec: a wrapper caches its spec on first read, and gymnasium.make
        # stamps the colearn id on the unwrapped env only after this constructor returns
        spec = env.unwrapped.spec
        self._env_name = spec.id if spec is not None else type(env.unwrapped).__name__
        if render_mode not in (None, *self.metadata["render_modes"]):
            raise EnvConfigError(
                f"render_mode={render_mode!r} is not supported by text envs; use 'ansi' (the text observation) or None"
            )
        self._render_mode = render_mode
        self._check_spaces(env)
        self.action_names: list[str] = _checked_names(action_names, env.action_space.n, self._env_name)
        self._lookup = {name.lower(): i for i, name in enumerate(self.action_names)}
        self.invalid_penalty = float(invalid_penalty)
        self.success_reward = success_reward
        self.renderer: Renderer = renderer if renderer is not None else renderer_for(env)
        self.horizon = horizon
        self.observation_space = spaces.Text(max_length=OBS_MAX_LENGTH, charset=TEXT_CHARSET)
        self.action_space = spaces.Text(max_length=ACTION_MAX_LENGTH, min_length=0, charset=TEXT_CHARSET)
        self._last_obs: Any = None
        self._last_text: str | None = None
        self._optimal_cache: dict[int | None, float | None] = {}
        self._random_cache: dict[int | None, float | None] = {}
        self._goal_reward = _goal_reward(self._table())

    def _check_spaces(self, env: gym.Env) -> None:
        """Raise EnvConfigError unless actions are Discrete and obs (Tuple-of-)Discrete."""
        if not isinstance(env.action_space, spaces.Discrete):
            raise EnvConfigError(
                f"{self._env_name} has action space {env.action_space}; TextEnv needs a "
                "Discrete action space, pick an env with discrete actions"
            )
        obs_space = env.observation_space
        tuple_of_discrete = isinstance(obs_space, spaces.Tuple) and all(
            isinstance(sub, spaces.Discrete) for sub in obs_space.spaces
        )
        if not (isinstance(obs_space, spaces.Discrete) or tuple_of_discrete):
            raise EnvConfigError(
                f"{self._env_name} has observation space {obs_space}; TextEnv needs a "
                "Discrete or Tuple-of-Discrete observation space"
            )

    def parse_action(self, action: str | int | np.integer) -> int | None:
        """Return the action index (0-based, as in ``action_names``) or None if it does not parse.

        Ints must be in range. Strings are stripped and lowercased, then matched
        exactly against a name, else by their first whitespace-separated word.
        """
        if isinstance(action, int | np.integer) and not isinstance(action, bool):
            index = int(action)
            return index if 0 <= index < len(self.action_names) else None
        if not isinstance(action, str):
            return None
        text = action.strip().lower()
        if text in self._lookup:
            return self._lookup[text]
        words = text.split()
        return self._lookup.get(words[0]) if words else None

    @property
    def render_mode(self) -> str | None:
        """Return ``"ansi"`` or None (set at construction)."""
        return self._render_mode

    def render(self) -> str | None:
        """Return the current text observation in ``"ansi"`` mode (None before the first reset), else None."""
        return self._last_text if self._render_mode == "ansi" else None

    def render_text(self, obs: Any) -> str:
        """Return the text rendering of a raw inner observation."""
        return self.renderer(self.env, obs)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
        """Reset the inner env; returns ``(text_obs, info)``."""
        obs, info = self.env.reset(seed=seed, options=options)
        self._remember(obs)
        return self._last_text, {**info, "invalid_action": False, "success": False}

    def step(self, action: str | int | np.integer) -> tuple[str, float, bool, bool, dict[str, Any]]:
        """Step with a text (or index) action.

        Returns ``(text_obs, reward, terminated, truncated, info)``.

        ``info["success"]`` is True only on a terminating step that reached the goal (see the class).
        """
        index = self.parse_action(action)
        if index is None:
            # The inner env is untouched so the agent sees the same state again.
            return (
                self._last_text,
                self.invalid_penalty,
                False,
                False,
                {
                    "invalid_action": True,
                    "success": False,
                },
            )
        inner_action = int(self.env.action_space.start) + index
        obs, reward, terminated, truncated, info = self.env.step(inner_action)
        self._remember(obs)
        success = bool(info["success"]) if "success" in info else self._is_success(reward, terminated)
        info = {**info, "invalid_action": False, "success": success}
        return self._last_text, float(reward), bool(terminated), bool(truncated), info

    def _remember(self, obs: Any) -> None:
        """Store the raw and rendered observation so invalid actions can repeat it."""
        self._last_obs = obs
        self._last_text = self.render_text(obs)

    def _is_success(self, reward: SupportsFloat, terminated: bool) -> bool:
        """Return True if this terminating step reached the goal (judged by its reward)."""
        if not terminated:
            return False
        if self.success_reward is not None:
            return float(reward) >= self.success_reward
        if self._goal_reward is not None:
            return float(reward) >= self._goal_reward
        return float(reward) > 0

    def goal_reward(self) -> float | None:
        """Return the highest reward of any terminating transition in the env's ``P`` table (a goal-reaching
        step's reward), or None without a table or without terminating transitions."""
        return self._goal_reward

    def optimal_return(self, horizon: int | None | Literal["registered"] = "registered") -> float | None:
        """Return the expected optimal return of the inner env, or None without a ``P`` table.

        ``horizon="registered"`` uses ``self.horizon`` (the registered time
        limit); pass an int for another time limit or None for no limit. The
        start states come from ``initial_state_distrib`` when the env has one,
        otherwise from the state after the latest reset (a copy of the env is
        reset if this one never was). Cached per horizon.
        """
        if horizon == "registered":
            horizon = self.horizon
        if horizon not in self._optimal_cache:
            self._optimal_cache[horizon] = self._plan(horizon)
        return self._optimal_cache[horizon]

    def random_return(self, horizon: int | None | Literal["registered"] = "registered") -> float | None:
        """Return the expected return of the uniformly random policy over ``action_names``, exact by
        dynamic programming over the ``P`` table, or None without a table or without a time limit.

        ``horizon`` and the start states are those of ``optimal_return``. Cached per horizon.
        """
        if horizon == "registered":
            horizon = self.horizon
        if horizon not in self._random_cache:
            table = self._table()
            self._random_cache[horizon] = (
                None
                if table is None or horizon is None
                else plan_random_return(
                    table, len(table), int(self.env.action_space.n), self._initial_distribution(len(table)), horizon
                )
            )
        return self._random_cache[horizon]

    def tabular_model(self) -> TabularModel | None:
        """Return the env's states as text with its dense transition model, or None without a ``P`` table."""
        table = self._table()
        if table is None or self.horizon is None:
            return None
        n_states, n_actions = len(table), int(self.env.action_space.n)
        continue_probs, expected_reward = dense_model(table, n_states, n_actions)
        success = np.zeros((n_states, n_actions))
        for s in range(n_states):
            for a in range(n_actions):
                success[s, a] = sum(p for p, _, r, done in table[s][a] if self._is_success(r, done))
        return TabularModel(
            observations=[self.render_text(s) for s in range(n_states)],
            continue_probs=continue_probs,
            expected_reward=expected_reward,
            success=success,
            initial=self._initial_distribution(n_states),
            horizon=self.horizon,
        )

    def _table(self) -> Any:
        """Return the inner env's transition table ``P``, or None when it has none (or no Discrete states)."""
        table = getattr(self.env.unwrapped, "P", None)
        return table if isinstance(self.env.observation_space, spaces.Discrete) else None

    def _plan(self, horizon: int | None) -> float | None:
        """Return the planned optimal return for ``horizon`` or None if not plannable."""
        table = self._table()
        if table is None:
            return None
        n_states = len(table)
        initial = self._initial_distribution(n_states)
        return plan_optimal_return(table, n_states, int(self.env.action_space.n), initial, horizon)

    def _initial_distribution(self, n_states: int) -> np.ndarray:
        """Return the start-state distribution as a length-``n_states`` array."""
        distribution = getattr(self.env.unwrapped, "initial_state_distrib", None)
        if distribution is not None:
            return np.asarray(distribution, dtype=np.float64)
        start = self._last_obs
        if start is None:
            start, _ = copy.deepcopy(self.env.unwrapped).reset()
        one_hot = np.zeros(n_states)
        one_hot[int(start)] = 1.0
        return one_hot


@dataclass(frozen=True)
class TabularModel:
    """An env with a transition table, enough to score any policy exactly (no sampling noise)."""

    observations: list[str]  # text observation of each state index
    continue_probs: np.ndarray  # (states, actions, states): next-state probabilities without termination
    expected_reward: np.ndarray  # (states, actions)
    success: np.ndarray  # (states, actions): probability that the step ends the episode successfully
    initial: np.ndarray  # (states,): start-state distribution
    horizon: int  # the time limit

    def score(self, policy: np.ndarray) -> tuple[float, float]:
        """Return (expected return, success probability) of ``policy`` (``(states, actions)`` probabilities)."""
        returns = policy_values(self.continue_probs, self.expected_reward, policy, self.horizon)
        successes = policy_values(self.continue_probs, self.success, policy, self.horizon)
        return float(self.initial @ returns), float(self.initial @ successes)

    @property
    def random_transitions(self) -> bool:
        """Whether some step's outcome is left to chance (a slippery map): then an episode's success is partly luck."""
        continuing = self.continue_probs.sum(axis=2)
        split = (continuing > 1e-9) & (self.continue_probs.max(axis=2) < 1 - 1e-9)
        return bool(split.any() or ((self.success > 1e-9) & (self.success < 1 - 1e-9)).any())

    def visits(self, policy: np.ndarray) -> np.ndarray:
        """Return the expected steps taken from each state in an episode of ``policy``, ``(states,)``."""
        return expected_visits(self.continue_probs, policy, self.initial, self.horizon)


def _goal_reward(table: Any) -> float | None:
    """Return the highest reward of a terminating transition in ``table`` (None without one)."""
    if table is None:
        return None
    rewards = [
        float(r)
        for actions in table.values()
        for transitions in actions.values()
        for _, _, r, done in transitions
        if done
    ]
    return max(rewards) if rewards else None


def _checked_names(names: Sequence[str], n_actions: int, env_name: str) -> list[str]:
    """Return ``names`` as a list; raise EnvConfigError if they can't name ``n_actions`` actions."""
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise EnvConfigError(f"env.action_names must be a list of {n_actions} strings for {env_name}, got {names!r}")
    names = list(names)
    if len(names) != n_actions:
        raise EnvConfigError(
            f"env.action_names has {len(names)} names but {env_name} has {n_actions} actions; "
            f"give exactly {n_actions} names (action i is names[i])"
        )
    for name in names:
        if not isinstance(name, str) or not name or any(ch.isspace() for ch in name):
            raise EnvConfigError(
                f"env.action_names entry {name!r} is invalid; each name must be a non-empty string without whitespace"
            )
    lowered = [name.lower() for name in names]
    if len(set(lowered)) != len(lowered):
        raise EnvConfigError(
            f"env.action_names {names} has duplicates (case-insensitive); give each action a unique name"
        )
    return names
