"""Tests of colearn.analysis.dynamics: CKA on real hidden states, task-vector metrics, forgetting and transfer."""

from __future__ import annotations

import copy

import pytest
import torch

from colearn.analysis.dynamics import forgetting, main_scores, pair_metrics, probe_set, transfer
from colearn.breeding.compatibility import measure
from colearn.config import EnvSpec
from colearn.experience.evaluate import EnvScore
from colearn.models.partner import Partner, hidden_states

LAKE = EnvSpec("colearn/FrozenLake-v0", name="Lake")
LINE = EnvSpec("colearn/FrozenLake-v0", name="Line", kwargs={"desc": ["SFG"]})
ADDITION = EnvSpec("colearn/Addition-v0", name="Addition", kwargs={"digits": 1})


@pytest.fixture(scope="module")
def probe() -> list[str]:
    return probe_set([LAKE, ADDITION], 8)


def redrawn(model: torch.nn.Module, seed: int, scale: float = 0.3) -> torch.nn.Module:
    """Returns a copy of `model` with its matrices redrawn at a large scale: a freshly initialized tiny
    model is close to a token-identity map (any two score CKA near 1); this one mixes its context."""
    model = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return model.eval()


@pytest.fixture(scope="module")
def base(ancestor, model_cfg) -> Partner:
    model, tokenizer = ancestor
    return Partner("ancestor", redrawn(model, seed=1), tokenizer, model_cfg)


def permuted(base: Partner, name: str, seed: int) -> Partner:
    """Returns the same network with its hidden units permuted everywhere: the function and the geometry
    of its hidden states are unchanged (an orthogonal transform of them), its weights are not."""
    p = base.clone(name)
    perm = torch.randperm(base.cfg.hidden_size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for key, w in p.model.named_parameters():
            if key.endswith(
                (
                    "embed_tokens.weight",
                    "q_proj.weight",
                    "k_proj.weight",
                    "v_proj.weight",
                    "gate_proj.weight",
                    "up_proj.weight",
                )
            ):
                w.copy_(w[:, perm])  # reads the hidden state
            elif key.endswith(("o_proj.weight", "down_proj.weight")):
                w.copy_(w[perm, :])  # writes the hidden state
            elif key.endswith("norm.weight"):
                w.copy_(w[perm])
    return p


def shifted(base: Partner, name: str, scale: float, seed: int, sign: float = 1.0) -> Partner:
    """Returns a copy of `base` with every weight moved by sign * scale * noise (the same noise per seed)."""
    p = base.clone(name)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in p.model.parameters():
            w.add_(sign * scale * torch.randn(w.shape, generator=gen))
    return p


def test_probe_set_is_fixed_distinct_and_covers_every_env(probe):
    assert probe == probe_set([LAKE, ADDITION], 8)  # seeded: the same inputs all run long
    lake, addition = probe[:8], probe[8:]
    assert len(set(lake)) == 8 and all("P" in o for o in lake)
    assert len(addition) == 8 and all("+" in o for o in addition)
    # a 1x3 line has two non-terminal states: up to n
    assert probe_set([LINE], 50) == ["PFG\nP at row 0 col 0", "SPG\nP at row 0 col 1"]


def test_hidden_states_cover_every_token_whatever_the_padding(base, probe):
    together = hidden_states(base, probe, batch_size=64)
    alone = torch.cat([hidden_states(base, [o]) for o in probe])
    assert together.shape == (sum(map(len, base.prompt_ids(probe))), base.cfg.hidden_size)
    assert torch.allclose(together, alone, atol=1e-5)


def test_cka_is_one_for_identical_partners_and_falls_with_distance(base, probe, ancestor, model_cfg):
    twin_a, twin_b = base.clone("A"), base.clone("B")
    same = pair_metrics(measure(base, [twin_a, twin_b], probe))
    assert same["compat/cka/A~B"] == pytest.approx(1.0, abs=1e-6)
    assert same["compat/cka/A~ancestor"] == pytest.approx(1.0, abs=1e-6)
    assert same["weights/distance/A"] == 0.0 and same["compat/cosine/A~B"] == 0.0  # no task vectors yet

    nudged = shifted(base, "B", 0.03, seed=5)
    stranger = Partner("B", redrawn(ancestor[0], seed=2), base.tokenizer, model_cfg)
    near = pair_metrics(measure(base, [twin_a, nudged], probe))["compat/cka/A~B"]
    far = pair_metrics(measure(base, [twin_a, stranger], probe))["compat/cka/A~B"]
    assert 0.999 > near > 0.9 and far < 0.6


def test_cka_ignores_permuted_units_and_scale_that_weight_distance_sees(base, probe):
    shuffled = permuted(base, "B", seed=3)
    metrics = pair_metrics(measure(base, [base.clone("A"), shuffled], probe))
    assert metrics["compat/cka/A~B"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["weights/distance/B"] > 1.0
    louder = base.clone("C")
    with torch.no_grad():
        louder.model.model.norm.weight.mul_(3.0)  # the last hidden states, scaled isotropically
    assert torch.allclose(hidden_states(louder, probe), 3 * hidden_states(base, probe), atol=1e-4)
    assert pair_metrics(measure(base, [base.clone("A"), louder], probe))["compat/cka/A~C"] == pytest.approx(
        1.0, abs=1e-6
    )


def test_task_vector_metrics_see_agreeing_and_opposing_updates(base, probe):
    along, again, against = shifted(base, "A", 0.01, 7), shifted(base, "B", 0.01, 7), shifted(base, "C", 0.01, 7, -1)
    agree = pair_metrics(measure(base, [along, again], probe))
    assert agree["compat/cosine/A~B"] == pytest.approx(1.0) and agree["compat/sign_conflict/A~B"] == 0.0
    oppose = pair_metrics(measure(base, [along, against], probe))
    assert oppose["compat/cosine/A~C"] == pytest.approx(-1.0) and oppose["compat/sign_conflict/A~C"] == 1.0
    # each moved by the same vector length; apart by twice that
    assert oppose["weights/distance/A~C"] == pytest.approx(2 * oppose["weights/distance/A"], rel=1e-4)
    assert set(oppose) == {
        "compat/cka/A~C",
        "compat/cosine/A~C",
        "compat/sign_conflict/A~C",
        "weights/distance/A~C",
        "compat/cka/A~ancestor",
        "compat/cka/C~ancestor",
        "weights/distance/A",
        "weights/distance/C",
    }


def score(env: str, policy: str, normalized: float) -> EnvScore:
    return EnvScore(env, policy, normalized, 0.0, 1.0, normalized, 4)


def test_main_scores_prefer_greedy():
    scores = {"A": [score("Lake", "greedy", 0.5), score("Lake", "sampled", 0.9)], "B": [score("Lake", "sampled", 0.3)]}
    assert main_scores(scores) == {"A": {"Lake": 0.5}, "B": {"Lake": 0.3}}


def test_forgetting_is_best_so_far_minus_now():
    history = [{"A": {"Lake": 0.5, "Mirror": 0.0}}, {"A": {"Lake": 1.0, "Mirror": 0.25}, "B": {"Lake": 0.2}}]
    now = {"A": {"Lake": 0.75, "Mirror": 0.5, "Taxi": 0.1}, "B": {"Lake": 0.2}}
    assert forgetting(history, now) == {"forgetting/A/Lake": 0.25, "forgetting/A/Mirror": 0.0, "forgetting/B/Lake": 0.0}
    assert forgetting([], now) == {}


def test_transfer_reports_only_envs_a_partner_never_acts_in(base):
    a, b = base.clone("A", ["Lake"]), base.clone("B", ["Mirror"])
    now = {"A": {"Lake": 1.0, "Mirror": 0.25}, "B": {"Lake": 0.5, "Mirror": 0.75}, "offspring": {"Lake": 1.0}}
    assert transfer(now, [a, b]) == {"transfer/unseen_return/A/Mirror": 0.25, "transfer/unseen_return/B/Lake": 0.5}
