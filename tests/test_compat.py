"""Tests of colearn.breeding.compatibility: task vectors, their cosine and sign conflicts, weight distance, linear
CKA."""

from __future__ import annotations

import math

import pytest
import torch

from colearn.breeding.compatibility import (
    linear_cka,
    sign_conflict_rate,
    task_vector,
    task_vector_cosine,
    weight_distance,
)

torch.set_num_threads(1)


def random_state(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(4, 3, generator=generator),
        "b.bias": torch.randn(5, generator=generator),
        "steps": torch.tensor([7]),
    }


def test_task_vector_is_the_float_difference():
    ancestor, model = random_state(0), random_state(1)
    tv = task_vector(model, ancestor)
    assert set(tv) == {"a.weight", "b.bias"}  # the int buffer is not a direction
    assert torch.equal(tv["a.weight"], model["a.weight"] - ancestor["a.weight"])
    half = {k: v.to(torch.bfloat16) for k, v in model.items()}
    assert task_vector(half, ancestor)["b.bias"].dtype == torch.float32
    with pytest.raises(ValueError, match="'extra'"):
        task_vector({**model, "extra": torch.zeros(1)}, ancestor)


def test_cosine_of_self_and_negation():
    tv = task_vector(random_state(1), random_state(0))
    negated = {k: -v for k, v in tv.items()}
    assert task_vector_cosine(tv, tv) == pytest.approx(1.0, abs=1e-12)
    assert task_vector_cosine(tv, negated) == pytest.approx(-1.0, abs=1e-12)
    zero = {k: torch.zeros_like(v) for k, v in tv.items()}
    assert task_vector_cosine(tv, zero) == 0.0


def test_cosine_by_hand_spans_tensors():
    tv_a = {"x": torch.tensor([1.0, 0.0]), "y": torch.tensor([0.0])}
    tv_b = {"x": torch.tensor([1.0, 0.0]), "y": torch.tensor([1.0])}
    assert task_vector_cosine(tv_a, tv_b) == pytest.approx(1 / math.sqrt(2))


def test_sign_conflict_rate():
    tv = task_vector(random_state(1), random_state(0))
    assert sign_conflict_rate(tv, {k: -v for k, v in tv.items()}) == 1.0
    assert sign_conflict_rate(tv, tv) == 0.0
    # coordinates where either is (near) zero don't count: here 1 conflict among 3 active
    tv_a = {"x": torch.tensor([1.0, -2.0, 3.0, 0.0, 0.05])}
    tv_b = {"x": torch.tensor([2.0, 1.0, 0.5, -1.0, -1.0])}
    assert sign_conflict_rate(tv_a, tv_b, eps=0.1) == pytest.approx(1 / 3)
    assert sign_conflict_rate(tv_a, tv_b) == pytest.approx(2 / 4)


def test_weight_distance():
    sd_a = {"x": torch.tensor([0.0, 0.0]), "y": torch.tensor([1.0]), "n": torch.tensor([1])}
    sd_b = {"x": torch.tensor([3.0, 0.0]), "y": torch.tensor([5.0]), "n": torch.tensor([2])}
    assert weight_distance(sd_a, sd_b) == pytest.approx(5.0)
    assert weight_distance(sd_a, sd_a) == 0.0


def test_linear_cka_properties():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(200, 16, generator=generator)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    rotation, _ = torch.linalg.qr(torch.randn(16, 16, generator=generator, dtype=torch.float64))
    assert linear_cka(x, 3.5 * (x.double() @ rotation)) == pytest.approx(1.0, abs=1e-10)
    # translation is removed by centring
    assert linear_cka(x, x + 4.0) == pytest.approx(1.0, abs=1e-6)
    big_x = torch.randn(4000, 8, generator=generator)
    big_y = torch.randn(4000, 6, generator=generator)
    assert linear_cka(big_x, big_y) < 0.02  # ~ sqrt(d1 d2) / n for independent features


def test_linear_cka_gram_form_matches_feature_form():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(10, 40, generator=generator)  # fewer inputs than features: Gram path
    y = x[:, :20] @ torch.randn(20, 30, generator=generator) + 0.1 * torch.randn(10, 30, generator=generator)
    xc, yc = x.double() - x.double().mean(0), y.double() - y.double().mean(0)
    feature_form = (yc.T @ xc).norm() ** 2 / ((xc.T @ xc).norm() * (yc.T @ yc).norm())
    assert linear_cka(x, y) == pytest.approx(float(feature_form), rel=1e-10)
    assert linear_cka(x, y) == pytest.approx(linear_cka(y, x), rel=1e-12)


def test_linear_cka_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="same n"):
        linear_cka(torch.zeros(5, 2), torch.zeros(4, 2))
    assert linear_cka(torch.ones(5, 2), torch.randn(5, 2)) == 0.0
