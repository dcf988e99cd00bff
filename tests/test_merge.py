"""Tests of colearn.merging.merge and colearn.merging.lora_merge.

Operators on hand-computed cases, recipes and their errors, layer groups, streaming, LoRA.
"""

from __future__ import annotations

import copy
import math
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from colearn.merging.lora_merge import fold_into_base, lora_deltas, lora_scaling, merge_lora, refactorize
from colearn.merging.merge import Recipe, group_names, layer_group, merge_state_dicts, merge_tensor
from colearn.merging.operators import (
    METHODS,
    MergeError,
    default_weights,
    della_keep_probabilities,
    get_method,
    merge_task_vectors,
    model_stock_ratio,
)
from colearn.merging.streaming import merge_safetensors_files

torch.set_num_threads(1)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def w(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def op(method: str):
    """The whole-tensor form of an operator: (deltas, weights, density, seed, **params) -> merged delta."""
    return lambda deltas, weights, density, seed, **params: merge_task_vectors(
        method, deltas, weights, density, seed, **params
    )


def stock_ratio(deltas: list[torch.Tensor]) -> float:
    stacked = torch.stack(deltas).double()
    return model_stock_ratio(stacked @ stacked.T)


def breadcrumbs_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    return merge_task_vectors("breadcrumbs", [delta], [1.0], density, gamma=gamma) != 0


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=50,
    )
    return LlamaForCausalLM(config)


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=50, n_positions=16))


def perturbed(state: dict[str, torch.Tensor], seed: int, scale: float = 0.01) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=generator) for k, v in state.items()}


@pytest.fixture(scope="module")
def llama_state() -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in tiny_llama().state_dict().items()}


# --------------------------------------------------------------------------- operators, by hand


def test_linear_is_weighted_average_and_task_arithmetic_weighted_sum():
    a, b = t(1, 2, 3), t(-1, 0, 5)
    assert torch.allclose(op("linear")([a, b], w(1, 3), 1.0, 0), (a + 3 * b) / 4)
    assert torch.allclose(op("task_arithmetic")([a, b], w(1, 3), 1.0, 0), a + 3 * b)


def test_linear_rejects_weights_summing_to_zero():
    with pytest.raises(MergeError, match="merge.weights"):
        op("linear")([t(1.0), t(2.0)], w(1, -1), 1.0, 0)


def test_ties_elects_signs_by_hand():
    a, b, c = t(1, -2, 3), t(-3, 0.5, 2), t(2, 1.5, -0.5)
    # density 2/3 keeps 2 of 3: a -> [0,-2,3], b -> [-3,0,2], c -> [2,1.5,0]
    # total-mass signs [-1,-0.5,5] -> [-, -, +]; disjoint means over agreeing partners:
    assert torch.allclose(op("ties")([a, b, c], w(1, 1, 1), 2 / 3, 0), t(-3, -2, 2.5))
    # weights scale before the disjoint mean (signs are elected unweighted): [0,-4,6], [-3,0,2], [2,1.5,0]
    assert torch.allclose(op("ties")([a, b, c], w(2, 1, 1), 2 / 3, 0), t(-3, -4, 4))


def test_ties_frequency_sign_election_by_hand():
    a, b, c = t(1, -2, 3), t(-3, 1, 1), t(1, 2, -1)
    # total mass [-1,1,3] -> [-,+,+]: coordinate 0 keeps only b
    assert torch.allclose(op("ties")([a, b, c], w(1, 1, 1), 1.0, 0), t(-3, 1.5, 2))
    # sign counts [1,1,1] -> all +: coordinate 0 keeps a and c
    merged = op("ties")([a, b, c], w(1, 1, 1), 1.0, 0, majority_sign_method="frequency")
    assert torch.allclose(merged, t(1, 1.5, 2))
    with pytest.raises(MergeError, match="majority_sign_method"):
        op("ties")([a, b], w(1, 1), 1.0, 0, majority_sign_method="vote")


def test_magnitude_prune_keeps_top_magnitudes_by_hand():
    a, b = t(1, -2, 3, -4), t(4, 3, -2, 1)
    merged = op("magnitude_prune")([a, b], w(2, 1), 0.5, 0)
    assert torch.allclose(merged, 2 * t(0, 0, 3, -4) + t(4, 3, 0, 0))


def test_dare_is_unbiased_and_reproducible():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(1000, generator=generator), torch.randn(1000, generator=generator)
    weights = w(0.7, 0.5)
    dare = op("dare_linear")
    rng_before = torch.get_rng_state()
    draws = torch.stack([dare([a, b], weights, 0.3, seed) for seed in range(400)])  # (400, 1000)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG is untouched
    expected = 0.7 * a + 0.5 * b
    assert (draws.mean(0) - expected).norm() / expected.norm() < 0.15
    kept = (draws[0] != 0).float().mean()
    assert 0.4 < kept < 0.6  # two partners at density 0.3: 1 - 0.7^2 = 0.51 of coordinates survive
    assert torch.equal(dare([a, b], weights, 0.3, 7), dare([a, b], weights, 0.3, 7))
    assert not torch.equal(dare([a, b], weights, 0.3, 7), dare([a, b], weights, 0.3, 8))
    dare_ties = op("dare_ties")
    assert torch.equal(dare_ties([a, b], weights, 0.3, 7), dare_ties([a, b], weights, 0.3, 7))


def test_dare_draws_what_peft_draws_from_the_same_seed():
    from peft.utils import merge_utils

    generator = torch.Generator().manual_seed(1)
    deltas = [torch.randn(3000, generator=generator) for _ in range(3)]
    weights = w(0.7, -0.5, 1.2)
    for method in ("total", "frequency"):
        torch.manual_seed(5)
        want = merge_utils.dare_ties([d.clone() for d in deltas], weights, 0.4, method)
        assert torch.allclose(op("dare_ties")(deltas, weights, 0.4, 5, majority_sign_method=method), want, atol=1e-6)
    torch.manual_seed(5)
    want = merge_utils.dare_linear([d.clone() for d in deltas], weights, 0.4)
    assert torch.allclose(op("dare_linear")(deltas, weights, 0.4, 5), want, atol=1e-6)


def test_slerp_endpoints_midpoint_and_fallbacks():
    slerp, linear = op("slerp"), op("linear")
    a, b = t(1, 0), t(0, 1)
    assert torch.allclose(slerp([a, b], w(1, 0), 1.0, 0), a, atol=1e-6)
    assert torch.allclose(slerp([a, b], w(0, 1), 1.0, 0), b, atol=1e-6)
    midpoint = slerp([a, b], w(1, 1), 1.0, 0)
    assert torch.allclose(midpoint, t(math.sqrt(0.5), math.sqrt(0.5)), atol=1e-6)
    assert midpoint.norm() == pytest.approx(1.0, abs=1e-6)
    assert linear([a, b], w(1, 1), 1.0, 0).norm() == pytest.approx(math.sqrt(0.5), abs=1e-6)
    # colinear or zero task vectors have no angle: linear
    assert torch.allclose(slerp([t(1, 0), t(2, 0)], w(1, 1), 1.0, 0), t(1.5, 0))
    assert torch.allclose(slerp([t(0, 0), t(2, 2)], w(3, 1), 1.0, 0), t(0.5, 0.5))
    with pytest.raises(MergeError, match="exactly 2 partners"):
        slerp([a, b, a], w(1, 1, 1), 1.0, 0)


def test_breadcrumbs_masks_both_tails():
    delta = t(5, -1, 9, 3, -7, 2, 8, -4, 6, -10)
    # drop the top 10% (|10|), keep the next 50% (|9|..|5|), drop the small tail (|4|..|1|)
    mask = breadcrumbs_mask(delta, density=0.5, gamma=0.1)
    assert mask.tolist() == [True, False, True, False, True, False, True, False, True, False]
    merged = op("breadcrumbs")([delta], w(2), 0.5, 0, gamma=0.1)
    assert torch.equal(merged, 2 * delta * mask)
    with pytest.raises(MergeError, match="merge.params.gamma"):
        op("breadcrumbs")([delta], w(1), 0.5, 0, gamma=1.0)


def test_model_stock_interpolates_between_ancestor_and_average():
    model_stock = op("model_stock")
    delta = t(1, 2, 3)
    assert torch.allclose(model_stock([delta, delta.clone()], w(1, 1), 1.0, 0), delta)  # cos 1: t = 1
    assert torch.allclose(model_stock([t(1, 0), t(0, 1)], w(1, 1), 1.0, 0), t(0, 0))  # cos 0: the ancestor
    # cos 0.5: t = 2 * 0.5 / (1 + 0.5) = 2/3; N = 3 all at 60 degrees: t = 1.5 / 2 = 0.75
    assert stock_ratio([t(1, 0), t(0.5, math.sqrt(0.75))]) == pytest.approx(2 / 3, abs=1e-6)
    third = [t(1, 0, 0), t(0.5, math.sqrt(0.75), 0), t(0.5, math.sqrt(0.75) / 3, math.sqrt(2 / 3))]
    assert stock_ratio(third) == pytest.approx(0.75, abs=1e-5)
    assert stock_ratio([t(1, 0), t(-1, 0)]) == 0.0  # opposed: back to the ancestor


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("part", [1 << 21, 20_000])  # one sort, or value ranges sorted one at a time
def test_ascending_order_equals_numpy_stable_argsort(dtype, part, monkeypatch):
    # DELLA's magnitude order (colearn.merging.operators.ascending_order), with ties, zeros (repeated cut values)
    # and a NaN
    import colearn.merging.operators
    from colearn.merging.operators import ascending_order

    monkeypatch.setattr(colearn.merging.operators, "_SORT_PART", part)
    generator = torch.Generator().manual_seed(6)
    magnitudes = torch.randn(300_007, generator=generator, dtype=dtype).abs()
    magnitudes[::7], magnitudes[::11], magnitudes[5] = 0.0, 0.5, math.nan
    parts = list(ascending_order(magnitudes))
    assert (len(parts) > 10) == (part < magnitudes.numel())
    expected = np.argsort(magnitudes.numpy(), kind="stable")
    assert np.array_equal(torch.cat(parts).numpy(), expected)


def test_della_keep_probabilities_by_hand_and_unbiased():
    delta = t(3, -1, 5, 2, -4)  # magnitude ranks 2, 0, 4, 1, 3
    keep = della_keep_probabilities(delta, density=0.5, epsilon=0.2)
    assert torch.allclose(keep, t(0.5, 0.4, 0.6, 0.45, 0.55))
    assert torch.equal(della_keep_probabilities(delta, density=1.0, epsilon=0.2), torch.ones(5))  # window narrows
    della = op("della")
    generator = torch.Generator().manual_seed(1)
    big = torch.randn(1000, generator=generator)
    # one partner has no sign conflicts: the mean over seeds is the weighted delta
    draws = torch.stack([della([big], w(0.5), 0.4, seed, epsilon=0.3) for seed in range(400)])  # (400, 1000)
    assert (draws.mean(0) - 0.5 * big).norm() / (0.5 * big).norm() < 0.2
    # larger magnitudes survive more often
    kept = (draws != 0).float().mean(0)  # (1000,)
    order = big.abs().argsort()
    assert kept[order[-200:]].mean() > kept[order[:200]].mean() + 0.15
    assert torch.equal(della([big, -big], w(1, 1), 0.4, 3), della([big, -big], w(1, 1), 0.4, 3))


def test_magnitude_trimming_matches_peft_topk_on_large_tensors():
    # Large enough that thresholds come from the sampled bracket, not a whole-tensor kthvalue.
    from peft.utils import merge_utils

    generator = torch.Generator().manual_seed(0)
    n = 300_000
    deltas = [torch.randn(n, generator=generator) * scale for scale in (1.0, 0.3, 2.0)]
    deltas[1][::7] = 0.0  # exact zeros, as in weights a partner never changed
    weights = w(1.0, 0.7, 1.3)
    for density in (0.05, 0.5, 0.93):
        assert torch.allclose(
            op("ties")(deltas, weights, density, 0), merge_utils.ties(deltas, weights, density), atol=1e-6
        )
        assert torch.allclose(
            op("magnitude_prune")(deltas, weights, density, 0),
            merge_utils.magnitude_prune(deltas, weights, density),
            atol=1e-6,
        )
    frequency = op("ties")(deltas, weights, 0.5, 0, majority_sign_method="frequency")
    assert torch.allclose(frequency, merge_utils.ties(deltas, weights, 0.5, "frequency"), atol=1e-6)


@pytest.mark.parametrize("method", ["ties", "magnitude_prune", "breadcrumbs"])
def test_a_missed_bracket_still_gives_the_exact_trim(method, monkeypatch):
    # Brackets are guessed from a sample; force every guess wrong and the merge must not change.
    import colearn.merging.trimming

    generator = torch.Generator().manual_seed(3)
    deltas = [torch.randn(300_000, generator=generator) for _ in range(2)]
    right = op(method)(deltas, w(1.0, 1.0), 0.4, 0)
    monkeypatch.setattr(
        colearn.merging.trimming, "_bracket", lambda sample, n, k: (5.0, 6.0)
    )  # above every |x| ~ N(0,1)
    assert torch.allclose(op(method)(deltas, w(1.0, 1.0), 0.4, 0), right, atol=1e-6)
    if method == "ties":
        from peft.utils import merge_utils

        assert torch.allclose(right, merge_utils.ties(deltas, w(1.0, 1.0), 0.4), atol=1e-6)


def breadcrumbs_by_sorting(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs by a full sort: the delta where its magnitude ranks below the top gamma and within the
    next density fraction (by hand, for tensors whose magnitudes don't tie)."""
    n = delta.numel()
    n_top = round(gamma * n)
    n_keep = min(round(density * n), n - n_top)
    order = delta.abs().argsort(descending=True)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[n_top : n_top + n_keep]] = True
    return delta * mask


LARGE_CASES = [
    ("ties", 0.3, {}),
    ("ties", 0.7, {"majority_sign_method": "frequency"}),
    ("magnitude_prune", 0.5, {}),
    ("breadcrumbs", 0.6, {"gamma": 0.05}),
    ("model_stock", 1.0, {}),
    ("task_arithmetic", 1.0, {}),
]


def reference_merge(
    method: str, deltas: list[torch.Tensor], weights: list[float], density: float, params: dict
) -> torch.Tensor:
    """The merged task vector by peft's merge_utils on whole tensors, or by hand where peft has no such method."""
    from peft.utils import merge_utils

    w_ = torch.tensor(weights)
    if method == "ties":
        return merge_utils.ties(deltas, w_, density, params.get("majority_sign_method", "total"))
    if method == "magnitude_prune":
        return merge_utils.magnitude_prune(deltas, w_, density)
    if method == "task_arithmetic":
        return merge_utils.task_arithmetic(deltas, w_)
    if method == "breadcrumbs":
        return sum(wi * breadcrumbs_by_sorting(d, density, params["gamma"]) for wi, d in zip(weights, deltas))
    assert method == "model_stock"
    stacked = torch.stack(deltas).double()
    ratio = model_stock_ratio(stacked @ stacked.T)
    return (ratio * (w_.double() / w_.sum()) @ stacked).float()


@pytest.mark.parametrize(("method", "density", "params"), LARGE_CASES)
@pytest.mark.parametrize("missed", [False, True])
def test_large_tensor_merges_equal_peft_or_a_hand_computation(method, density, params, missed, monkeypatch):
    # Through merge_tensor on a tensor large enough for sampled trim brackets and many chunks, with a step toward
    # the ancestor, unequal weights, three partners and exact zeros; and with every bracket forced wrong.
    import colearn.merging.trimming

    n = 300_003
    generator = torch.Generator().manual_seed(4)
    # Integers plus multiples of 2**-e below 1: every partner - ancestor is exact in float32 and the magnitudes of a
    # task vector are distinct, so peft's top-k and a threshold keep the same elements.
    ancestor = torch.randint(-8, 8, (n,), generator=generator).float()
    partners = []
    for exponent in (20, 21, 19):
        magnitudes = (torch.randperm(n, generator=generator) + 1).float() * 2.0**-exponent
        signs = torch.randint(0, 2, (n,), generator=generator).float() * 2 - 1
        partners.append(ancestor + signs * magnitudes)
    partners[1][::5] = ancestor[::5]  # a partner that left some weights unchanged
    if missed:
        monkeypatch.setattr(colearn.merging.trimming, "_bracket", lambda sample, n, k: (5.0, 6.0))
    # weights summing past 1 for ties (a full step) and task_arithmetic (not a convex combination of the models)
    weights = [1.0, 0.6, 1.4] if method in ("ties", "task_arithmetic") else [0.3, 0.2, 0.5]
    recipe = Recipe(method, weights, density, to_ancestor=0.25, params=params)
    unchanged = [t.clone() for t in (ancestor, *partners)]
    merged = merge_tensor("w", ancestor, partners, recipe)
    assert all(torch.equal(a, b) for a, b in zip(unchanged, (ancestor, *partners)))  # inputs are read, never written
    expected = ancestor + 0.75 * reference_merge(method, [p - ancestor for p in partners], weights, density, params)
    diff = (merged - expected).abs()
    assert float(diff.max()) <= 1e-6, (float(diff.max()), int((diff > 1e-6).sum()))
    assert not torch.equal(merged, ancestor)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_count_pass_counts_above_and_collects_inside_each_bracket(dtype):
    from colearn.merging.task_vectors import TaskVectors
    from colearn.merging.trimming import _count_pass

    generator = torch.Generator().manual_seed(6)
    n = 600_007  # not a multiple of the chunk size
    base = torch.randn(n, generator=generator, dtype=dtype)
    partners = [base + torch.randn(n, generator=generator, dtype=dtype) * s for s in (0.1, 0.2, 0.3)]
    partners[0][::3] = base[::3]  # zeros are never inside, even in a bracket reaching 0
    brackets = [[(0.0, 0.05), (0.1, 0.12)], [(0.2, 0.21), (0.3, 0.5)], [(0.3, 0.3), (9.0, 10.0)]]
    above, inside = _count_pass(TaskVectors(partners, base, dtype), brackets)
    for i, partner in enumerate(partners):
        magnitude = (partner - base).abs()
        for j, (low, high) in enumerate(brackets[i]):
            expected = magnitude[(magnitude >= low) & (magnitude <= high) & (magnitude != 0)]
            assert above[i][j] == int((magnitude > high).sum())
            assert torch.equal(inside[i][j].sort().values, expected.sort().values)
    assert inside[0][0].numel() > 0 and inside[2][1].numel() == 0


@pytest.mark.parametrize("chunk_size", [4096, 1 << 17])
def test_gram_matrix_equals_float64_dot_products(chunk_size):
    from colearn.merging.task_vectors import TaskVectors, gram_matrix

    generator = torch.Generator().manual_seed(5)
    base = torch.randn(300_001, generator=generator)
    partners = [base + torch.randn(300_001, generator=generator) * s for s in (0.1, 0.2)]
    gram = gram_matrix(TaskVectors(partners, base, torch.float32, chunk_size=chunk_size))
    stacked = torch.stack([p.double() - base.double() for p in partners])
    exact = stacked @ stacked.T  # the float32 differences, summed in float64
    assert torch.allclose(gram, exact, rtol=0, atol=1e-5 * float(exact.diagonal().max()))  # float32 chunk sums


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_merge_runs_on_its_inputs_device_with_the_cpu_code(method):
    # One implementation: on a GPU the merge stays there and equals the CPU's (random operators draw from the GPU's
    # generator, so they are compared with themselves)
    from colearn.merging.operators import RANDOM_METHODS

    generator = torch.Generator().manual_seed(8)
    ancestor = torch.randn(300_007, generator=generator)
    partners = [ancestor + 0.01 * torch.randn(300_007, generator=generator) for _ in range(2)]
    params = {"gamma": 0.05} if method == "breadcrumbs" else {}
    recipe = Recipe(method, default_weights(method, 2), 0.4, params=params, seed=1)
    on_gpu = merge_tensor("w", ancestor.cuda(), [p.cuda() for p in partners], recipe)
    assert on_gpu.device.type == "cuda"
    if method in RANDOM_METHODS:
        assert torch.equal(on_gpu, merge_tensor("w", ancestor.cuda(), [p.cuda() for p in partners], recipe))
    else:
        assert torch.allclose(on_gpu.cpu(), merge_tensor("w", ancestor, partners, recipe), rtol=0, atol=1e-6)
    if method == "ties":
        from peft.utils import merge_utils

        deltas = [p.cuda() - ancestor.cuda() for p in partners]
        expected = ancestor.cuda() + merge_utils.ties(deltas, torch.ones(2, device="cuda"), 0.4)
        assert torch.allclose(on_gpu, expected, rtol=0, atol=1e-6)


def test_sign_election_tie_goes_to_plus_as_in_peft():
    a, b = t(1, -2, 0), t(-1, 2, 0)  # every coordinate's votes sum to 0
    assert torch.equal(op("ties")([a, b], w(1, 1), 1.0, 0), t(1, 2, 0))


def test_magnitude_thresholds_are_exact_k_th_largest():
    from colearn.merging.task_vectors import TaskVectors
    from colearn.merging.trimming import magnitude_thresholds

    generator = torch.Generator().manual_seed(1)
    heavy = torch.distributions.StudentT(1.5).sample((400_000,))  # heavy tails
    ties_ = torch.randint(0, 5, (400_000,), generator=generator).float()  # five distinct magnitudes
    base = torch.randn(400_000, generator=generator)
    unchanged = base + torch.randn(400_000, generator=generator) * (torch.rand(400_000, generator=generator) < 0.3)
    ks = [0, 1, 1000, 200_000, 399_999, 400_000]
    cases = [
        (TaskVectors([heavy, ties_], None, torch.float32, chunk_size=4096), [heavy, ties_]),
        (TaskVectors([unchanged], base, torch.float32), [unchanged - base]),
    ]  # 70% of it zeros
    for tv, deltas in cases:
        got = magnitude_thresholds(tv, ks)
        for i, tensor in enumerate(deltas):
            ordered = tensor.abs().sort(descending=True).values
            assert got[i] == [math.inf] + [float(ordered[k - 1]) for k in ks[1:]]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_chunking_changes_nothing_but_random_draws(method):
    from colearn.merging.operators import RANDOM_METHODS, merged_chunks
    from colearn.merging.task_vectors import TaskVectors

    generator = torch.Generator().manual_seed(2)
    base = torch.randn(5000, generator=generator)
    partners = [base + 0.1 * torch.randn(5000, generator=generator) for _ in range(2)]
    weights = torch.tensor(default_weights(method, 2))

    def merged(chunk_size: int) -> torch.Tensor:
        tv = TaskVectors(partners, base, torch.float32, chunk_size=chunk_size)
        out = torch.empty(5000)
        for where, _, m in merged_chunks(method, tv, weights, 0.5, seed=0):
            out[where] = m
        return out

    whole, chunked = merged(5000), merged(333)
    if method in RANDOM_METHODS:
        assert torch.equal(chunked, merged(333))  # reproducible for one chunk size
    else:
        assert torch.allclose(whole, chunked, atol=1e-6)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_identical_partners_return_the_partner(method, llama_state):
    ancestor = {k: v for k, v in list(llama_state.items())[:6]}
    partner = perturbed(ancestor, seed=1)
    params = {"gamma": 0.0} if method == "breadcrumbs" else {}
    merged = merge_state_dicts(
        ancestor, [partner, partner], Recipe(method, default_weights(method, 2), 1.0, params=params)
    )
    for key in ancestor:
        assert torch.allclose(merged[key], partner[key], atol=1e-6), key


# --------------------------------------------------------------------------- recipes and errors


def test_to_ancestor_interpolates_toward_the_ancestor(llama_state):
    partners = [perturbed(llama_state, 1), perturbed(llama_state, 2)]
    full = merge_state_dicts(llama_state, partners, Recipe("linear", [0.5, 0.5]))
    back = merge_state_dicts(llama_state, partners, Recipe("ties", [1, 1], 0.5, to_ancestor=1.0))
    half = merge_state_dicts(llama_state, partners, Recipe("linear", [0.5, 0.5], to_ancestor=0.5))
    for key, ancestor in llama_state.items():
        assert torch.equal(back[key], ancestor)
        assert torch.allclose(half[key] - ancestor, 0.5 * (full[key] - ancestor), atol=1e-6)


def test_unknown_method_lists_known_ones():
    with pytest.raises(MergeError, match=r"merge.method='average' is unknown; choose one of \['breadcrumbs'"):
        get_method("average")
    with pytest.raises(MergeError, match="merge.method"):
        merge_state_dicts({"x": t(1)}, [{"x": t(2)}], Recipe("average", [1.0]))


def test_shape_mismatch_names_the_first_tensor():
    ancestor = {"model.layers.0.mlp.up_proj.weight": torch.zeros(64, 256), "model.norm.weight": torch.zeros(4)}
    good = {k: v.clone() for k, v in ancestor.items()}
    bad = {"model.layers.0.mlp.up_proj.weight": torch.zeros(64, 128), "model.norm.weight": torch.zeros(3)}
    message = (
        "partner 1 tensor 'model.layers.0.mlp.up_proj.weight' has shape (64, 128) but the ancestor has (64, 256): "
        "partners must share the ancestor's architecture"
    )
    with pytest.raises(MergeError) as error:
        merge_state_dicts(ancestor, [good, bad], Recipe("linear", [0.5, 0.5]))
    assert str(error.value) == message
    with pytest.raises(MergeError, match="partner 0 lacks tensor 'model.norm.weight'"):
        merge_state_dicts(
            ancestor, [{"model.layers.0.mlp.up_proj.weight": torch.zeros(64, 256)}], Recipe("linear", [1.0])
        )
    with pytest.raises(MergeError, match="has shape"):
        merge_tensor("x", torch.zeros(2), [torch.zeros(3)], Recipe("linear", [1.0]))


@pytest.mark.parametrize("density", [0.0, 1.5, float("nan")])
def test_bad_density_names_merge_density(density):
    with pytest.raises(MergeError, match=r"merge\.density"):
        merge_state_dicts({"x": t(1)}, [{"x": t(2)}, {"x": t(3)}], Recipe("ties", [1, 1], density))


@pytest.mark.parametrize("weights", [[1.0], [0.0, 0.0], [1.0, float("inf")]])
def test_bad_weights_name_merge_weights(weights):
    with pytest.raises(MergeError, match=r"merge\.weights"):
        merge_state_dicts({"x": t(1)}, [{"x": t(2)}, {"x": t(3)}], Recipe("linear", weights))


def test_bad_params_and_groups_name_the_field():
    sd = {"model.layers.0.mlp.up_proj.weight": t(1, 2)}
    partners = [{k: v + 1 for k, v in sd.items()}] * 2
    with pytest.raises(MergeError, match=r"merge.params.gamma is not a parameter of merge.method='ties'"):
        merge_state_dicts(sd, partners, Recipe("ties", [1, 1], params={"gamma": 0.1}))
    with pytest.raises(MergeError, match=r"merge.groups\['block\*.mlp'\].density"):
        merge_state_dicts(sd, partners, Recipe("ties", [1, 1], groups={"block*.mlp": {"density": 2.0}}))
    with pytest.raises(MergeError, match=r"merge.groups\['blok\*'\] matches no layer group"):
        merge_state_dicts(sd, partners, Recipe("ties", [1, 1], groups={"blok*": {"density": 0.5}}))
    with pytest.raises(MergeError, match=r"merge.to_ancestor"):
        merge_state_dicts(sd, partners, Recipe("linear", [1, 1], to_ancestor=1.5))


def test_group_override_applies_only_to_matching_keys(llama_state):
    partners = [perturbed(llama_state, 1), perturbed(llama_state, 2)]
    groups = {"block*.mlp": {"weights": [1.0, 0.0]}, "embed": {"to_ancestor": 1.0}}
    merged = merge_state_dicts(llama_state, partners, Recipe("linear", [0.5, 0.5], groups=groups))
    for key, ancestor in llama_state.items():
        group = layer_group(key)
        if group.endswith(".mlp"):
            expected = partners[0][key]
        elif group == "embed":
            expected = ancestor
        else:
            expected = ancestor + 0.5 * (partners[0][key] - ancestor) + 0.5 * (partners[1][key] - ancestor)
        assert torch.allclose(merged[key], expected, atol=1e-6), key
    # later patterns win and method params can be overridden per group
    sd = {"model.layers.0.mlp.up_proj.weight": t(5, -1, 9, 3, -7, 2, 8, -4, 6, -10), "lm_head.weight": t(1, 2)}
    zeros = {k: torch.zeros_like(v) for k, v in sd.items()}
    groups = {"block*": {"gamma": 0.5}, "block0.mlp": {"gamma": 0.1}}
    merged = merge_state_dicts(zeros, [sd], Recipe("breadcrumbs", [1.0], 0.5, params={"gamma": 0.0}, groups=groups))
    key = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(merged[key], sd[key] * breadcrumbs_mask(sd[key], 0.5, 0.1))
    assert torch.equal(merged["lm_head.weight"], t(0, 2))


def test_non_float_buffers_are_copied_and_must_agree():
    ancestor = {"w": t(0, 0), "ids": torch.arange(3)}
    partners = [{"w": t(1, 1), "ids": torch.arange(3)}, {"w": t(3, 3), "ids": torch.arange(3)}]
    merged = merge_state_dicts(ancestor, partners, Recipe("linear", [0.5, 0.5]))
    assert torch.equal(merged["ids"], torch.arange(3)) and torch.equal(merged["w"], t(2, 2))
    partners[1]["ids"] = torch.tensor([0, 1, 5])
    with pytest.raises(MergeError, match="'ids' is not floating point"):
        merge_state_dicts(ancestor, partners, Recipe("linear", [0.5, 0.5]))


def test_dtype_is_preserved_and_seeds_do_not_depend_on_key_order(llama_state):
    ancestor = {k: v.to(torch.bfloat16) for k, v in list(llama_state.items())[:5]}
    partners = [perturbed(ancestor, 1), perturbed(ancestor, 2)]
    merged = merge_state_dicts(ancestor, partners, Recipe("dare_ties", [1, 1], 0.5, seed=3))
    assert all(v.dtype == torch.bfloat16 for v in merged.values())
    reverse = lambda sd: dict(reversed(list(sd.items())))  # noqa: E731
    again = merge_state_dicts(
        reverse(ancestor), [reverse(p) for p in partners], Recipe("dare_ties", [1, 1], 0.5, seed=3)
    )
    assert all(torch.equal(merged[k], again[k]) for k in merged)
    other = merge_state_dicts(ancestor, partners, Recipe("dare_ties", [1, 1], 0.5, seed=4))
    assert any(not torch.equal(merged[k], other[k]) for k in merged)


# --------------------------------------------------------------------------- layer groups


def test_layer_group_on_llama_names(llama_state):
    groups = {k: layer_group(k) for k in llama_state}
    assert groups["model.embed_tokens.weight"] == "embed"
    assert groups["model.layers.0.self_attn.q_proj.weight"] == "block0.attn"
    assert groups["model.layers.1.self_attn.o_proj.weight"] == "block1.attn"
    assert groups["model.layers.0.input_layernorm.weight"] == "block0.attn"
    assert groups["model.layers.0.post_attention_layernorm.weight"] == "block0.mlp"
    assert groups["model.layers.1.mlp.down_proj.weight"] == "block1.mlp"
    assert groups["model.norm.weight"] == "head" and groups["lm_head.weight"] == "head"
    assert set(groups.values()) == {"embed", "block0.attn", "block0.mlp", "block1.attn", "block1.mlp", "head"}
    assert group_names(llama_state) == ["embed", "block0.attn", "block0.mlp", "block1.attn", "block1.mlp", "head"]
    assert layer_group("base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight") == "block3.attn"
    assert layer_group("model.rotary_emb.inv_freq") == "other"


def test_layer_group_on_gpt2_names():
    groups = {k: layer_group(k) for k in tiny_gpt2().state_dict()}
    assert groups["transformer.wte.weight"] == "embed" and groups["transformer.wpe.weight"] == "embed"
    assert groups["transformer.h.0.ln_1.weight"] == "block0.attn"
    assert groups["transformer.h.0.attn.c_attn.weight"] == "block0.attn"
    assert groups["transformer.h.1.attn.c_proj.bias"] == "block1.attn"
    assert groups["transformer.h.0.ln_2.bias"] == "block0.mlp"
    assert groups["transformer.h.1.mlp.c_proj.weight"] == "block1.mlp"
    assert groups["transformer.ln_f.weight"] == "head" and groups["lm_head.weight"] == "head"
    assert "other" not in groups.values()


def test_group_names_sort_blocks_by_depth():
    keys = [f"model.layers.{i}.mlp.up_proj.weight" for i in (10, 2, 0)] + ["lm_head.weight", "weird"]
    assert group_names(keys) == ["block0.mlp", "block2.mlp", "block10.mlp", "head", "other"]


# --------------------------------------------------------------------------- streaming


def test_merge_safetensors_files_equals_merge_state_dicts(tmp_path, llama_state):
    partners = [perturbed(llama_state, 1), perturbed(llama_state, 2)]
    paths = [str(tmp_path / f"{name}.safetensors") for name in ("ancestor", "p0", "p1")]
    for path, state in zip(paths, [llama_state, *partners]):
        save_file({k: v.contiguous() for k, v in state.items()}, path, metadata={"format": "pt"})
    out = str(tmp_path / "child.safetensors")
    recipe = Recipe("dare_ties", [1.0, 1.0], 0.5, seed=5, groups={"head": {"density": 1.0}})
    merge_safetensors_files(paths[0], paths[1:], out, recipe)
    expected = merge_state_dicts(llama_state, partners, recipe)
    loaded = load_file(out)
    assert set(loaded) == set(expected)
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    from colearn.merging.streaming import read_layout  # the output keeps the ancestor's layout, header and all

    assert read_layout(out).header == read_layout(paths[0]).header
    assert os.path.getsize(out) == os.path.getsize(paths[0])
    assert sorted(os.listdir(tmp_path)) == [f"{n}.safetensors" for n in ("ancestor", "child", "p0", "p1")]
    # a mismatch is reported from the headers, and nothing is written
    save_file({"model.embed_tokens.weight": torch.zeros(3, 3)}, paths[2])
    with pytest.raises(MergeError, match="partner"):
        merge_safetensors_files(paths[0], paths[1:], str(tmp_path / "never.safetensors"), recipe)
    assert not (tmp_path / "never.safetensors").exists()


def test_write_like_takes_any_order_and_names_a_tensor_that_does_not_fit_or_is_missing(tmp_path):
    from colearn.merging.streaming import merge_order, read_layout, write_like

    state = {"a": torch.arange(3.0), "big": torch.arange(100.0), "c": torch.ones(2), "d": torch.zeros(4)}
    save_file(state, tmp_path / "in.safetensors")
    layout = read_layout(tmp_path / "in.safetensors")
    order = merge_order(layout)
    assert sorted(order) == sorted(state) and order[len(order) // 2] == "big"  # the largest in the middle
    with open(tmp_path / "out.safetensors", "wb") as out:
        write_like(layout, ((k, state[k]) for k in reversed(order)), out)
    assert all(torch.equal(v, state[k]) for k, v in load_file(tmp_path / "out.safetensors").items())
    for tensors, message in [
        ([("a", torch.arange(4.0))], "'a' .* a slot of 12 bytes"),
        ([("e", torch.ones(1))], "'e' .* no slot"),
        ([("a", state["a"]), ("a", state["a"])], "'a' .* a slot already written"),
        ([(k, state[k]) for k in ("a", "big", "c")], "lacks 1 of its layout's tensors, the first 'd'"),
    ]:
        with open(tmp_path / "bad.safetensors", "wb") as out, pytest.raises(MergeError, match=message):
            write_like(layout, iter(tensors), out)


@pytest.mark.parametrize("method", ["ties", "slerp"])
def test_streamed_merge_of_large_tensors_equals_the_in_memory_one(tmp_path, method):
    # A tensor large enough for sampled trim brackets and many chunks, planned on the read-ahead thread
    generator = torch.Generator().manual_seed(7)
    ancestor = {"model.embed_tokens.weight": torch.randn(600, 500, generator=generator), "lm_head.bias": torch.ones(7)}
    partners = [{k: v + 0.01 * torch.randn(v.shape, generator=generator) for k, v in ancestor.items()} for _ in "ab"]
    paths = [str(tmp_path / f"{name}.safetensors") for name in ("ancestor", "p0", "p1")]
    for path, state in zip(paths, [ancestor, *partners]):
        save_file(state, path, metadata={"format": "pt"})
    recipe = Recipe(method, [1.0, 1.0] if method == "ties" else [0.3, 0.7], 0.4)
    merge_safetensors_files(paths[0], paths[1:], str(tmp_path / "child.safetensors"), recipe)
    loaded, expected = load_file(tmp_path / "child.safetensors"), merge_state_dicts(ancestor, partners, recipe)
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    key = "model.embed_tokens.weight"
    assert not torch.equal(loaded[key], ancestor[key])
    if method == "ties":
        from peft.utils import merge_utils

        deltas = [p[key] - ancestor[key] for p in partners]
        assert torch.allclose(loaded[key], ancestor[key] + merge_utils.ties(deltas, w(1, 1), 0.4), atol=1e-6)


# --------------------------------------------------------------------------- LoRA


@pytest.fixture(scope="module")
def lora_setup():
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    base = tiny_llama()
    base_state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    adapters, models = [], []
    for seed in (1, 2):
        torch.manual_seed(seed)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        model = get_peft_model(copy.deepcopy(base), config)
        adapters.append({k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()})
        models.append(model)
    return base, base_state, adapters, models


def test_single_lora_delta_folds_like_peft_merge_and_unload(lora_setup):
    _, base_state, adapters, models = lora_setup
    deltas = lora_deltas(adapters[0], lora_scaling(r=4, lora_alpha=8))
    assert set(deltas) == {f"model.layers.{i}.self_attn.{p}_proj.weight" for i in (0, 1) for p in "qv"}
    folded = fold_into_base(base_state, deltas)
    unloaded = copy.deepcopy(models[0]).merge_and_unload().state_dict()
    assert set(unloaded) == set(folded)
    for key in folded:
        assert torch.allclose(folded[key], unloaded[key], atol=1e-6), key
    # a live PeftModel's names carry the adapter name (`lora_A.default.weight`): same deltas
    live = {k: v for k, v in models[0].state_dict().items() if ".lora_" in k}
    assert all(torch.equal(d, deltas[k]) for k, d in lora_deltas(live, 2.0).items())


def test_merge_lora_equals_merging_dense_deltas(lora_setup):
    _, _, adapters, _ = lora_setup
    deltas = [lora_deltas(adapter, 2.0) for adapter in adapters]
    zeros = {k: torch.zeros_like(v) for k, v in deltas[0].items()}
    for method, weights in [("ties", [1.0, 1.0]), ("linear", [0.3, 0.7])]:
        merged = merge_lora(adapters, 2.0, Recipe(method, weights, density=0.5, seed=1))
        expected = merge_state_dicts(zeros, deltas, Recipe(method, weights, density=0.5, seed=1))
        assert all(torch.equal(merged[k], expected[k]) for k in expected)


def test_refactorized_lora_reproduces_the_merge(lora_setup):
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    base, base_state, adapters, _ = lora_setup
    dense = merge_lora(adapters, 2.0, Recipe("linear", [0.5, 0.5]))
    adapter = merge_lora(adapters, 2.0, Recipe("linear", [0.5, 0.5]), rank=8, out_scaling=0.5)  # rank = 4 + 4: exact
    rebuilt = lora_deltas(adapter, 0.5)
    assert all(torch.allclose(rebuilt[k], dense[k], atol=1e-5) for k in dense)
    # peft folds the re-factorized adapter to the same weights as folding the dense merge
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    set_peft_model_state_dict(model, adapter)
    unloaded = model.merge_and_unload().state_dict()
    folded = fold_into_base(base_state, dense)
    assert all(torch.allclose(unloaded[k], folded[k], atol=1e-5) for k in folded)


def test_refactorize_truncates_to_the_best_low_rank_approximation():
    generator = torch.Generator().manual_seed(0)
    delta = torch.randn(6, 5, generator=generator)  # (out, in)
    a, b = refactorize(delta, rank=2, scaling=2.0)
    assert a.shape == (2, 5) and b.shape == (6, 2)
    singular = torch.linalg.svdvals(delta)
    error = (delta - 2.0 * b @ a).norm()
    assert error == pytest.approx(singular[2:].norm().item(), rel=1e-4)  # Eckart-Young
    a, b = refactorize(delta, rank=7)  # more than min(6, 5): zero-padded, exact
    assert a.shape == (7, 5) and torch.allclose(b @ a, delta, atol=1e-5)


def test_lora_rejects_non_lora_keys():
    with pytest.raises(MergeError, match="not a LoRA"):
        lora_deltas({"base_model.model.x.lora_magnitude_vector": torch.ones(2)}, 1.0)
