"""Exact optimal and random-policy returns for tabular gymnasium envs (dynamic programming on ``P``).

Toy-text envs expose ``P[s][a] = [(prob, next_state, reward, terminated), ...]``.
From it we build dense arrays once and run vectorised Bellman backups, so the
optimal return is the ceiling a learner can reach on the time-limited env, and
the uniformly random policy's return is the floor that scores measure progress from.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

TransitionTable = Mapping[int, Mapping[int, Sequence[tuple[float, int, float, bool]]]]

_TOLERANCE = 1e-10
_MAX_ITERATIONS = 100_000


def dense_model(P: TransitionTable, n_states: int, n_actions: int) -> tuple[np.ndarray, np.ndarray]:
    """Convert a gymnasium transition table into dense arrays.

    Returns ``(continue_probs, expected_reward)``: ``continue_probs[s, a, s2]`` is
    the probability of moving to ``s2`` *without* terminating (terminating
    transitions contribute their reward but no future value), and
    ``expected_reward[s, a]`` is the one-step expected reward.
    """
    continue_probs = np.zeros((n_states, n_actions, n_states))
    expected_reward = np.zeros((n_states, n_actions))
    for s in range(n_states):
        for a in range(n_actions):
            for prob, next_state, reward, terminated in P[s][a]:
                expected_reward[s, a] += prob * reward
                if not terminated:
                    # `+=` because several outcomes may lead to the same state
                    continue_probs[s, a, next_state] += prob
    return continue_probs, expected_reward


def value_table(
    P: TransitionTable,
    n_states: int,
    n_actions: int,
    horizon: int | None,
    gamma: float = 1.0,
) -> np.ndarray:
    """Optimal state values, shape ``(n_states,)``.

    With a finite ``horizon`` returns the optimal value with ``horizon`` steps
    left (exact backward induction). With ``horizon=None`` returns the fixed
    point of value iteration; raises RuntimeError if it does not converge (e.g.
    a positive-reward loop with ``gamma=1``).
    """
    continue_probs, expected_reward = dense_model(P, n_states, n_actions)
    # (S*A, S) so each backup is one matrix-vector product
    flat_probs = continue_probs.reshape(n_states * n_actions, n_states)
    values = np.zeros(n_states)

    def backup(v: np.ndarray) -> np.ndarray:
        future = (flat_probs @ v).reshape(n_states, n_actions)
        return (expected_reward + gamma * future).max(axis=1)

    if horizon is not None:
        if horizon < 0:
            raise ValueError(f"horizon must be >= 0 or None, got {horizon}")
        for _ in range(horizon):
            values = backup(values)
        return values

    for _ in range(_MAX_ITERATIONS):
        new_values = backup(values)
        if np.max(np.abs(new_values - values)) < _TOLERANCE:
            return new_values
        values = new_values
    raise RuntimeError(
        f"value iteration did not converge in {_MAX_ITERATIONS} iterations; use a finite horizon or gamma < 1"
    )


def optimal_return(
    P: TransitionTable,
    n_states: int,
    n_actions: int,
    initial_distribution: Any,
    horizon: int | None,
    gamma: float = 1.0,
) -> float:
    """Expected optimal return from ``initial_distribution`` (length ``n_states``).

    Pass the env's ``max_episode_steps`` as ``horizon``: the result is then the
    true ceiling of the time-limited env (undiscounted by default). Returns a
    float.
    """
    initial = np.asarray(initial_distribution, dtype=np.float64)
    if initial.shape != (n_states,):
        raise ValueError(f"initial_distribution has shape {initial.shape}, expected ({n_states},)")
    values = value_table(P, n_states, n_actions, horizon, gamma)
    return float(initial @ values)


def policy_values(
    continue_probs: np.ndarray,
    expected_reward: np.ndarray,
    policy: np.ndarray,
    horizon: int,
) -> np.ndarray:
    """Expected return of a stochastic ``policy`` from every state with ``horizon`` steps left, ``(n_states,)``.

    ``policy[s, a]`` is the probability of action ``a`` in state ``s``; ``continue_probs`` and
    ``expected_reward`` are ``dense_model``'s arrays (pass an indicator as ``expected_reward`` to get a
    probability, e.g. of reaching the goal). Exact backward induction, undiscounted.
    """
    n_states, n_actions = expected_reward.shape
    step_reward = (policy * expected_reward).sum(axis=1)  # (n_states,)
    # (n_states, n_states): the chain the policy induces, without terminated mass
    chain = np.einsum("sa,sat->st", policy, continue_probs)
    values = np.zeros(n_states)
    for _ in range(horizon):
        values = step_reward + chain @ values
    return values


def expected_visits(continue_probs: np.ndarray, policy: np.ndarray, initial: np.ndarray, horizon: int) -> np.ndarray:
    """Expected number of steps taken from each state in an episode of ``policy`` within ``horizon`` steps,
    ``(n_states,)``: the start distribution pushed through the chain the policy induces, summed over time."""
    chain = np.einsum("sa,sat->st", policy, continue_probs)
    occupancy, visits = initial.astype(float), np.zeros(len(initial))
    for _ in range(horizon):
        visits += occupancy
        occupancy = occupancy @ chain
    return visits


def random_return(
    P: TransitionTable,
    n_states: int,
    n_actions: int,
    initial_distribution: Any,
    horizon: int,
) -> float:
    """Expected undiscounted return of the uniformly random policy over ``horizon`` steps from
    ``initial_distribution`` (length ``n_states``): exact backward induction, no sampling. Returns a float."""
    initial = np.asarray(initial_distribution, dtype=np.float64)
    continue_probs, expected_reward = dense_model(P, n_states, n_actions)
    uniform = np.full((n_states, n_actions), 1.0 / n_actions)
    return float(initial @ policy_values(continue_probs, expected_reward, uniform, horizon))
