"""Tests of the normalized score (`evaluate.normalized_return`, `evaluate.env_score`): policies scored exactly
by each env's tabular model, so an optimal policy must score 1 and the uniformly random one 0 (where it loses
reward) on envs whose rewards are negative."""

from __future__ import annotations

import numpy as np
import pytest

from colearn.config import EnvSpec
from colearn.experience.evaluate import env_score, normalized_return
from envs import text_env_model
from envs.planning import value_table
from envs.registry import make_inner

CLIFF = EnvSpec(
    "colearn/Text-v0",
    name="Cliff",
    kwargs={"env_id": "CliffWalking-v1", "action_names": ["up", "right", "down", "left"]},
)
TAXI = EnvSpec("colearn/Taxi-v0", name="Taxi")
LAKE = EnvSpec("colearn/FrozenLake-v0", name="Lake")


def exact(spec: EnvSpec, policy: np.ndarray) -> float:
    """The normalized score of `policy` ((states, actions) probabilities), scored by the tabular model."""
    mean_return, success = text_env_model(spec.id, **spec.kwargs).score(policy)
    return env_score(spec, "greedy", mean_return, success, 0, exact=True).normalized


def shortest_path_policy(spec: EnvSpec, inner_id: str) -> np.ndarray:
    """The greedy policy of discounted value iteration: the shortest way to the goal, one-hot (states, actions)."""
    model = text_env_model(spec.id, **spec.kwargs)
    n_states, n_actions = model.expected_reward.shape
    values = value_table(make_inner(inner_id).unwrapped.P, n_states, n_actions, horizon=None, gamma=0.99)
    q = model.expected_reward + 0.99 * model.continue_probs @ values  # (states, actions)
    return np.eye(n_actions)[q.argmax(1)]


def uniform(spec: EnvSpec) -> np.ndarray:
    n_states, n_actions = text_env_model(spec.id, **spec.kwargs).expected_reward.shape
    return np.full((n_states, n_actions), 1 / n_actions)


def test_cliff_walking_scores_one_for_the_optimal_policy_and_zero_for_a_random_one():
    optimal = shortest_path_policy(CLIFF, "CliffWalking-v1")
    model = text_env_model(CLIFF.id, **CLIFF.kwargs)
    assert model.score(optimal) == pytest.approx((-13.0, 1.0))  # 13 steps of -1; the goal step is a success
    assert exact(CLIFF, optimal) == pytest.approx(1.0, abs=1e-12)
    assert exact(CLIFF, uniform(CLIFF)) == pytest.approx(0.0, abs=1e-12)
    # always pushing right from the start walks off the cliff each step: -100 per step, far below random
    right = np.eye(4)[np.full(48, 1)]
    assert exact(CLIFF, right) < -5


def test_taxi_normalization_runs_from_random_to_optimal():
    optimal = shortest_path_policy(TAXI, "Taxi-v4")
    assert exact(TAXI, optimal) == pytest.approx(1.0, abs=1e-9)
    assert exact(TAXI, uniform(TAXI)) == pytest.approx(0.0, abs=1e-12)
    random = env_score(TAXI, "greedy", 0.0, 0.0, 0).random
    assert random == pytest.approx(-771.09, abs=0.01)
    # a taxi that never moves and picks up (illegal, -10, at every step but a first one at the passenger)
    # scores about (-2000 - random) / (7.93 - random): below random, on the same scale as the others
    pickup = np.eye(6)[np.full(500, 4)]
    assert exact(TAXI, pickup) == pytest.approx((-2000 - random) / (7.93 - random), abs=1e-3)


def test_frozen_lake_scores_are_the_fraction_of_the_optimum():
    """FrozenLake's rewards are never negative, so its floor is 0: the score is the return itself (optimum 1),
    and the uniformly random policy scores its 1.4% chance of reaching the goal."""
    assert exact(LAKE, shortest_path_policy(LAKE, "FrozenLake-v1")) == pytest.approx(1.0)
    assert exact(LAKE, uniform(LAKE)) == pytest.approx(0.01394, abs=1e-5)
    assert env_score(LAKE, "greedy", 0.25, 0.25, 4).normalized == 0.25


@pytest.mark.parametrize(
    "mean_return, optimal, random, expected",
    [
        (-13.0, -13.0, -1083.0, 1.0),
        (-1083.0, -13.0, -1083.0, 0.0),
        (-548.0, -13.0, -1083.0, 0.5),
        (0.0, 1.0, 0.99995, 0.0),  # a random walk on a map without holes: the floor stays 0
        (0.5, 1.0, None, 0.5),  # no transition table (Addition): random counts as 0
        (-3.0, None, None, -3.0),  # no known optimum: the raw return
        (0.0, 0.0, 0.0, 0.0),  # a time limit too short to reach the goal: nothing to normalize by
    ],
)
def test_normalized_return_by_hand(mean_return, optimal, random, expected):
    assert normalized_return(mean_return, optimal, random) == pytest.approx(expected)
