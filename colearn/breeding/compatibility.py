"""Compatibility of partners: how alike their weights, updates and representations are.

Weight-space metrics compare task vectors (partner - ancestor; Ilharco et al. 2023) over
all floating-point tensors flattened into one vector; accumulation is in float64 so that
billions of coordinates don't lose precision.  Representation similarity is linear CKA
(Kornblith et al. 2019).  `measure` takes every number once for a set of partners: the
offspring decides on it (`Compatibility.worst`) and the run's dynamics log it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from colearn.models.partner import Partner, hidden_states
from colearn.models.weights import dense_state

_SAME_ARCHITECTURE = "compare models of one architecture"


def _check_same_keys(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> None:
    if set(a) != set(b):
        missing = sorted(set(a) ^ set(b))[0]
        raise ValueError(f"tensor {missing!r} is in one state dict but not the other; {_SAME_ARCHITECTURE}")


def _float_pairs(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Iterator[tuple[Tensor, Tensor]]:
    """Yields the float64 flattened pairs of the floating-point tensors the two dicts share by name and shape."""
    _check_same_keys(a, b)
    for key in sorted(a):
        if not a[key].is_floating_point():
            continue
        if a[key].shape != b[key].shape:
            shapes = f"{tuple(a[key].shape)} and {tuple(b[key].shape)}"
            raise ValueError(f"tensor {key!r} has shapes {shapes}; {_SAME_ARCHITECTURE}")
        yield a[key].detach().double().flatten(), b[key].detach().double().flatten()  # (n,), (n,)


def task_vector(model_sd: Mapping[str, Tensor], ancestor_sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Returns {name: model - ancestor} for the floating-point tensors (Ilharco et al. 2023, Task Arithmetic).

    Deltas are in at least float32, since bf16 differences of nearby weights round badly.
    """
    _check_same_keys(model_sd, ancestor_sd)
    vector = {}
    for key, tensor in model_sd.items():
        if not tensor.is_floating_point():
            continue
        base = ancestor_sd[key]
        if base.shape != tensor.shape:
            raise ValueError(
                f"tensor {key!r} has shape {tuple(tensor.shape)} but the ancestor has {tuple(base.shape)}; "
                f"{_SAME_ARCHITECTURE}"
            )
        dtype = torch.promote_types(tensor.dtype, torch.float32)
        vector[key] = tensor.detach().to(dtype) - base.detach().to(dtype)
    return vector


def task_vector_cosine(tv_a: Mapping[str, Tensor], tv_b: Mapping[str, Tensor]) -> float:
    """Returns the cosine between two task vectors flattened over all floating-point tensors; 0.0 if either is zero."""
    dot = norm_a = norm_b = 0.0
    for a, b in _float_pairs(tv_a, tv_b):
        dot += float(a @ b)
        norm_a += float(a @ a)
        norm_b += float(b @ b)
    if norm_a == 0.0 or norm_b == 0.0:
        return 0.0
    return dot / math.sqrt(norm_a * norm_b)


def sign_conflict_rate(tv_a: Mapping[str, Tensor], tv_b: Mapping[str, Tensor], eps: float = 0.0) -> float:
    """Returns the fraction of coordinates with opposite signs among those where both |delta| > eps; 0.0 if none.

    The interference that TIES sign election resolves (Yadav et al. 2023).
    """
    conflicts = both = 0
    for a, b in _float_pairs(tv_a, tv_b):
        active = (a.abs() > eps) & (b.abs() > eps)  # (n,)
        both += int(active.sum())
        conflicts += int((active & (a.sign() != b.sign())).sum())
    return conflicts / both if both else 0.0


def weight_distance(sd_a: Mapping[str, Tensor], sd_b: Mapping[str, Tensor]) -> float:
    """Returns the L2 distance between two models over all floating-point tensors flattened."""
    return math.sqrt(sum(float(torch.sum((a - b) ** 2)) for a, b in _float_pairs(sd_a, sd_b)))


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Returns linear CKA between two representations of the same n inputs (Kornblith et al. 2019).

    x is (n, d1) and y (n, d2); features are centred and CKA = HSIC(X, Y) / sqrt(HSIC(X, X) HSIC(Y, Y))
    with the linear kernel, i.e. ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F), in float64.
    Returns 0.0 when either representation is constant.
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0] or x.shape[0] < 2:
        raise ValueError(
            f"linear_cka needs x (n, d1) and y (n, d2) with the same n >= 2, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    x = x.detach().double()
    y = y.detach().double()
    x = x - x.mean(dim=0, keepdim=True)  # (n, d1)
    y = y - y.mean(dim=0, keepdim=True)  # (n, d2)
    if x.shape[0] < max(x.shape[1], y.shape[1]):
        # Fewer inputs than features: the n x n Gram matrices are the smaller ones.
        gram_x, gram_y = x @ x.T, y @ y.T  # (n, n), (n, n)
        cross, self_x, self_y = (gram_x * gram_y).sum(), gram_x.norm(), gram_y.norm()
    else:
        cross = (y.T @ x).norm() ** 2  # ||(d2, d1)||_F^2
        self_x, self_y = (x.T @ x).norm(), (y.T @ y).norm()  # ||(d1, d1)||_F, ||(d2, d2)||_F
    if self_x == 0 or self_y == 0:
        return 0.0
    return float(cross / (self_x * self_y))


# --------------------------------------------------------------------------- partners


@dataclass(frozen=True)
class PairCompat:
    """How alike two partners are."""

    cosine: float  # of their task vectors
    sign_conflict: float  # fraction of coordinates both changed that moved in opposite directions
    distance: float  # L2 distance between their weights
    cka: float | None  # linear CKA of their last-layer hidden states on the probe; None without a probe


@dataclass(frozen=True)
class Drift:
    """How far a partner moved from the generation's ancestor."""

    distance: float  # L2 distance of its weights from the ancestor's
    cka: float | None  # linear CKA of its hidden states against the ancestor's on the probe; None without a probe


@dataclass(frozen=True)
class Compatibility:
    """Every pair of partners (in `itertools.combinations` order of the partners) and each partner's drift."""

    pairs: dict[tuple[str, str], PairCompat]
    drift: dict[str, Drift]

    def worst(self) -> dict[str, Any]:
        """Returns {cosine, sign_conflict, cka, pair}: the worst over pairs (lowest cosine and CKA, highest conflict
        rate; pair: the lowest-cosine pair, the first of equals), what decides whether partners are averaged."""
        worst: dict[str, Any] = {"cosine": None, "sign_conflict": None, "cka": None, "pair": None}
        for (a, b), pair in self.pairs.items():
            if worst["cosine"] is None or pair.cosine < worst["cosine"]:
                worst["cosine"], worst["pair"] = pair.cosine, [a, b]
            worst["sign_conflict"] = max(pair.sign_conflict, worst["sign_conflict"] or 0.0)
            if pair.cka is not None:
                worst["cka"] = pair.cka if worst["cka"] is None else min(pair.cka, worst["cka"])
        return worst


def measure(ancestor: Partner, partners: Sequence[Partner], probe: Sequence[str] | None) -> Compatibility:
    """Returns the compatibility of every pair of partners and each one's drift from the ancestor.

    cosine and sign_conflict compare task vectors (partner - ancestor; Yadav et al. 2023 for sign conflicts), cka
    the last-layer hidden states at every token of the probe prompts (linear CKA; None without a probe)."""
    base = dense_state(ancestor)
    weights = {p.name: dense_state(p) for p in partners}
    vectors = {name: task_vector(w, base) for name, w in weights.items()}
    states = {p.name: hidden_states(p, list(probe)) for p in partners} if probe else None
    base_states = hidden_states(ancestor, list(probe)) if probe else None
    pairs = {
        (a, b): PairCompat(
            cosine=task_vector_cosine(vectors[a], vectors[b]),
            sign_conflict=sign_conflict_rate(vectors[a], vectors[b]),
            distance=weight_distance(weights[a], weights[b]),
            cka=linear_cka(states[a], states[b]) if states else None,
        )
        for a, b in itertools.combinations(weights, 2)
    }
    drift = {
        name: Drift(weight_distance(w, base), linear_cka(states[name], base_states) if states else None)
        for name, w in weights.items()
    }
    return Compatibility(pairs, drift)
