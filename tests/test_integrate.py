"""Tests of colearn.breeding.integrate: each mode on hand-made experts whose right answer is known.

Experts are the tiny ancestor with an untied output layer whose action-token rows are zero and whose
bias holds chosen log-probabilities: their distribution over the legal actions is exactly the one
given, whatever the observation. Experts that must depend on the observation are trained for a few
dozen steps toward target distributions.
"""

from __future__ import annotations

import math

import pytest
import torch

from colearn.breeding.integrate import (
    MODES,
    Integrated,
    ModeParams,
    check_and_control_logprobs,
    consultative_logprobs,
    ensemble_logprobs,
    env_map_of,
    evaluate_modes,
    get_mode,
)
from colearn.config import EnvSpec, EvalConfig, RolloutConfig
from colearn.errors import ColearnError
from colearn.models.partner import Partner
from colearn.models.policy import legal_action_logprobs

ACTIONS = ["left", "down", "right", "up"]
LINE = EnvSpec("colearn/FrozenLake-v0", name="Line", kwargs={"desc": ["SFG"]})  # goal on the right
MIRROR = EnvSpec("colearn/FrozenLake-v0", name="MirrorLine", kwargs={"desc": ["GFS"]})  # goal on the left
LINE_OBS = ["PFG\nP at row 0 col 0", "SPG\nP at row 0 col 1"]  # every non-terminal observation of each line
MIRROR_OBS = ["GFP\nP at row 0 col 2", "GPS\nP at row 0 col 1"]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def expert(base: Partner, name: str, probs: list[float], envs: list[str] | None = None) -> Partner:
    """Returns a copy of `base` whose distribution over ACTIONS is exactly `probs` on every observation."""
    p = base.clone(name, envs or [])
    head = p.model.lm_head
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    ids = [i[0] for i in p.action_ids(ACTIONS)]
    with torch.no_grad():
        biased.weight.copy_(head.weight)  # an untied copy: the input embeddings stay as they were
        biased.weight[ids] = 0.0
        biased.bias.zero_()
        biased.bias[ids] = torch.log(torch.tensor(probs))
    p.model.lm_head = biased
    return p


def trained(base: Partner, name: str, envs: list[str], targets: dict[str, list[float]], steps: int = 80) -> Partner:
    """Returns a copy of `base` trained by cross-entropy toward a target distribution per observation."""
    p = base.clone(name, envs)
    obs = list(targets)
    target = torch.tensor([targets[o] for o in obs])
    opt = torch.optim.Adam(p.model.parameters(), lr=1e-2)
    for _ in range(steps):
        logp = legal_action_logprobs(p.model, p.prompt_ids(obs), p.action_ids(ACTIONS), p.tokenizer.pad_token_id)
        loss = -(target * logp).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    p.model.eval()
    return p


def probs_of(policy, obs: list[str]) -> torch.Tensor:
    m = policy
    return legal_action_logprobs(m.model, m.prompt_ids(obs), m.action_ids(ACTIONS), m.tokenizer.pad_token_id).exp()


@pytest.fixture(scope="module")
def base(ancestor, model_cfg) -> Partner:
    model, tokenizer = ancestor
    return Partner("base", model, tokenizer, model_cfg)


@pytest.fixture(scope="module")
def lefty(base) -> Partner:
    return expert(base, "L", [0.7, 0.1, 0.1, 0.1], ["MirrorLine"])


@pytest.fixture(scope="module")
def righty(base) -> Partner:
    return expert(base, "R", [0.1, 0.1, 0.7, 0.1], ["Line"])


def test_expert_has_exactly_the_distribution_it_was_given(lefty):
    assert torch.allclose(probs_of(lefty, LINE_OBS + MIRROR_OBS), torch.tensor([0.7, 0.1, 0.1, 0.1]), atol=1e-5)


# --- ensemble ---------------------------------------------------------------------------------------


def test_ensemble_probabilities_are_the_mean_of_the_members(lefty, righty):
    obs = LINE_OBS * 200
    acts = Integrated("ensemble", [lefty, righty]).act(obs, ACTIONS, False, gen(), 1.0)
    mean = {"left": 0.4, "down": 0.1, "right": 0.4, "up": 0.1}
    for text, logp in zip(acts.texts, acts.logprobs):
        assert logp == pytest.approx(math.log(mean[text]), abs=1e-5)
    freq = {a: acts.texts.count(a) / len(obs) for a in ACTIONS}
    assert freq["left"] == pytest.approx(0.4, abs=0.06) and freq["up"] == pytest.approx(0.1, abs=0.04)


def test_ensemble_of_logprobs_is_the_normalized_geometric_mean():
    p0, p1 = torch.tensor([[0.7, 0.1, 0.1, 0.1]]), torch.tensor([[0.1, 0.1, 0.7, 0.1]])
    geo = (p0 * p1).sqrt()
    got = ensemble_logprobs([p0.log(), p1.log()], "logprobs").exp()
    assert torch.allclose(got, geo / geo.sum(), atol=1e-6)
    assert torch.allclose(ensemble_logprobs([p0.log(), p1.log()], "probs").exp(), (p0 + p1) / 2, atol=1e-6)


# --- routing ----------------------------------------------------------------------------------------


def test_route_sends_each_env_to_its_expert(lefty, righty):
    pair = Integrated("route", [lefty, righty], ModeParams(env_map=env_map_of([lefty, righty])))
    on_mirror = pair.in_env("MirrorLine").act(MIRROR_OBS, ACTIONS, True, gen())
    on_line = pair.in_env("Line").act(LINE_OBS, ACTIONS, True, gen())
    assert on_mirror.texts == ["left", "left"] and on_line.texts == ["right", "right"]
    assert on_line.logprobs == pytest.approx([math.log(0.7)] * 2, abs=1e-5)  # the deciding member's
    assert pair.decisions == [2, 2]  # shared by the env-bound views


def test_route_by_confidence_picks_the_surer_member(base):
    sure, unsure = expert(base, "S", [0.1, 0.05, 0.05, 0.8]), expert(base, "U", [0.2, 0.6, 0.1, 0.1])
    for members, decider in (([sure, unsure], 0), ([unsure, sure], 1)):
        policy = Integrated("route_confidence", members)
        acts = policy.act(LINE_OBS, ACTIONS, True, gen())
        assert acts.texts == ["up", "up"] and acts.logprobs == pytest.approx([math.log(0.8)] * 2, abs=1e-5)
        assert policy.decisions[decider] == 2


@pytest.mark.parametrize("mode", sorted(MODES))
def test_policy_probs_are_what_the_mode_acts_by(base, mode):
    """Exact evaluation runs `policy_probs` through the env's table: one-hot on the greedy action `act` takes, and
    the composite distribution whose probability `act` reports for every sampled action."""
    members = [expert(base, "P", [0.6, 0.05, 0.3, 0.05]), expert(base, "C", [0.04, 0.12, 0.7, 0.14])]
    policy = Integrated(mode, members, ModeParams(threshold=0.1)).in_env("Line")
    greedy = policy.act(LINE_OBS, ACTIONS, True, gen())
    onehot = policy.policy_probs(LINE_OBS, ACTIONS, greedy=True)
    assert onehot.sum(-1).tolist() == [1.0, 1.0] and [ACTIONS[i] for i in onehot.argmax(-1)] == greedy.texts
    probs = policy.policy_probs(LINE_OBS, ACTIONS)
    assert probs.sum(-1).tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
    sampled = policy.act(LINE_OBS * 50, ACTIONS, False, gen(1))
    for i, (text, logp) in enumerate(zip(sampled.texts, sampled.logprobs)):
        assert math.exp(logp) == pytest.approx(probs[i % 2, ACTIONS.index(text)].item(), abs=1e-5)


def test_confidence_router_scores_both_envs_of_two_specialists(base):
    """Each expert is sure on its own line and uncertain on the other's: without being told the env, the
    confidence router follows the right expert on both lines and solves both."""
    uniform = [0.25] * 4
    left = trained(
        base, "L", ["MirrorLine"], {**dict.fromkeys(MIRROR_OBS, [1, 0, 0, 0]), **dict.fromkeys(LINE_OBS, uniform)}
    )
    right = trained(
        base, "R", ["Line"], {**dict.fromkeys(LINE_OBS, [0, 0, 1, 0]), **dict.fromkeys(MIRROR_OBS, uniform)}
    )
    eval_cfg, rollout_cfg = EvalConfig(episodes=2), RolloutConfig(episodes=2, group_size=1, num_envs=2)
    records = evaluate_modes(
        [left, right], [LINE, MIRROR], ["route_confidence", "route", "ensemble"], eval_cfg, rollout_cfg
    )
    score = {(r["mode"], r["env"]): r["normalized"] for r in records}
    assert score[("route_confidence", "Line")] == 1.0 and score[("route_confidence", "MirrorLine")] == 1.0
    assert score[("route", "Line")] == 1.0 and score[("route", "MirrorLine")] == 1.0
    shares = [r for r in records if r["mode"] == "route_confidence"][0]
    assert shares["integrate/share/route_confidence/L"] == pytest.approx(0.5)  # two steps on each line


# --- check and control ------------------------------------------------------------------------------


def test_checker_vetoes_a_bad_proposal_and_decides(base):
    proposer = expert(base, "P", [0.9, 0.04, 0.03, 0.03])
    checker = expert(base, "C", [0.04, 0.12, 0.7, 0.14])  # gives "left" 0.04 < threshold 0.1
    policy = Integrated("check_and_control", [proposer, checker], ModeParams(threshold=0.1))
    greedy = policy.act(LINE_OBS, ACTIONS, True, gen())
    assert greedy.texts == ["right", "right"] and policy.decisions == [0, 2]
    sampled = policy.act(LINE_OBS * 300, ACTIONS, False, gen(1))
    assert "left" not in sampled.texts
    # marginal of the two stages: p0(a)[a accepted] + p0(left) * checker's accepted distribution
    expect = {"down": 0.04 + 0.9 * 0.12 / 0.96, "right": 0.03 + 0.9 * 0.7 / 0.96, "up": 0.03 + 0.9 * 0.14 / 0.96}
    for text, logp in zip(sampled.texts, sampled.logprobs):
        assert logp == pytest.approx(math.log(expect[text]), abs=1e-5)
    assert sampled.texts.count("right") / len(sampled.texts) == pytest.approx(expect["right"], abs=0.06)


def test_checker_accepts_a_proposal_it_finds_plausible(base):
    proposer, checker = expert(base, "P", [0.9, 0.04, 0.03, 0.03]), expert(base, "C", [0.3, 0.1, 0.5, 0.1])
    policy = Integrated("check_and_control", [proposer, checker], ModeParams(threshold=0.1))
    assert policy.act(LINE_OBS, ACTIONS, True, gen()).texts == ["left", "left"]
    assert policy.decisions == [2, 0]


def test_check_and_control_distribution_sums_to_one():
    p0 = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]])
    p1 = torch.tensor([[0.05, 0.05, 0.2, 0.7], [0.02, 0.03, 0.05, 0.9]])
    for threshold in (0.0, 0.1, 0.5, 0.95):  # 0.95: every action vetoed in row 2, checker decides alone
        composite = check_and_control_logprobs(p0.log(), p1.log(), threshold).exp()
        assert torch.allclose(composite.sum(-1), torch.ones(2), atol=1e-6)
    assert torch.allclose(check_and_control_logprobs(p0.log(), p1.log(), 0.95).exp()[1], p1[1], atol=1e-6)


# --- consultative -----------------------------------------------------------------------------------


def test_consultative_chooses_only_among_the_proposers_top_k(base):
    proposer = expert(base, "P", [0.4, 0.3, 0.2, 0.1])  # offers left, down
    chooser = expert(base, "C", [0.04, 0.06, 0.7, 0.2])  # would rather go right, which is not offered
    policy = Integrated("consultative", [proposer, chooser], ModeParams(top_k=2))
    assert policy.act(LINE_OBS, ACTIONS, True, gen()).texts == ["down", "down"]
    sampled = policy.act(LINE_OBS * 200, ACTIONS, False, gen(2))
    assert set(sampled.texts) <= {"left", "down"}
    for text, logp in zip(sampled.texts, sampled.logprobs):
        assert logp == pytest.approx(math.log({"left": 0.4, "down": 0.6}[text]), abs=1e-5)
    offer, choose = torch.tensor([[0.4, 0.3, 0.2, 0.1]]), torch.tensor([[0.04, 0.06, 0.7, 0.2]])
    assert torch.allclose(consultative_logprobs(offer.log(), choose.log(), 9).exp(), choose, atol=1e-6)  # all offered


# --- generate mode, errors --------------------------------------------------------------------------


def test_generate_mode_falls_back_to_one_member(lefty, righty):
    obs = ["3+4=", "12+34="]
    alone = righty.act(obs, None, True, gen())
    routed = Integrated("route", [lefty, righty], ModeParams(env_map={"Addition": 1})).in_env("Addition")
    assert routed.act(obs, None, True, gen()).texts == alone.texts
    ensemble = Integrated("ensemble", [lefty, righty])
    assert ensemble.act(obs, None, True, gen()).texts == lefty.act(obs, None, True, gen()).texts


def test_unknown_mode_and_bad_params_are_user_errors(lefty, righty):
    with pytest.raises(ColearnError, match="check_and_control.*consultative.*ensemble.*route"):
        get_mode("majority_vote")
    with pytest.raises(ColearnError, match="needs 2 members"):
        Integrated("consultative", [lefty, righty, lefty])
    with pytest.raises(ColearnError, match="integrate.average"):
        ModeParams(average="median")
    with pytest.raises(ColearnError, match="integrate.threshold"):
        ModeParams(threshold=1.5)
    assert sorted(MODES) == ["check_and_control", "consultative", "ensemble", "route", "route_confidence"]


def test_integrated_has_what_rollouts_and_evaluation_read(lefty, righty):
    policy = Integrated("ensemble", [lefty, righty], name="pair")
    assert policy.name == "pair" and set(policy.envs) == {"Line", "MirrorLine"}
    assert policy.device == lefty.device and policy.prompt_ids(["PFG"]) == lefty.prompt_ids(["PFG"])
