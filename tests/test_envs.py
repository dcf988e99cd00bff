"""Tests for the ``envs`` package: text wrappers, renderers, planning, registry, vector envs."""

from __future__ import annotations

import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import envs
from envs import AdditionEnv, EnvConfigError, TextEnv, optimal_return, text_env_info
from envs.planning import dense_model, value_table
from envs.registry import effective_time_limit, make_inner

FROZEN_START = "PFFF\nFHFH\nFFFH\nHFFG\nP at row 0 col 0"
RIGHT_OF_START = "SPFF\nFHFH\nFFFH\nHFFG\nP at row 0 col 1"
BELOW_START = "SFFF\nPHFH\nFFFH\nHFFG\nP at row 1 col 0"
CLIFF_NAMES = ["up", "right", "down", "left"]
TAXI_NAMES = ["south", "north", "east", "west", "pickup", "dropoff"]


def make_lake(**kwargs) -> gym.Env:
    """Return a fresh deterministic 4x4 text FrozenLake."""
    return gym.make("colearn/FrozenLake-v0", **kwargs)


# --- registration -------------------------------------------------------------


def test_env_ids_are_the_documented_ones():
    assert envs.ENV_IDS == [
        "colearn/FrozenLake-v0",
        "colearn/FrozenLakeSlippery-v0",
        "colearn/FrozenLake8x8-v0",
        "colearn/FrozenLake8x8Slippery-v0",
        "colearn/Taxi-v0",
        "colearn/Addition-v0",
        "colearn/Text-v0",
    ]


@pytest.mark.parametrize("env_id", [i for i in envs.ENV_IDS if i != "colearn/Text-v0"])
def test_every_id_makes_resets_and_steps_with_text(env_id):
    env = gym.make(env_id)
    obs, info = env.reset(seed=0)
    assert isinstance(obs, str) and obs
    assert env.observation_space.contains(obs)
    names = env.get_wrapper_attr("action_names")
    action = names[0] if names else "7"
    obs, reward, terminated, truncated, info = env.step(action)
    assert isinstance(obs, str) and isinstance(reward, float)
    assert info["invalid_action"] is False
    assert isinstance(info["success"], bool)


def test_registered_time_limits():
    expected = {
        "colearn/FrozenLake-v0": 100,
        "colearn/FrozenLakeSlippery-v0": 100,
        "colearn/FrozenLake8x8-v0": 200,
        "colearn/FrozenLake8x8Slippery-v0": 200,
        "colearn/Taxi-v0": 200,
        "colearn/Addition-v0": None,  # one answer terminates the episode
    }
    for env_id, steps in expected.items():
        assert gym.make(env_id).spec.max_episode_steps == steps, env_id


WRAPPED_IDS = [(env_id, {}) for env_id in envs.ENV_IDS if env_id != "colearn/Text-v0"] + [
    ("colearn/Text-v0", {"env_id": "CliffWalking-v1", "action_names": CLIFF_NAMES}),
    ("colearn/Text-v0", {"env_id": "Taxi-v4", "action_names": TAXI_NAMES}),
    ("colearn/Text-v0", {"env_id": "FrozenLake-v1", "action_names": ["left", "down", "right", "up"]}),
]


@pytest.mark.parametrize(("env_id", "kwargs"), WRAPPED_IDS)
def test_gymnasium_env_checker_accepts(env_id, kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any complaint of the checker fails the test, except
        warnings.filterwarnings("ignore", message=".*different from the unwrapped version")  # that it is wrapped
        check_env(gym.make(env_id, **kwargs))


@pytest.mark.parametrize(("env_id", "kwargs"), WRAPPED_IDS)
def test_spec_has_colearn_id_and_remakes_the_env(env_id, kwargs):
    env = gym.make(env_id, **kwargs)
    assert env.spec.id == env_id and env.spec.kwargs == {**gym.spec(env_id).kwargs, **kwargs}
    again = gym.make(env.spec)
    assert again.spec == env.spec
    assert effective_time_limit(again) == effective_time_limit(env)
    names = env.get_wrapper_attr("action_names")
    actions = (names or ["7"]) * 3
    trajectories = []
    for made in (env, again):
        obs, _ = made.reset(seed=3)
        trajectories.append([obs] + [made.step(a)[:2] for a in actions])
    assert trajectories[0] == trajectories[1]


def test_ansi_render_is_the_text_observation():
    env = make_lake(render_mode="ansi")
    obs, _ = env.reset(seed=0)
    assert env.render() == obs == FROZEN_START
    with pytest.raises(EnvConfigError, match="render_mode='human'"):
        make_lake(render_mode="human")


def test_make_emits_no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        env = make_lake()
        env.reset(seed=0)
        env.step("right")
        env.step("jump")


def test_inner_env_has_no_time_limit_of_its_own():
    inner = make_inner("FrozenLake-v1")
    wrapper = inner
    while isinstance(wrapper, gym.Wrapper):
        assert not isinstance(wrapper, gym.wrappers.TimeLimit)
        wrapper = wrapper.env


def test_slippery_ids_are_slippery_and_plain_ids_are_not():
    assert gym.make("colearn/FrozenLake-v0").unwrapped.P[0][2] == [(1.0, 1, 0.0, False)]
    assert len(gym.make("colearn/FrozenLakeSlippery-v0").unwrapped.P[0][2]) == 3
    assert gym.make("colearn/FrozenLake8x8-v0").unwrapped.desc.shape == (8, 8)


# --- FrozenLake rendering and parsing -----------------------------------------


def test_frozen_lake_renders_map_with_player():
    env = make_lake()
    obs, _ = env.reset(seed=0)
    assert obs == FROZEN_START
    obs, *_ = env.step("right")
    assert obs == RIGHT_OF_START
    obs, *_ = env.step("down")
    assert obs == "SFFF\nFPFH\nFFFH\nHFFG\nP at row 1 col 1"


def test_parse_action_forms():
    env = make_lake()
    text_env = env.get_wrapper_attr("parse_action")
    assert text_env("Right ") == 2
    assert text_env("right now") == 2
    assert text_env("UP") == 3
    assert text_env(2) == 2
    assert text_env(np.int64(1)) == 1
    assert text_env(4) is None
    assert text_env(-1) is None
    assert text_env("jump") is None
    assert text_env("") is None
    assert text_env("now right") is None


def test_invalid_action_penalised_without_stepping():
    env = make_lake()
    obs, _ = env.reset(seed=0)
    env.step("right")
    obs_before, state_before = env.step("down")[0], env.unwrapped.s
    obs, reward, terminated, truncated, info = env.step("jump")
    assert obs == obs_before
    assert env.unwrapped.s == state_before
    assert reward == -1.0
    assert (terminated, truncated) == (False, False)
    assert info["invalid_action"] is True and info["success"] is False


def test_invalid_penalty_is_configurable():
    env = make_lake(invalid_penalty=-0.25)
    env.reset(seed=0)
    assert env.step("fly")[1] == -0.25


def test_invalid_actions_still_truncate_at_time_limit():
    env = make_lake()
    env.reset(seed=0)
    for _ in range(99):
        assert env.step("jump")[3] is False
    _, _, terminated, truncated, info = env.step("jump")
    assert truncated is True and terminated is False
    assert info["invalid_action"] is True


def test_reaching_goal_is_success_and_hole_is_not():
    env = make_lake()
    env.reset(seed=0)
    route = ["down", "down", "right", "right", "down", "right"]
    results = [env.step(a) for a in route]
    assert [r[4]["success"] for r in results] == [False] * 5 + [True]
    assert results[-1][1] == 1.0 and results[-1][2] is True

    env.reset(seed=0)
    env.step("right")
    _, reward, terminated, _, info = env.step("down")  # cell 5 is a hole
    assert terminated is True and reward == 0.0 and info["success"] is False


# --- configuration errors -----------------------------------------------------


def test_wrong_number_of_action_names():
    with pytest.raises(EnvConfigError, match="action_names has 3 names .* 4 actions"):
        gym.make("colearn/Text-v0", env_id="FrozenLake-v1", action_names=["a", "b", "c"])


@pytest.mark.parametrize(
    "names",
    [["a", "a", "b", "c"], ["a", "B", "b", "c"], ["a", "", "b", "c"], ["a", "b c", "d", "e"]],
)
def test_bad_action_names(names):
    with pytest.raises(EnvConfigError, match="action_names"):
        TextEnv(make_inner("FrozenLake-v1"), names)


def test_non_discrete_action_space_rejected():
    with pytest.raises(EnvConfigError, match="MountainCarContinuous-v0.*Discrete action space"):
        TextEnv(make_inner("MountainCarContinuous-v0"), ["push"])


def test_unknown_env_id():
    with pytest.raises(EnvConfigError, match="env_id='Foo-v0': Environment `Foo` doesn't exist"):
        gym.make("colearn/Text-v0", env_id="Foo-v0", action_names=["a"])


def test_deprecated_env_id_names_the_version_to_use():
    with pytest.raises(EnvConfigError) as error:
        gym.make("colearn/Text-v0", env_id="Taxi-v3", action_names=TAXI_NAMES)
    message = str(error.value)
    assert message.startswith("env_id='Taxi-v3': ") and "Please use `Taxi-v4` instead" in message
    assert "\n" not in message


# --- planning -----------------------------------------------------------------


def coin_table(quit_reward: float) -> dict:
    """Return a 2-state P.

    In state 0, "flip" ends with reward 1 w.p. 0.5 else stays; "quit" ends with quit_reward.
    """
    return {
        0: {
            0: [(0.5, 1, 1.0, True), (0.5, 0, 0.0, False)],
            1: [(1.0, 1, quit_reward, True)],
        },
        1: {0: [(1.0, 1, 0.0, True)], 1: [(1.0, 1, 0.0, True)]},
    }


def test_coin_chain_finite_horizon_by_hand():
    # without a good quit option V_h = 1 - 0.5**h
    P = coin_table(quit_reward=0.0)
    for h in range(6):
        assert optimal_return(P, 2, 2, [1.0, 0.0], horizon=h) == pytest.approx(1 - 0.5**h)
    # quit (0.6) beats one flip (0.5); with 2 steps flip-then-quit gives 0.5 + 0.5*0.6
    P = coin_table(quit_reward=0.6)
    assert [optimal_return(P, 2, 2, [1, 0], horizon=h) for h in (1, 2, 3)] == pytest.approx([0.6, 0.8, 0.9])


def test_coin_chain_infinite_horizon():
    P = coin_table(quit_reward=0.6)
    assert optimal_return(P, 2, 2, [1, 0], horizon=None) == pytest.approx(1.0, abs=1e-8)
    # discounted fixed point: V = 0.5 + 0.5 * 0.9 * V
    assert optimal_return(P, 2, 2, [1, 0], horizon=None, gamma=0.9) == pytest.approx(0.5 / 0.55)
    assert value_table(P, 2, 2, horizon=None)[1] == 0.0


def test_divergent_value_iteration_raises():
    looping = {0: {0: [(1.0, 0, 1.0, False)]}}
    with pytest.raises(RuntimeError, match="did not converge"):
        optimal_return(looping, 1, 1, [1.0], horizon=None)
    assert optimal_return(looping, 1, 1, [1.0], horizon=7) == 7.0


def test_frozen_lake_optimal_returns():
    assert gym.make("colearn/FrozenLake-v0").get_wrapper_attr("optimal_return")() == 1.0
    assert gym.make("colearn/FrozenLake8x8-v0").get_wrapper_attr("optimal_return")() == 1.0
    slippery = gym.make("colearn/FrozenLakeSlippery-v0").get_wrapper_attr("optimal_return")
    # horizon 100 is binding: without the time limit the optimum is 14/17 ~ 0.8235
    assert 0.7440 < slippery() < 0.7445
    assert slippery(horizon=None) == pytest.approx(14 / 17, abs=1e-6)
    big = gym.make("colearn/FrozenLake8x8Slippery-v0").get_wrapper_attr("optimal_return")()
    assert 0.912 < big < 0.914


def test_taxi_optimal_return():
    value = gym.make("colearn/Taxi-v0").get_wrapper_attr("optimal_return")()
    assert value == pytest.approx(7.93, abs=1e-9)


def test_text_env_info():
    info = text_env_info("colearn/FrozenLakeSlippery-v0")
    assert info["action_names"] == ["left", "down", "right", "up"]
    assert info["max_episode_steps"] == 100
    assert 0.7440 < info["optimal_return"] < 0.7445
    # a shorter limit passed to make lowers the ceiling
    short = text_env_info("colearn/FrozenLakeSlippery-v0", max_episode_steps=20)
    assert short["max_episode_steps"] == 20
    assert 0 < short["optimal_return"] < info["optimal_return"]
    assert text_env_info("colearn/Addition-v0") == {
        "action_names": None,
        "optimal_return": 1.0,
        "random_return": 0.0,  # no transition table: a random answer is taken as never right
        "max_episode_steps": None,  # no time limit: every answer terminates the episode
        "answer_charset": "0123456789",  # its action space: answers of digits,
        "answer_length": 3,  # at most as many as a sum of two 2-digit numbers has
    }
    assert text_env_info("colearn/Addition-v0", digits=1)["answer_length"] == 2


# --- Taxi -----------------------------------------------------------------------


def test_taxi_render_and_success():
    env = gym.make("colearn/Taxi-v0")
    obs, _ = env.reset(seed=3)
    taxi = env.unwrapped
    row, col, pass_idx, dest_idx = taxi.decode(taxi.s)
    lines = obs.split("\n")
    assert len(lines) == 6
    assert all(len(line) == 9 for line in lines[:5])
    assert lines[row][2 * col] == "T"
    # map walls: between columns 1|2 in rows 0-1, 0|1 and 2|3 in rows 3-4
    assert [line[3] for line in lines[:5]] == ["|", "|", " ", " ", " "]
    assert lines[4][1] == "|" and lines[4][5] == "|"
    pr, pc = taxi.locs[pass_idx]
    dr, dc = taxi.locs[dest_idx]
    assert lines[5] == (
        f"taxi at row {row} col {col}, passenger at row {pr} col {pc}, destination at row {dr} col {dc}"
    )

    # drive greedily on the exact values: success only on the final dropoff
    continue_probs, expected_reward = dense_model(taxi.P, 500, 6)
    values = value_table(taxi.P, 500, 6, horizon=None)
    names = env.get_wrapper_attr("action_names")
    total, steps, done = 0.0, 0, False
    while not done:
        q = expected_reward[taxi.s] + continue_probs[taxi.s] @ values
        obs, reward, terminated, truncated, info = env.step(names[int(np.argmax(q))])
        if taxi.decode(taxi.s)[2] == 4 and not terminated:
            assert "passenger in taxi" in obs
        total, steps, done = total + reward, steps + 1, terminated or truncated
        assert info["success"] is terminated
    assert terminated and reward == 20.0
    assert total == 21 - steps


# --- Addition -----------------------------------------------------------------


def test_addition_seeded_reproducible():
    env = AdditionEnv(digits=3)
    first = env.reset(seed=123)[0]
    assert env.reset(seed=123)[0] == first
    problems = {env.reset(seed=s)[0] for s in range(20)}
    assert len(problems) > 15
    a, b = first[:-1].split("+")
    assert first.endswith("=") and 0 <= int(a) < 1000 and 0 <= int(b) < 1000


def test_addition_rewards():
    env = gym.make("colearn/Addition-v0")
    obs, _ = env.reset(seed=5)
    a, b = obs[:-1].split("+")
    answer = str(int(a) + int(b))
    assert env.get_wrapper_attr("answer")() == answer
    _, reward, terminated, truncated, info = env.step(f" {answer}\n")
    assert (reward, terminated, info["success"], info["invalid_action"]) == (1.0, True, True, False)
    # no TimeLimit: the answer ends the episode by termination alone
    assert truncated is False

    env.reset(seed=5)
    _, reward, _, _, info = env.step(str(int(answer) + 1))
    assert (reward, info["success"], info["invalid_action"]) == (0.0, False, False)

    env.reset(seed=5)
    _, reward, terminated, _, info = env.step("forty two")
    assert (reward, terminated, info["success"], info["invalid_action"]) == (0.0, True, False, True)


def test_addition_config():
    env = AdditionEnv(digits=1, invalid_penalty=-0.5)
    assert env.action_names is None and env.optimal_return() == 1.0
    env.reset(seed=0)
    assert env.step("x")[1] == -0.5
    assert env.parse_action(" 12 ") == "12" and env.parse_action("1 2") is None
    assert env.parse_action("\u00b2") is None
    with pytest.raises(EnvConfigError, match="digits"):
        AdditionEnv(digits=0)
    env = gym.make("colearn/Addition-v0", digits=4)
    a, b = env.reset(seed=0)[0][:-1].split("+")
    assert max(int(a), int(b)) >= 1000


# --- vector envs ----------------------------------------------------------------


def test_sync_vector_env():
    env = gym.make_vec(
        "colearn/FrozenLake-v0",
        num_envs=4,
        vectorization_mode="sync",
        vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.DISABLED},
    )
    obs, _ = env.reset(seed=[0, 1, 2, 3])
    assert obs == (FROZEN_START,) * 4
    obs, rewards, terminated, truncated, infos = env.step(["right", "down", "jump", 2])
    assert obs == (RIGHT_OF_START, BELOW_START, FROZEN_START, RIGHT_OF_START)
    assert rewards.tolist() == [0.0, 0.0, -1.0, 0.0]
    assert infos["invalid_action"].tolist() == [False, False, True, False]
    assert infos["success"].tolist() == [False] * 4
    assert env.get_attr("action_names") == (["left", "down", "right", "up"],) * 4
    assert env.call("optimal_return") == (1.0,) * 4

    obs, _ = env.reset(options={"reset_mask": np.array([True, False, False, True])})
    assert obs == (FROZEN_START, BELOW_START, FROZEN_START, FROZEN_START)
    env.close()


def test_sync_vector_success_flags():
    env = gym.make_vec(
        "colearn/FrozenLake-v0",
        num_envs=2,
        vectorization_mode="sync",
        vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.DISABLED},
    )
    env.reset(seed=[0, 0])
    for action in ["down", "down", "right", "right", "down"]:
        env.step([action, action])
    _, rewards, terminated, _, infos = env.step(["right", "left"])
    assert rewards.tolist() == [1.0, 0.0]
    assert terminated.tolist() == [True, False]
    assert infos["success"].tolist() == [True, False]
    env.close()


# --- generic wrapper --------------------------------------------------------------


def test_generic_wrapper_cliff_walking():
    env = gym.make("colearn/Text-v0", env_id="CliffWalking-v1", action_names=CLIFF_NAMES)
    obs, _ = env.reset(seed=0)
    assert obs == "state 36"
    assert env.step("up")[0] == "state 24"
    assert env.step("right")[0] == "state 25"
    assert env.step("sideways")[2:5] == (False, False, {"invalid_action": True, "success": False})
    # CliffWalking has no registered limit, so the default of 100 applies
    assert env.spec.max_episode_steps == 100
    info = text_env_info("colearn/Text-v0", env_id="CliffWalking-v1", action_names=CLIFF_NAMES)
    assert info.pop("random_return") < -1000  # a random walk falls off the cliff again and again
    assert info == {
        "action_names": CLIFF_NAMES,
        "optimal_return": -13.0,
        "max_episode_steps": 100,
        "answer_charset": None,
        "answer_length": None,
    }


def test_generic_wrapper_options():
    env = gym.make(
        "colearn/Text-v0",
        env_id="FrozenLake-v1",
        action_names=["L", "D", "R", "U"],
        env_kwargs={"is_slippery": False},
        invalid_penalty=-3.0,
    )
    env.reset(seed=0)
    assert env.step("r")[0] == RIGHT_OF_START
    assert env.step("x")[1] == -3.0
    # the inner env's registered limit (100) is the default
    assert (
        text_env_info("colearn/Text-v0", env_id="FrozenLake-v1", action_names=["L", "D", "R", "U"])["max_episode_steps"]
        == 100
    )


def test_generic_wrapper_tuple_observation():
    env = gym.make("colearn/Text-v0", env_id="Blackjack-v1", action_names=["stick", "hit"])
    obs, _ = env.reset(seed=0)
    assert obs.startswith("state ") and len(obs.split()) == 4
    assert env.get_wrapper_attr("optimal_return")() is None


def test_success_reward_threshold():
    env = gym.make(
        "colearn/Text-v0",
        env_id="FrozenLake-v1",
        action_names=["left", "down", "right", "up"],
        env_kwargs={"is_slippery": False},
        success_reward=2.0,
    )
    env.reset(seed=0)
    for action in ["down", "down", "right", "right", "down"]:
        env.step(action)
    _, reward, terminated, _, info = env.step("right")
    assert reward == 1.0 and terminated and info["success"] is False


def test_expected_visits_count_the_steps_from_each_state():
    model = envs.text_env_model("colearn/FrozenLake-v0", desc=["SFG"])  # S F G in a row
    right = np.eye(4)[[2, 2, 2]]  # always "right": S, then F, then the goal
    assert model.visits(right).tolist() == pytest.approx([1.0, 1.0, 0.0])
    left = np.eye(4)[[0, 0, 0]]  # bumps into the wall at S until the time limit
    assert model.visits(left).tolist() == pytest.approx([model.horizon, 0.0, 0.0])


def test_tabular_model_scores_policies_exactly():
    model = envs.text_env_model("colearn/FrozenLakeSlippery-v0")
    n_states, n_actions = model.expected_reward.shape
    assert model.horizon == 100 and len(model.observations) == n_states == 16
    assert model.observations[0] == FROZEN_START
    # the planner's greedy policy scores the planned optimum, and every success is the goal's reward of 1
    values = value_table(make_lake(is_slippery=True).unwrapped.P, n_states, n_actions, horizon=None, gamma=0.99)
    q = model.expected_reward + 0.99 * model.continue_probs @ values
    best_return, best_success = model.score(np.eye(n_actions)[q.argmax(1)])
    optimum = text_env_info("colearn/FrozenLakeSlippery-v0")["optimal_return"]
    assert best_return == pytest.approx(best_success) and 0.7 < best_return <= optimum + 1e-9
    # the uniform policy's exact success probability matches 4,000 simulated episodes (std ~0.002)
    uniform = np.full((n_states, n_actions), 1 / n_actions)
    _, exact = model.score(uniform)
    env, rng, wins = make_lake(is_slippery=True), np.random.default_rng(0), 0
    for seed in range(4000):
        env.reset(seed=seed)
        done = False
        while not done:
            _, _, terminated, truncated, info = env.step(["left", "down", "right", "up"][rng.integers(4)])
            done = terminated or truncated
        wins += info["success"]
    assert abs(wins / 4000 - exact) < 0.006, (wins / 4000, exact)


def test_frozen_lake_without_position_line_shows_only_the_map():
    obs, _ = make_lake(position_line=False).reset(seed=0)
    assert obs == FROZEN_START.rsplit("\n", 1)[0]


def test_reaching_cliff_walkings_goal_is_a_success():
    """Every step of CliffWalking costs -1, the goal step too: success is reaching the goal (the highest reward
    of a terminating transition), not a positive reward."""
    env = gym.make("colearn/Text-v0", env_id="CliffWalking-v1", action_names=CLIFF_NAMES)
    env.reset(seed=0)
    assert env.get_wrapper_attr("goal_reward")() == -1.0
    steps = [env.step(a) for a in ["up", *["right"] * 11, "down"]]
    assert [s[4]["success"] for s in steps] == [False] * 12 + [True]
    assert steps[-1][1:3] == (-1.0, True) and sum(s[1] for s in steps) == -13.0
    # walking into the cliff costs -100 and restarts: no termination, no success
    env.reset(seed=0)
    assert env.step("right")[1:5] == (-100.0, False, False, {"prob": 1.0, "invalid_action": False, "success": False})


def test_an_inner_envs_success_flag_is_kept():
    class Flagged(gym.Wrapper):
        def step(self, action):
            obs, reward, terminated, truncated, info = self.env.step(action)
            return obs, reward, terminated, truncated, {**info, "success": True}

    env = TextEnv(Flagged(make_inner("FrozenLake-v1", is_slippery=False)), ["left", "down", "right", "up"])
    env.reset(seed=0)
    assert env.step("right")[4]["success"] is True  # not terminated, but the env says so


def test_random_return_is_the_uniform_policys_exact_return():
    for env_id in ["colearn/FrozenLake-v0", "colearn/Taxi-v0"]:
        model = envs.text_env_model(env_id)
        n_states, n_actions = model.expected_reward.shape
        expected, _ = model.score(np.full((n_states, n_actions), 1 / n_actions))
        assert text_env_info(env_id)["random_return"] == pytest.approx(expected, abs=1e-12)
    assert text_env_info("colearn/FrozenLake-v0")["random_return"] == pytest.approx(0.01394, abs=1e-5)
    assert (
        gym.make("colearn/Text-v0", env_id="Blackjack-v1", action_names=["stick", "hit"]).get_wrapper_attr(
            "random_return"
        )()
        is None
    )


@pytest.mark.parametrize(
    "env_id,kwargs,random",
    [
        ("colearn/FrozenLake-v0", {}, False),
        ("colearn/FrozenLakeSlippery-v0", {}, True),
        ("colearn/FrozenLake-v0", {"desc": ["SG"], "is_slippery": True}, True),
        ("colearn/Taxi-v0", {}, False),
    ],
)
def test_a_table_says_whether_outcomes_are_left_to_chance(env_id, kwargs, random):
    assert envs.text_env_model(env_id, **kwargs).random_transitions is random
