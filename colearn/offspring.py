"""The offspring of a generation: the partners merged in weight space relative to their ancestor."""

from __future__ import annotations

import copy
from typing import Any

import torch

from colearn.config import MergeConfig
from colearn.errors import ColearnError
from colearn.partner import Partner


def dense_state(partner: Partner) -> dict[str, torch.Tensor]:
    """Returns the partner's full weights; a LoRA partner's adapter is folded in (B·A·scaling), so merges
    combine true weight changes rather than A and B factors separately."""
    model = partner.model
    if hasattr(model, "peft_config"):
        folded = copy.deepcopy(model).merge_and_unload()
        return {k: v.detach() for k, v in folded.state_dict().items()}
    return {k: v.detach() for k, v in model.state_dict().items()}


def merged_weights(ancestor: Partner, partners: list[Partner], cfg: MergeConfig) -> dict[str, torch.Tensor]:
    """Returns the merged dense weights of the partners relative to the ancestor (method from merge.METHODS)."""
    from colearn.merge import MergeError, default_weights, merge_state_dicts

    weights = list(cfg.weights) or default_weights(cfg.method, len(partners))
    if len(weights) != len(partners):
        raise ColearnError(f"merge.weights has {len(weights)} entries for {len(partners)} partners; give one each")
    try:
        return merge_state_dicts(
            dense_state(ancestor), [dense_state(p) for p in partners], method=cfg.method, weights=weights,
            density=cfg.density, to_ancestor=cfg.to_ancestor, seed=cfg.seed, params=dict(cfg.params),
            groups=dict(cfg.groups) or None,
        )
    except MergeError as e:
        raise ColearnError(str(e)) from e


def offspring_from(ancestor: Partner, weights: dict[str, torch.Tensor], name: str = "offspring") -> Partner:
    """Returns a new partner with the ancestor's architecture (and adapter layout) holding `weights`.

    For LoRA ancestors the merged change is folded into the base and a fresh adapter is put on top,
    so the next generation again trains adapters."""
    child = ancestor.clone(name)
    model = child.model
    if hasattr(model, "peft_config"):
        base = copy.deepcopy(model).merge_and_unload()
        base.load_state_dict(weights)
        from colearn.models import with_lora

        child.model = with_lora(base, ancestor.cfg)
    else:
        model.load_state_dict(weights)
    return child


def make_offspring(
    ancestor: Partner, partners: list[Partner], scores: dict[str, float], cfg: MergeConfig
) -> tuple[Partner, dict[str, Any]]:
    """Returns the offspring of a generation and the recipe that made it: the merge of the partners, or a
    copy of the best-scoring partner when merging is off (method "none") or there is only one partner."""
    if len(partners) == 1 or cfg.method == "none":
        best = max(partners, key=lambda p: scores[p.name])
        return best.clone("offspring"), {"method": "copy_best", "source": best.name}
    weights = merged_weights(ancestor, partners, cfg)
    recipe = {"method": cfg.method, "weights": list(cfg.weights) or "default", "density": cfg.density,
              "to_ancestor": cfg.to_ancestor, "params": dict(cfg.params), "groups": dict(cfg.groups)}
    return offspring_from(ancestor, weights), recipe
