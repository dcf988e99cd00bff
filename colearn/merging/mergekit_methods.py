"""Merge methods as mergekit defines them (arcee-ai/mergekit), as pure torch functions of whole tensors.

mergekit and `colearn.merging.operators` share method names but not all meanings:

* ``linear``: sum_i w_i * x_i over the models themselves (not task vectors), divided by
  sum_i w_i when `normalize` (mergekit's default); the base model is one more input.
* ``slerp``: spherical interpolation between two models' tensors at `t` (t=0 gives the first).
  colearn's slerp interpolates two task vectors from a common ancestor (mergekit's
  ``nuslerp`` with a base model).
* ``task_arithmetic``, ``ties``, ``dare_ties``, ``dare_linear``: mergekit's generalized task
  arithmetic.  Each task vector is sparsified at its model's density (top magnitudes for
  TIES, Bernoulli draws for DARE, rescaled to the task vector's L1 norm when `rescale`), then
  weighted; the TIES methods elect each element's sign from the weighted task vectors
  (their sum, ties going to +) and divide the agreeing weighted values by the sum of the
  agreeing weights, the others divide by the sum of all weights, in both cases only when
  `normalize`; `lambda_` scales the result.  colearn's ties elects signs on unweighted task
  vectors and divides by the count of agreeing partners (peft's definition), and colearn's
  DARE rescales by 1/density.

The functions take whole tensors (mergekit merges a tensor at once; peak memory is a few
copies of the tensor per model) and compute on the inputs' device in their dtype; callers
pass at least float32.  Random draws come from the given `torch.Generator`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from colearn.merging.operators import MergeError

_COLINEAR_DOT = 0.9995  # above this |cos| slerp falls back to lerp (mergekit's DOT_THRESHOLD)
_NORM_EPS = 1e-8  # slerp leaves a vector of smaller norm unnormalized
_RESCALE_EPS = 1e-7  # rescaling is skipped when either L1 norm is below this
_DIVISOR_EPS = 1e-8  # an unelected divisor smaller than this is replaced by 1


def linear(tensors: Sequence[Tensor], weights: Sequence[float], normalize: bool = True) -> Tensor:
    """Returns sum_i w_i * x_i, divided by sum_i w_i when `normalize` (Wortsman et al. 2022, model soups)."""
    out = tensors[0] * weights[0]
    for tensor, weight in zip(tensors[1:], weights[1:]):
        out.add_(tensor, alpha=weight)
    return out.div_(sum(weights)) if normalize else out


def slerp(t: float, v0: Tensor, v1: Tensor) -> Tensor:
    """Returns the spherical interpolation of two tensors at `t` (Shoemake 1985): the angle between their unit
    directions over the whole tensor, s0 * v0 + s1 * v1 with s0 = sin((1-t) theta) / sin(theta), s1 = sin(t theta) /
    sin(theta); (1-t) v0 + t v1 where |cos theta| > 0.9995."""
    norm0, norm1 = float(v0.double().norm()), float(v1.double().norm())
    dot = float((v0.double() * v1.double()).sum())
    dot /= (norm0 if norm0 > _NORM_EPS else 1.0) * (norm1 if norm1 > _NORM_EPS else 1.0)
    if abs(dot) > _COLINEAR_DOT:
        return v0 * (1 - t) + v1 * t
    theta = math.acos(dot)
    return v0 * (math.sin(theta - theta * t) / math.sin(theta)) + v1 * (math.sin(theta * t) / math.sin(theta))


def l1_rescaled(delta: Tensor, kept: Tensor) -> Tensor:
    """Returns `kept` (a masked `delta`) scaled to `delta`'s L1 norm, or as it is where either norm is below 1e-7."""
    before, after = float(delta.abs().sum()), float(kept.abs().sum())
    if before < _RESCALE_EPS or after < _RESCALE_EPS:
        return kept
    return kept * (before / after)


def magnitude_sparsified(delta: Tensor, density: float, rescale: bool = False) -> Tensor:
    """Returns `delta` with only its int(density * n) largest magnitudes kept (TIES's trim; Yadav et al. 2023)."""
    if density >= 1:
        return delta
    k = int(density * delta.numel())
    if k < 1:
        raise MergeError(f"density={density} keeps no element of a tensor of {delta.numel()}; raise the density")
    mask = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)  # (n,)
    mask[delta.abs().flatten().topk(k).indices] = 1
    kept = delta * mask.view_as(delta)
    return l1_rescaled(delta, kept) if rescale else kept


def random_sparsified(delta: Tensor, density: float, generator: torch.Generator, rescale: bool = True) -> Tensor:
    """Returns `delta` with each element kept with probability `density` (DARE's drop; Yu et al. 2024), rescaled to
    its L1 norm when `rescale`; the mask is torch.bernoulli(density everywhere) drawn from `generator`."""
    if density >= 1:
        return delta
    kept = delta * torch.bernoulli(torch.full_like(delta, density), generator=generator)
    return l1_rescaled(delta, kept) if rescale else kept


def consensus_mask(weighted: Tensor) -> Tensor:
    """Returns the (N, ...) 0/1 mask of the weighted task vectors whose sign is the elected one: the sign of their
    sum, + where it is 0 (TIES's sign election, mergekit's "sum" consensus); a 0 element agrees with no sign."""
    majority = torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0).to(weighted.dtype)  # (...)
    return (weighted.sign() == majority).to(weighted.dtype)


def generalized_task_arithmetic(
    base: Tensor,
    models: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    sparsification: str | None,
    consensus: bool,
    normalize: bool,
    rescale: bool,
    lambda_: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Returns base + lambda_ * the merged task vector of `models` (mergekit's generalized task arithmetic).

    `sparsification` is None, "magnitude" (TIES) or "random" (DARE, drawing from
    `generator`); with `consensus` the weighted task vectors are sign-elected (TIES).  Task
    Arithmetic is (None, no consensus), TIES ("magnitude", consensus), DARE-TIES ("random",
    consensus) and DARE-linear ("random", no consensus).
    """
    deltas = []
    for model, density in zip(models, densities):
        delta = model - base
        if sparsification == "magnitude":
            delta = magnitude_sparsified(delta, density, rescale)
        elif sparsification == "random":
            delta = random_sparsified(delta, density, generator, rescale)
        deltas.append(delta)
    stacked = torch.stack(deltas)  # (N, ...)
    w = torch.tensor(list(weights), dtype=stacked.dtype, device=stacked.device).view(-1, *[1] * base.dim())  # (N, 1..)
    weighted = stacked * w  # (N, ...)
    if consensus:
        mask = consensus_mask(weighted)  # (N, ...)
        mixed = (weighted * mask).sum(dim=0)  # (...)
        divisor = (w * mask).sum(dim=0)  # (...)
        divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    else:
        mixed = weighted.sum(dim=0)  # (...)
        total = float(w.sum())
        divisor = 1.0 if abs(total) < _DIVISOR_EPS else total
    if normalize:
        mixed = mixed / divisor
    if lambda_ != 1:
        mixed = mixed * lambda_
    return base + mixed
