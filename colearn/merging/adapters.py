"""LoRA adapter checkpoints in `colearn merge`: merge their true weight changes, write a folded model or an adapter.

A peft LoRA directory (adapter_config.json + adapter_model.safetensors) changes each adapted
base weight by dW = scaling * B @ A.  Partners are adapters on one frozen base model; the
ancestor is that base model or an adapter on it.  Each partner's task vector is its dW minus
the ancestor's, merged tensor by tensor with any `colearn.merging.operators` method (one dense dW per
adapter in memory at a time).  The offspring is written either folded into the base model
(a full Hugging Face directory, streamed tensor by tensor with the base's layout) or, with
`lora_offspring: adapter`, as an adapter of rank `--rank` (truncated SVD: the best rank-r
approximation) whose adapter_config.json points at the base model.

Where the base model is: `DIR/base` (colearn's own LoRA checkpoints), else the adapter
config's `base_model_name_or_path` if it is a local directory, else the `--base` directory
when that is a full model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from colearn.errors import ColearnError
from colearn.merging.lora_merge import lora_delta, lora_factors, lora_scaling, refactorized
from colearn.merging.merge import Recipe, merge_tensor
from colearn.merging.operators import MergeError
from colearn.merging.streaming import atomic_file, data_order, read_layout, write_like

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def is_adapter(path: Path) -> bool:
    return (path / CONFIG).is_file()


@dataclass
class Adapter:
    path: Path
    config: dict[str, Any]  # adapter_config.json
    factors: dict[str, tuple[Tensor, Tensor]]  # base weight key -> (A (r, in), B (out, r))
    scaling: float

    @property
    def rank(self) -> int:
        return int(self.config["r"])

    def delta(self, key: str) -> Tensor | None:
        """Returns dW = scaling * B @ A of one base weight (in its layout, float32), None if not adapted."""
        if key not in self.factors:
            return None
        return lora_delta(*self.factors[key], self.scaling, bool(self.config.get("fan_in_fan_out")))


def read_adapter(path: Path, role: str) -> Adapter:
    """Returns the LoRA adapter saved in `path`; unsupported kinds (DoRA, per-module ranks) are errors."""
    where = f"{role} adapter {str(path)!r}"
    config = json.loads((path / CONFIG).read_text(encoding="utf-8"))
    if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora"):
        raise ColearnError(
            f"{where} is a {config.get('peft_type')} adapter (use_dora={config.get('use_dora')}); "
            "colearn merge handles plain LoRA adapters only"
        )
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ColearnError(
            f"{where} sets rank_pattern/alpha_pattern; colearn merge needs one rank and alpha per "
            "adapter: fold it into its base (merge_and_unload) and merge the full checkpoints"
        )
    if not (path / WEIGHTS).is_file():
        raise ColearnError(f"{where} has no {WEIGHTS}; save it with save_pretrained(dir, safe_serialization=True)")
    try:
        factors = lora_factors(load_file(path / WEIGHTS))
    except MergeError as e:
        raise ColearnError(f"{where}: {e}") from e
    scaling = lora_scaling(int(config["r"]), float(config["lora_alpha"]), bool(config.get("use_rslora")))
    return Adapter(path, config, factors, scaling)


def base_model_dir(base: Path) -> Path:
    """Returns the directory of the full model the adapters adapt: `base` itself when it is a full model, else the
    model the `base` adapter adapts (see the module docstring)."""
    if not is_adapter(base):
        return base
    if (base / "base" / "config.json").is_file():
        return base / "base"
    named = json.loads((base / CONFIG).read_text(encoding="utf-8")).get("base_model_name_or_path")
    if named and (Path(named) / "config.json").is_file():
        return Path(named)
    raise ColearnError(
        f"adapter {str(base)!r} names base model {named!r}, which is not a local directory; pass the "
        "base model's directory as --base"
    )


@dataclass
class AdapterInputs:
    base_model: Path  # the frozen base model every adapter adapts
    ancestor: Adapter | None  # None when the ancestor is the base model itself
    partners: list[Adapter]
    adapted: list[str]  # the base weight keys some adapter changes, in the base model's order

    def changes(self, key: str) -> tuple[Tensor, list[Tensor]]:
        """Returns the ancestor's and the partners' dense changes of one base weight (zeros where not adapted)."""
        found = [a.delta(key) for a in self.partners]
        own = self.ancestor.delta(key) if self.ancestor else None
        like = next(d for d in [own, *found] if d is not None)
        zeros = torch.zeros_like(like)
        return (zeros if own is None else own), [zeros if d is None else d for d in found]


def read_inputs(base: Path, partners: list[Path], shapes: Mapping[str, Sequence[int]]) -> AdapterInputs:
    """Returns the adapters of a `colearn merge` whose partners are LoRA directories, checked against the shapes
    of the base model (`base_model_dir(base)`, in its order)."""
    if not all(is_adapter(p) for p in partners):
        raise ColearnError("colearn merge got both LoRA adapter and full checkpoints as partners; give one kind")
    ancestor = read_adapter(base, "--base") if is_adapter(base) else None
    base_model = base_model_dir(base)
    found = [read_adapter(p, "partner") for p in partners]
    for adapter in [*([ancestor] if ancestor else []), *found]:
        for key, (a, b) in adapter.factors.items():
            out_in = (b.shape[0], a.shape[1])
            if key not in shapes or tuple(shapes[key]) not in (out_in, out_in[::-1]):
                raise ColearnError(
                    f"adapter {str(adapter.path)!r} adapts {key!r} with shape {out_in}, which the base "
                    f"model {str(base_model)!r} {'lacks' if key not in shapes else 'shapes otherwise'}; "
                    "merge adapters trained on one base"
                )
    keys = {k for adapter in [*([ancestor] if ancestor else []), *found] for k in adapter.factors}
    return AdapterInputs(base_model, ancestor, found, [k for k in shapes if k in keys])


def merged_changes(inputs: AdapterInputs, recipe: Recipe) -> dict[str, Tensor]:
    """Returns {base weight key: merged dense change relative to the base model}, one key at a time."""
    recipe.check(len(inputs.partners))
    recipe.check_groups_match(inputs.adapted)
    merged = {}
    for key in inputs.adapted:
        own, found = inputs.changes(key)
        merged[key] = merge_tensor(key, own, found, recipe)
    return merged


def write_folded(inputs: AdapterInputs, recipe: Recipe, tmp: Path, files: dict[str, list[str]]) -> None:
    """Writes base model + merged changes into `tmp` as full safetensors files with the base model's layout."""
    changes = merged_changes(inputs, recipe)
    for file in files:
        layout = read_layout(inputs.base_model / file)
        with safe_open(os.fspath(inputs.base_model / file), framework="pt") as handle, atomic_file(tmp / file) as out:
            write_like(layout, changed_tensors(handle, data_order(layout), changes), out)


def changed_tensors(handle: Any, keys: Sequence[str], changes: Mapping[str, Tensor]) -> Iterator[tuple[str, Tensor]]:
    """Yields (key, the base tensor plus its change) for each key of an open safetensors file, in that order."""
    for key in keys:
        weight = handle.get_tensor(key)
        change = changes.get(key)
        yield key, weight if change is None else (weight.float() + change).to(weight.dtype)


def write_adapter(inputs: AdapterInputs, recipe: Recipe, tmp: Path, rank: int) -> float:
    """Writes the merged change as a rank-`rank` LoRA adapter (scaling 1) into `tmp`; returns the relative
    truncation error ||approximation - change||_F / ||change||_F."""
    changes = merged_changes(inputs, recipe)
    state, error = refactorized(changes, rank, 1.0, bool(inputs.partners[0].config.get("fan_in_fan_out")))
    save_file({k: v.contiguous() for k, v in state.items()}, tmp / WEIGHTS, metadata={"format": "pt"})
    config = {
        **inputs.partners[0].config,
        "r": rank,
        "lora_alpha": rank,
        "use_rslora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "base_model_name_or_path": str(inputs.base_model.resolve()),
        "target_modules": sorted({k.removesuffix(".weight").rsplit(".", 1)[-1] for k in changes}),
    }
    (tmp / CONFIG).write_text(json.dumps(config, indent=2), encoding="utf-8")
    return error


def folded_states(
    inputs: AdapterInputs, base_state: dict[str, Tensor]
) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
    """Returns the ancestor's and the partners' full weights (base model + each one's change), in memory."""

    def folded(adapter: Adapter | None) -> dict[str, Tensor]:
        state = dict(base_state)
        for key in adapter.factors if adapter else ():
            state[key] = (state[key].float() + adapter.delta(key)).to(state[key].dtype)
        return state

    return folded(inputs.ancestor), [folded(a) for a in inputs.partners]
