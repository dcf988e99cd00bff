"""Merging peft LoRA adapters trained on one shared base, through their dense weight deltas.

Each adapter's dense update dW = scaling * B @ A is a task vector relative to the base, so
adapters merge with any `colearn.merging.merge` method against a zero ancestor.  The result is
either dense deltas to fold into the base, or a new adapter re-factorized by truncated SVD
(Eckart-Young: the best rank-r approximation of the merged delta).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from colearn.merging.merge import Recipe, merge_state_dicts
from colearn.merging.operators import MergeError

# peft names a LoRA factor `base_model.model.<module>.lora_A.weight` when saved and
# `...lora_A.<adapter name>.weight` inside a live PeftModel; the base weight is `<module>.weight`.
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>[AB])(?:\.[^.]+)?\.weight$")

Scaling = float | Mapping[str, float]


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool = False) -> float:
    """Returns peft's LoRA scaling: lora_alpha / r, or lora_alpha / sqrt(r) for rsLoRA (Kalajdzievski 2023)."""
    return lora_alpha / r**0.5 if use_rslora else lora_alpha / r


def lora_factors(adapter_state: Mapping[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    """Returns {base weight key: (A (r, in), B (out, r))} for every linear layer the adapter adapts."""
    halves: dict[str, dict[str, Tensor]] = {}
    for key, tensor in adapter_state.items():
        match = _LORA_KEY.match(key)
        if match is None:
            raise MergeError(
                f"adapter tensor {key!r} is not a LoRA A/B factor of a linear layer; "
                "only plain LoRA adapters (no DoRA, embedding LoRA or modules_to_save) can be merged"
            )
        halves.setdefault(f"{match['module']}.weight", {})[match["part"]] = tensor
    for base_key, parts in halves.items():
        if len(parts) != 2:
            raise MergeError(
                f"adapter has only lora_{next(iter(parts))} for {base_key!r}; every adapted layer needs both A and B"
            )
    return {base_key: (parts["A"], parts["B"]) for base_key, parts in halves.items()}


def _scaling_of(scaling: Scaling, base_key: str) -> float:
    if isinstance(scaling, Mapping):
        if base_key not in scaling:
            raise MergeError(f"the LoRA scaling has no entry for {base_key!r}; give one per adapted base weight")
        return float(scaling[base_key])
    return float(scaling)


def lora_deltas(
    adapter_state: Mapping[str, Tensor], scaling: Scaling, fan_in_fan_out: bool = False
) -> dict[str, Tensor]:
    """Returns {base weight key: dense float32 dW = scaling * B @ A}, in the base weight's layout.

    `scaling` is one number or a dict by base weight key (see `lora_scaling`);
    `fan_in_fan_out` transposes dW for Conv1D bases such as GPT-2's, stored (in, out).
    """
    return {
        base_key: lora_delta(a, b, _scaling_of(scaling, base_key), fan_in_fan_out)
        for base_key, (a, b) in lora_factors(adapter_state).items()
    }


def lora_delta(a: Tensor, b: Tensor, scaling: float, fan_in_fan_out: bool = False) -> Tensor:
    """Returns one adapted weight's dense float32 dW = scaling * B @ A, in the base weight's layout."""
    delta = scaling * (b.float() @ a.float())  # (out, r) @ (r, in) -> (out, in)
    return delta.T.contiguous() if fan_in_fan_out else delta


def refactorize(delta: Tensor, rank: int, scaling: float = 1.0) -> tuple[Tensor, Tensor]:
    """Returns LoRA factors (A (rank, in), B (out, rank)) such that scaling * B @ A is the best rank-`rank`
    approximation of delta.

    Truncated SVD (Eckart-Young), split evenly as B = U sqrt(S / scaling), A = sqrt(S / scaling) Vh;
    zero-padded to `rank` when the matrix has fewer singular values, so the factors fit LoraConfig(r=rank).
    """
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)  # (out, k), (k,), (k, in)
    kept = min(rank, s.numel())
    root = (s[:kept] / scaling).sqrt()  # (kept,)
    a = torch.zeros(rank, delta.shape[1], device=delta.device)  # (rank, in)
    b = torch.zeros(delta.shape[0], rank, device=delta.device)  # (out, rank)
    a[:kept] = root[:, None] * vh[:kept]
    b[:, :kept] = u[:, :kept] * root
    return a, b


def adapter_state(
    deltas: Mapping[str, Tensor], rank: int, scaling: float = 1.0, fan_in_fan_out: bool = False
) -> dict[str, Tensor]:
    """Returns a peft adapter state dict (saved naming) whose dense deltas approximate `deltas` at `rank`.

    Load it into a PeftModel made with LoraConfig(r=rank, lora_alpha=scaling * rank).
    """
    state = {}
    for base_key, delta in deltas.items():
        module = base_key.removesuffix(".weight")
        a, b = refactorize(delta.T if fan_in_fan_out else delta, rank, scaling)
        state[f"base_model.model.{module}.lora_A.weight"] = a
        state[f"base_model.model.{module}.lora_B.weight"] = b
    return state


def merge_lora(
    adapters: Sequence[Mapping[str, Tensor]],
    scalings: Scaling | Sequence[Scaling],
    recipe: Recipe,
    rank: int | None = None,
    out_scaling: float = 1.0,
    fan_in_fan_out: bool = False,
) -> dict[str, Tensor]:
    """Returns the merge of LoRA adapters on one base, via `merge_state_dicts` of their dense deltas (zero ancestor).

    With `rank=None`: dense deltas by base weight key, for `fold_into_base`.  With a rank:
    a re-factorized adapter (`adapter_state`) for LoraConfig(r=rank, lora_alpha=out_scaling * rank),
    exact when rank >= the merged delta's rank (e.g. the sum of the adapters' ranks for linear merges).
    `scalings` is one scaling for all adapters or one per adapter.
    """
    if isinstance(scalings, (int, float, Mapping)):
        scalings = [scalings] * len(adapters)
    if len(scalings) != len(adapters):
        raise MergeError(f"got {len(scalings)} LoRA scalings for {len(adapters)} adapters; give one per adapter")
    if rank is not None and rank < 1:
        raise MergeError(f"merge.rank={rank} must be a positive integer (or None for dense deltas)")
    if not out_scaling > 0:
        raise MergeError(f"merge.out_scaling={out_scaling} must be > 0")
    deltas = [lora_deltas(adapter, scaling, fan_in_fan_out) for adapter, scaling in zip(adapters, scalings)]
    zeros = {key: torch.zeros_like(delta) for key, delta in deltas[0].items()} if deltas else {}
    merged = merge_state_dicts(zeros, deltas, recipe)
    return merged if rank is None else adapter_state(merged, rank, out_scaling, fan_in_fan_out)


def adapter_for(
    base_state: Mapping[str, Tensor],
    weights: Mapping[str, Tensor],
    adapted: Sequence[str],
    rank: int,
    scaling: float,
    fan_in_fan_out: bool = False,
) -> tuple[dict[str, Tensor], float]:
    """Returns (adapter state, relative error): a rank-`rank` adapter on `base_state` approximating `weights`.

    Only the `adapted` base weight keys may differ between the two (a LoRA offspring keeps its
    base frozen); the error is ||approximation - (weights - base)||_F / ||weights - base||_F
    over all adapted tensors (0 when the change fits the rank).
    """
    for key, weight in base_state.items():
        if key not in adapted and key in weights and not torch.equal(weights[key], weight):
            raise MergeError(
                f"the merge changed {key!r}, which no LoRA factor adapts, so it cannot be kept as an adapter on the "
                "unchanged base; use merge.lora_offspring=fold"
            )
    deltas = {key: weights[key].float() - base_state[key].float() for key in adapted}
    return refactorized(deltas, rank, scaling, fan_in_fan_out)


def refactorized(
    deltas: Mapping[str, Tensor], rank: int, scaling: float = 1.0, fan_in_fan_out: bool = False
) -> tuple[dict[str, Tensor], float]:
    """Returns (`adapter_state` of the deltas, relative error ||approximation - deltas||_F / ||deltas||_F over all
    of them; 0 when every delta fits the rank)."""
    state = adapter_state(deltas, rank, scaling, fan_in_fan_out)
    approx = lora_deltas(state, scaling, fan_in_fan_out)
    residual = sum(float((approx[k] - d).square().sum()) for k, d in deltas.items())
    total = sum(float(d.square().sum()) for d in deltas.values())
    return state, (residual / total) ** 0.5 if total > 0 else 0.0


def fold_into_base(base_state: Mapping[str, Tensor], deltas: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Returns base_state with each delta added to its weight (in at least float32, cast back to the weight's dtype).

    Tensors without a delta are the base's own (not copied).
    """
    folded = dict(base_state)
    for key, delta in deltas.items():
        if key not in base_state:
            raise MergeError(
                f"delta for {key!r} has no such weight in the base; the adapter was trained on another base"
            )
        weight = base_state[key]
        if weight.shape != delta.shape:
            raise MergeError(
                f"delta for {key!r} has shape {tuple(delta.shape)} but the base weight has {tuple(weight.shape)}; "
                "for Conv1D bases (GPT-2) use fan_in_fan_out=True"
            )
        dtype = torch.promote_types(weight.dtype, torch.float32)
        folded[key] = (weight.to(dtype) + delta.to(dtype)).to(weight.dtype)
    return folded
