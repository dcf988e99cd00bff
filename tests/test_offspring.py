"""Tests of colearn.breeding.offspring: compatibility before a merge, fallback, the promotion gate, evolve via
make_offspring."""

from __future__ import annotations

import math

import pytest
import torch

from colearn.breeding.compatibility import Compatibility, Drift, PairCompat, measure
from colearn.breeding.offspring import Copy, Merged, Mixture, make_offspring
from colearn.config import MergeConfig
from colearn.errors import ColearnError
from colearn.models.partner import Partner
from colearn.models.weights import dense_state

torch.set_num_threads(1)


def perturbed(partner: Partner, name: str, scale: float, seed: int, envs: list[str] | None = None) -> Partner:
    child = partner.clone(name, envs)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in child.model.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator))
    return child


@pytest.fixture(scope="module")
def probe(corpus) -> list[str]:
    return list(dict.fromkeys(corpus[0]))  # distinct lake grids and addition problems


@pytest.fixture(scope="module")
def family(ancestor, model_cfg, corpus):
    """(ancestor, A, B, unrelated): A and B trained-like perturbations of the ancestor, the last a fresh init."""
    from colearn.models.build import build_ancestor

    model, tokenizer = ancestor
    root = Partner("ancestor", model, tokenizer, model_cfg)
    a = perturbed(root, "A", 0.01, seed=10, envs=["Lake"])
    b = perturbed(root, "B", 0.01, seed=11, envs=["MirrorLake"])
    other = Partner("B", build_ancestor(model_cfg, *corpus, seed=1)[0], tokenizer, model_cfg, envs=["MirrorLake"])
    return root, a, b, other


def same_weights(x: Partner, y: Partner) -> bool:
    sx, sy = x.model.state_dict(), y.model.state_dict()
    return sx.keys() == sy.keys() and all(torch.equal(sx[k], sy[k]) for k in sx)


def test_compatibility_orders_identical_slightly_different_and_unrelated(family, probe):
    root, a, _, unrelated = family
    same = measure(root, [a, a.clone("B")], probe).worst()
    slight = measure(root, [a, perturbed(a, "B", 0.002, seed=20)], probe).worst()
    far = measure(root, [a, unrelated], probe).worst()
    assert same["cka"] == pytest.approx(1.0, abs=1e-9) and same["cosine"] == pytest.approx(1.0, abs=1e-9)
    assert same["sign_conflict"] == 0.0 and same["pair"] == ["A", "B"]
    assert 1.0 - 1e-5 > slight["cka"] > far["cka"] + 0.01
    assert 1.0 > slight["cosine"] > 0.5 > abs(far["cosine"])
    assert 0.0 < slight["sign_conflict"] < 0.25 < far["sign_conflict"]
    assert measure(root, [a, unrelated], None).worst()["cka"] is None  # no probe, no CKA


def test_the_offspring_decides_on_a_measurement_it_is_given(family):
    root, a, b, _ = family
    low = Compatibility(
        {("A", "B"): PairCompat(cosine=0.25, sign_conflict=0.4, distance=1.0, cka=0.9)},
        {"A": Drift(0.5, None), "B": Drift(0.5, None)},
    )
    cfg = MergeConfig(method="linear", gate=False, compat_metric="cosine", compat_threshold=0.5)
    result = make_offspring(root, [a, b], {"A": 0.2, "B": 0.1}, cfg, measured=low)
    assert isinstance(result, Copy) and result.source == "A"
    assert result.reason == "cosine 0.2500 < merge.compat_threshold 0.5"
    assert result.compat == {
        "cosine": 0.25,
        "sign_conflict": 0.4,
        "cka": 0.9,
        "pair": ["A", "B"],
        "metric": "cosine",
        "threshold": 0.5,
        "compatible": False,
    }
    # A and B are independent perturbations (their own cosine is ~0): given a high one, they merge all the same
    high = Compatibility({("A", "B"): PairCompat(cosine=0.75, sign_conflict=0.1, distance=1.0, cka=None)}, low.drift)
    assert isinstance(make_offspring(root, [a, b], {"A": 0.2, "B": 0.1}, cfg, measured=high), Merged)
    assert isinstance(make_offspring(root, [a, b], {"A": 0.2, "B": 0.1}, cfg, probe=None), Copy)  # measured here


def test_tied_embeddings_merge_once_and_stay_tied(family):
    root, a, b, _ = family
    assert root.model.config.tie_word_embeddings
    cfg = MergeConfig(method="linear", gate=False, groups={"head": {"weights": [1.0, 0.0]}})
    result = make_offspring(root, [a, b], {"A": 0.0, "B": 0.0}, cfg)
    model = result.partner.model
    assert model.lm_head.weight is model.model.embed_tokens.weight
    embed = "model.embed_tokens.weight"
    expected = (dense_state(a)[embed] + dense_state(b)[embed]) / 2  # the embed group's average, not head's [1, 0]
    assert torch.allclose(model.model.embed_tokens.weight, expected, atol=1e-7)
    assert torch.equal(model.model.norm.weight, a.model.model.norm.weight)  # the final norm is in the head group
    assert isinstance(result, Merged) and result.merge["weights"] == [0.5, 0.5]
    assert result.gate is None and result.promoted
    assert result.recipe()["gate"] == {"skipped": "merge.gate is off"} and result.recipe()["outcome"] == "merged"


def test_threshold_zero_never_falls_back_but_records_compat(family, probe):
    root, a, _, unrelated = family
    result = make_offspring(root, [a, unrelated], {"A": 1.0, "B": 0.0}, MergeConfig(method="ties"), probe=probe)
    assert isinstance(result, Merged) and result.merge["method"] == "ties"
    assert result.compat["compatible"] and result.compat["threshold"] == 0.0
    assert 0 < result.compat["cka"] < 1 and abs(result.compat["cosine"]) < 0.1
    assert result.gate is None and result.gate_skipped == "no evaluate_fn was given"
    assert not same_weights(result.partner, a)


def test_fallback_best_under_the_cka_threshold_copies_the_better_partner(family, probe):
    root, a, _, unrelated = family
    cfg = MergeConfig(method="linear", compat_threshold=0.99)
    result = make_offspring(root, [a, unrelated], {"A": 0.2, "B": 0.7}, cfg, probe=probe)
    assert type(result) is Copy and result.source == "B" and result.promoted
    assert same_weights(result.partner, unrelated) and result.partner.name == "offspring"
    assert result.reason.startswith("cka 0.") and "< merge.compat_threshold 0.99" in result.reason
    assert not result.compat["compatible"] and result.compat["cka"] < 0.99
    recipe = result.recipe()
    assert (recipe["method"], recipe["outcome"], recipe["fallback"]) == ("copy_best", "fallback", "best")
    assert recipe["gate"] == {"skipped": "partners incompatible"} and "mixture" not in recipe
    # compatible partners under the same threshold are merged
    kept = make_offspring(root, [a, perturbed(a, "B", 0.002, seed=20)], {"A": 0.2, "B": 0.7}, cfg, probe=probe)
    assert isinstance(kept, Merged) and kept.compat["cka"] >= 0.99


def test_fallback_mixture_maps_each_env_to_its_best_partner(family):
    root, a, _, unrelated = family
    cfg = MergeConfig(method="linear", compat_metric="cosine", compat_threshold=0.5, fallback="mixture")
    env_scores = {"A": {"Lake": 0.9, "MirrorLake": 0.6}, "B": {"Lake": 0.1, "MirrorLake": 0.7}}
    result = make_offspring(root, [a, unrelated], {"A": 0.75, "B": 0.4}, cfg, env_scores=env_scores)
    assert isinstance(result, Mixture) and same_weights(result.partner, a) and result.source == "A"
    assert result.reason.startswith("cosine ") and result.routing == {"Lake": "A", "MirrorLake": "B"}
    recipe = result.recipe()
    assert recipe["fallback"] == "mixture" and recipe["mixture"] == result.routing
    by_envs = make_offspring(root, [a, unrelated], {"A": 0.75, "B": 0.4}, cfg)
    assert by_envs.routing == {"Lake": "A", "MirrorLake": "B"}  # without scores: each partner's own envs


def test_cka_threshold_without_a_probe_is_a_user_error(family):
    root, a, b, _ = family
    with pytest.raises(ColearnError, match="merge.compat_metric=cosine"):
        make_offspring(root, [a, b], {"A": 0, "B": 0}, MergeConfig(compat_threshold=0.5))


def scorer(table: dict[str, float]):
    calls: list[str] = []

    def evaluate(partner: Partner) -> float:
        calls.append(partner.name)
        return table[partner.name]

    return evaluate, calls


@pytest.mark.parametrize("tolerance, passed", [(0.05, False), (0.15, True)])
def test_gate_rejects_an_offspring_worse_than_the_best_parent_by_more_than_the_tolerance(family, tolerance, passed):
    root, a, b, _ = family
    evaluate, calls = scorer({"A": 0.5, "B": 0.8, "offspring": 0.7})
    cfg = MergeConfig(method="linear", gate_tolerance=tolerance)
    # `scores` (the loop's numbers) say A is best; the gate re-scores the parents on the validation episodes.
    result = make_offspring(root, [a, b], {"A": 0.9, "B": 0.1}, cfg, evaluate_fn=evaluate)
    assert sorted(calls) == ["A", "B", "offspring"]
    gate = result.gate
    assert gate.offspring == 0.7 and gate.best_parent == 0.8 and gate.parents == {"A": 0.5, "B": 0.8}
    assert gate.passed is passed is result.promoted and gate.tolerance == tolerance
    assert result.recipe()["gate"] == {
        "offspring": 0.7,
        "best_parent": 0.8,
        "parents": {"A": 0.5, "B": 0.8},
        "tolerance": tolerance,
        "passed": passed,
        "fallback": gate.fallback,
    }
    if passed:
        assert isinstance(result, Merged) and gate.fallback is None and not same_weights(result.partner, b)
    else:
        assert type(result) is Copy and gate.fallback == "best" and result.recipe()["outcome"] == "fallback"
        assert result.source == "B" and same_weights(result.partner, b)
        assert result.reason == "offspring 0.7000 < best parent 0.8000 - merge.gate_tolerance 0.05"
        assert result.attempted["method"] == "linear" and result.recipe()["attempted"] == result.attempted


def test_method_none_and_single_partner_copy_the_best(family):
    root, a, b, _ = family
    result = make_offspring(root, [a, b], {"A": 0.1, "B": 0.3}, MergeConfig(method="none"))
    assert type(result) is Copy and result.compat is None and result.promoted and same_weights(result.partner, b)
    assert result.recipe() == {"method": "copy_best", "source": "B", "outcome": "copy"}
    alone = make_offspring(root, [a], {"A": 0.1}, MergeConfig(method="linear"))
    assert type(alone) is Copy and alone.source == "A" and same_weights(alone.partner, a)


def test_evolve_searches_on_search_fn_and_reports_held_out_scores(family):
    root, a, b, _ = family
    target = {k: 0.9 * v for k, v in dense_state(a).items()}  # closest: weight A high, B low, in every group

    def search_fn(partner: Partner) -> float:
        state = dense_state(partner)
        return -math.sqrt(sum(float(((state[k] - target[k]) ** 2).sum()) for k in target))

    evaluate, calls = scorer({"A": 0.5, "B": 0.5, "candidate": 0.6, "offspring": 0.6})
    cfg = MergeConfig(method="evolve", base_method="task_arithmetic", search_budget=12, seed=1)
    result = make_offspring(root, [a, b], {"A": 0, "B": 0}, cfg, evaluate_fn=evaluate, search_fn=search_fn)
    child, recipe = result.partner, result.merge
    search = recipe["search"]
    assert recipe["method"] == "evolve" and recipe["base_method"] == "task_arithmetic"
    assert len(search["curve"]) == 12 and search["fitness"] == search["curve"][-1]["best"]
    assert search["fitness"] > search["uniform_fitness"]
    assert search["fitness"] == pytest.approx(search_fn(child), rel=1e-6)  # the offspring is the best recipe
    assert set(recipe["groups"]) == {"embed", "block0.attn", "block0.mlp", "head"}
    assert search["heldout"] == 0.6 and search["heldout_uniform"] == 0.6
    assert sorted(calls) == ["A", "B", "candidate", "candidate"]  # the gate reuses the held-out score
    assert isinstance(result, Merged) and result.gate.passed and result.gate.offspring == 0.6
    with pytest.raises(ColearnError, match="search_fn"):
        make_offspring(root, [a, b], {"A": 0, "B": 0}, cfg)


def test_lora_partners_merge_their_folded_weights(corpus, model_cfg):
    from colearn.models.build import build_ancestor

    cfg = model_cfg.__class__(**{**model_cfg.__dict__, "lora_rank": 2})
    model, tokenizer = build_ancestor(cfg, *corpus, seed=0)
    root = Partner("ancestor", model, tokenizer, cfg)
    a, b = perturbed(root, "A", 0.02, seed=1), perturbed(root, "B", 0.02, seed=2)
    result = make_offspring(root, [a, b], {"A": 0, "B": 0}, MergeConfig(method="linear", gate=False))
    child = result.partner
    assert hasattr(child.model, "peft_config") and isinstance(result, Merged)
    assert result.lora == {"lora_offspring": "fold"} and result.recipe()["lora"] == result.lora
    merged, sa, sb = dense_state(child), dense_state(a), dense_state(b)
    for key in sa:
        assert torch.allclose(merged[key], (sa[key] + sb[key]) / 2, atol=1e-6), key


def test_a_folded_lora_offspring_draws_its_fresh_adapter_from_merge_seed(lora_root):
    # peft draws a fresh adapter's A factors from torch's global RNG: whatever state it is in, the offspring is the same
    a = perturbed_adapter(lora_root, "A", 0.05, seed=1)
    b = perturbed_adapter(lora_root, "B", 0.05, seed=2)
    children = []
    for global_seed, merge_seed in ((1, 0), (2, 0), (1, 7)):
        torch.manual_seed(global_seed)
        cfg = MergeConfig(method="linear", gate=False, seed=merge_seed)
        children.append(make_offspring(lora_root, [a, b], {"A": 0, "B": 0}, cfg).partner.model.state_dict())
    same, other_seed = children[1], children[2]
    assert all(torch.equal(children[0][k], same[k]) for k in same)
    assert any(not torch.equal(children[0][k], other_seed[k]) for k in other_seed if "lora_A" in k)


def perturbed_adapter(partner: Partner, name: str, scale: float, seed: int, only: str = "lora_") -> Partner:
    """A copy whose LoRA factors (the names containing `only`) moved, as training moves them; the base is frozen."""
    child = partner.clone(name)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, param in child.model.named_parameters():
            if only in key:
                param.add_(scale * torch.randn(param.shape, generator=generator))
    return child


@pytest.fixture(scope="module")
def lora_root(corpus, model_cfg) -> Partner:
    from colearn.models.build import build_ancestor

    cfg = model_cfg.__class__(**{**model_cfg.__dict__, "lora_rank": 2})
    model, tokenizer = build_ancestor(cfg, *corpus, seed=0)
    return Partner("ancestor", model, tokenizer, cfg)


def frozen_base(partner: Partner) -> dict[str, torch.Tensor]:
    import copy

    return copy.deepcopy(partner.model).unload().state_dict()


def test_lora_offspring_kept_as_adapter_is_exact_when_the_change_fits_the_rank(lora_root):
    # Only B factors move and A stays shared, so the averaged change (mean B) @ A has the adapter's rank.
    a = perturbed_adapter(lora_root, "A", 0.05, seed=1, only="lora_B")
    b = perturbed_adapter(lora_root, "B", 0.05, seed=2, only="lora_B")
    cfg = MergeConfig(method="linear", gate=False, lora_offspring="adapter")
    result = make_offspring(lora_root, [a, b], {"A": 0, "B": 0}, cfg)
    child = result.partner
    assert result.lora["lora_offspring"] == "adapter" and result.lora["rank"] == 2
    assert result.lora["truncation_error"] < 1e-5
    base, kept = frozen_base(lora_root), frozen_base(child)
    assert all(torch.equal(base[k], kept[k]) for k in base)  # the base is untouched
    merged, sa, sb = dense_state(child), dense_state(a), dense_state(b)
    assert all(torch.allclose(merged[k], (sa[k] + sb[k]) / 2, atol=1e-5) for k in sa)


def test_lora_offspring_kept_as_adapter_truncates_to_the_best_rank_r_change(lora_root):
    a = perturbed_adapter(lora_root, "A", 0.3, seed=3)
    b = perturbed_adapter(lora_root, "B", 0.3, seed=4)
    cfg = MergeConfig(method="linear", gate=False, lora_offspring="adapter")
    result = make_offspring(lora_root, [a, b], {"A": 0, "B": 0}, cfg)
    base, merged = frozen_base(lora_root), dense_state(result.partner)
    sa, sb = dense_state(a), dense_state(b)
    residual = total = 0.0
    for key in sa:
        change = (sa[key] + sb[key]) / 2 - base[key]
        if change.abs().max() == 0:
            assert torch.equal(merged[key], base[key])
            continue
        singular = torch.linalg.svdvals(change.double())  # Eckart-Young: the best rank-2 error is the tail
        residual += float(singular[2:].square().sum())
        total += float(singular.square().sum())
        got = merged[key] - base[key]
        assert float((got - change).norm()) == pytest.approx(float(singular[2:].norm()), rel=1e-3, abs=1e-6), key
    assert residual > 0  # two rank-2 changes do not fit rank 2
    assert result.lora["truncation_error"] == pytest.approx(math.sqrt(residual / total), rel=1e-3)


def test_lora_offspring_as_adapter_refuses_a_merge_that_changed_the_base(lora_root):
    a, b = perturbed(lora_root, "A", 0.02, seed=1), perturbed(lora_root, "B", 0.02, seed=2)  # base moved too
    cfg = MergeConfig(method="linear", gate=False, lora_offspring="adapter")
    with pytest.raises(ColearnError, match="merge.lora_offspring=fold"):
        make_offspring(lora_root, [a, b], {"A": 0, "B": 0}, cfg)
