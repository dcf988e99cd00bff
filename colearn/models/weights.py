"""A partner's weights as tensors: its dense state dict (a LoRA adapter folded in, each tied tensor once), and
loading such a state back into a model. Merges, compatibility and the merge search all read weights this way.
Light (torch only): `colearn merge --search` loads its candidates with it."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # typing only: loading weights needs no transformers, and `colearn merge` starts without it
    from colearn.models.partner import Partner


def dense_state(partner: Partner) -> dict[str, torch.Tensor]:
    """Returns the partner's full weights, each tied tensor once (under its first name); a LoRA partner's
    adapter is folded in (B·A·scaling), so merges combine true weight changes rather than A and B factors. A LoRA
    partner's are float32 whatever the base's dtype: a small adapter change lies below the resolution of a bfloat16
    weight and would round away if folded into one."""
    model = partner.model
    if hasattr(model, "peft_config"):
        model = copy.deepcopy(model).float().merge_and_unload()
    return untied({k: v.detach() for k, v in model.state_dict().items()})


def untied(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Returns the state dict without the names that alias an earlier tensor (tied embeddings).

    A tied lm_head would otherwise be merged twice, once in the `embed` and once in the `head`
    layer group, and whichever load_state_dict copies last would silently win.
    """
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    kept = {}
    for key, tensor in state.items():
        identity = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if identity not in seen:
            seen.add(identity)
            kept[key] = tensor
    return kept


def load_weights(model: torch.nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    """Copies `weights` into the model; only names tied to a loaded tensor may be absent."""
    result = model.load_state_dict(weights, strict=False)
    if result.unexpected_keys or set(result.missing_keys) - _tied_names(model):
        raise ValueError(
            f"weights do not fit the model: missing {result.missing_keys}, unexpected {result.unexpected_keys}"
        )


def _tied_names(model: torch.nn.Module) -> set[str]:
    state = model.state_dict()
    return set(state) - set(untied(state))
