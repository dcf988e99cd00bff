"""mergekit YAML recipes (arcee-ai/mergekit's `mergekit-yaml` format) for `colearn merge`, with mergekit's semantics.

A recipe is recognised by mergekit's keys (`merge_method`, `models`, `slices`) and read for
the methods colearn also has: linear, slerp, task_arithmetic, ties, dare_ties, dare_linear
(`colearn.merging.mergekit_methods` says how they differ from colearn's own).  Read: `merge_method`,
`base_model`, `models[].model` (local directories; a relative path is taken from the working
directory, as mergekit takes it), `models[].parameters` and top-level
`parameters` (weight, density; normalize, rescale, lambda, int8_mask; t for slerp), `dtype`
and `out_dtype`.  Anything else (slices, modules, tokenizer_source, per-layer gradients
or filters, LoRA references, other methods) stops with one line naming the key.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from colearn.merging import mergekit_methods
from colearn.merging.merge import tensor_seed
from colearn.merging.operators import MergeError

MERGEKIT_KEYS = ("merge_method", "models", "slices")  # any of them makes a YAML a mergekit recipe
_READ_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype")
_UNSUPPORTED_KEYS = {
    "slices": "layer slices (merge whole models listed under models)",
    "modules": "per-module definitions",
    "tokenizer_source": "tokenizer merging (the output takes the base model's tokenizer)",
    "tokenizer": "tokenizer merging (the output takes the base model's tokenizer)",
    "chat_template": "chat templates (the output takes the base model's files)",
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Method:
    """A mergekit method: its global parameters with defaults, and its per-model parameters with defaults
    (None: required for every model that is not the base)."""

    globals: Mapping[str, Any]
    per_model: Mapping[str, float | None]
    sparsification: str | None = None  # generalized task arithmetic: None, "magnitude" or "random"
    consensus: bool = False  # generalized task arithmetic: TIES sign election


_GTA_PER_MODEL = {"weight": None, "density": 1.0}


def _gta(normalize: bool, rescale: bool, sparsification: str | None, consensus: bool) -> Method:
    return Method(
        {"normalize": normalize, "rescale": rescale, "lambda": 1.0, "int8_mask": False},
        _GTA_PER_MODEL,
        sparsification,
        consensus,
    )


# mergekit's registry (mergekit/merge_methods/registry.py): defaults as there
METHODS: dict[str, Method] = {
    "linear": Method({"normalize": True}, {"weight": None}),
    "slerp": Method({"t": None}, {}),
    "task_arithmetic": _gta(normalize=False, rescale=False, sparsification=None, consensus=False),
    "ties": _gta(normalize=True, rescale=False, sparsification="magnitude", consensus=True),
    "dare_ties": _gta(normalize=False, rescale=True, sparsification="random", consensus=True),
    "dare_linear": _gta(normalize=False, rescale=True, sparsification="random", consensus=False),
}


@dataclass(frozen=True)
class MergekitRecipe:
    method: str  # one of METHODS
    reference: Path  # the model whose config, tokenizer and layout the output takes (base_model, else models[0])
    inputs: list[Path]  # the models read per tensor, reference first
    weights: list[float]  # per input after the reference (linear: per input, reference included)
    densities: list[float]  # per input after the reference
    params: dict[str, Any]  # the method's global parameters, defaults filled in
    dtype: torch.dtype | None  # mergekit's dtype: the output's dtype unless out_dtype
    out_dtype: torch.dtype | None  # mergekit's out_dtype

    @property
    def output_dtype(self) -> torch.dtype | None:
        """Returns the dtype of the output's floating tensors (None: each keeps the reference's)."""
        return self.out_dtype or self.dtype


def is_mergekit(data: Mapping[str, Any]) -> bool:
    """Returns whether a recipe mapping is in mergekit's format (has merge_method, models or slices)."""
    return any(key in data for key in MERGEKIT_KEYS)


def parse_recipe(data: Mapping[str, Any]) -> MergekitRecipe:
    """Returns the recipe of a mergekit YAML mapping; raises MergeError naming the first key colearn does not read."""
    for key in data:
        if key in _UNSUPPORTED_KEYS:
            raise MergeError(f"mergekit key {key!r} is not supported by colearn merge: {_UNSUPPORTED_KEYS[key]}")
        if key not in _READ_KEYS:
            raise MergeError(f"mergekit key {key!r} is not supported by colearn merge; it reads {list(_READ_KEYS)}")
    name = data.get("merge_method")
    if name not in METHODS:
        hint = "" if name is None else f" ({name!r} is not one of them)"
        raise MergeError(
            f"mergekit key 'merge_method' must be one of {list(METHODS)}{hint}; a colearn recipe "
            "(method: ...) names colearn's own operators"
        )
    method = METHODS[name]
    top = _parameters(data.get("parameters"), "parameters", [*method.globals, *method.per_model], name)
    models = _models(data.get("models"))
    base = _path(data.get("base_model"), "base_model")
    per_model = [
        _parameters(params, f"models[{i}].parameters", list(method.per_model), name)
        for i, (_, params) in enumerate(models)
    ]
    paths = [path for path, _ in models]
    params = {key: top.get(key, default) for key, default in method.globals.items()}
    if name == "slerp":
        return _slerp(paths, base, params, data)
    # mergekit merges the base into linear as one more model, and takes task vectors from it otherwise
    if name == "linear":
        entries = [(p, v, f"models[{i}]") for i, (p, v) in enumerate(zip(paths, per_model))]
        if base is not None and base not in paths:
            if "weight" not in top:
                raise MergeError(
                    "mergekit's linear merges base_model as one more model, and it has no weight: list "
                    "it under models with parameters.weight, set parameters.weight, or drop base_model"
                )
            entries.insert(0, (base, {}, "base_model"))
        reference = base if base is not None else paths[0]
        entries.sort(key=lambda entry: entry[0] != reference)  # the reference first, the others in order
        weights = [_per_model("weight", v, where, top, method) for _, v, where in entries]
        order = [p for p, _, _ in entries]
        if params["normalize"] and sum(weights) == 0:
            raise MergeError(f"the weights {weights} of mergekit's linear sum to 0 but normalize divides by their sum")
        return MergekitRecipe(name, reference, order, weights, [], params, *_dtypes(data))
    if base is None:
        raise MergeError(f"mergekit's {name} needs base_model: the model its task vectors start from")
    others = [(p, v, i) for i, (p, v) in enumerate(zip(paths, per_model)) if p != base]
    if not others:
        raise MergeError(f"mergekit's {name} needs at least one model besides base_model under models")
    weights = [_per_model("weight", v, f"models[{i}]", top, method) for _, v, i in others]
    densities = [_per_model("density", v, f"models[{i}]", top, method) for _, v, i in others]
    for density, (_, _, i) in zip(densities, others):
        if not 0 < density:
            raise MergeError(f"models[{i}].parameters.density={density} must be > 0")
    return MergekitRecipe(name, base, [base, *(p for p, _, _ in others)], weights, densities, params, *_dtypes(data))


def _slerp(paths: list[Path], base: Path | None, params: dict[str, Any], data: Mapping[str, Any]) -> MergekitRecipe:
    ends = list(dict.fromkeys([*([base] if base is not None else []), *paths]))
    if len(ends) != 2:
        raise MergeError(
            f"mergekit's slerp interpolates exactly 2 models (base_model and models together), got {len(ends)}"
        )
    if params["t"] is None:
        raise MergeError("mergekit's slerp needs parameters.t (0 gives base_model, or models[0] without one)")
    return MergekitRecipe("slerp", ends[0], ends, [], [], params, *_dtypes(data))


def _models(value: Any) -> list[tuple[Path, Mapping[str, Any]]]:
    if not isinstance(value, list) or not value:
        raise MergeError("mergekit key 'models' must list the models to merge, each as {model: DIR}")
    out = []
    for i, entry in enumerate(value):
        if not isinstance(entry, Mapping) or "model" not in entry:
            raise MergeError(f"mergekit key 'models[{i}]' must be a mapping with model: DIR")
        for key in entry:
            if key not in ("model", "parameters"):
                raise MergeError(
                    f"mergekit key 'models[{i}].{key}' is not supported; a model takes model and parameters"
                )
        out.append((_path(entry["model"], f"models[{i}].model"), entry.get("parameters") or {}))
    return out


def _path(value: Any, key: str) -> Path | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise MergeError(f"mergekit key {key!r} must be a local model directory (a string), got {value!r}")
    path = Path(value).expanduser()
    if "+" in value and not path.exists():
        raise MergeError(
            f"mergekit key {key!r} is {value!r}: model+LoRA references are not supported; merge "
            "LoRA adapters with a colearn recipe"
        )
    return path


def _parameters(value: Any, where: str, allowed: Sequence[str], method: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise MergeError(f"mergekit key {where!r} must be a mapping of parameter names to values")
    for key, setting in value.items():
        if key not in allowed:
            raise MergeError(
                f"mergekit key '{where}.{key}' is not a parameter of {method} that colearn reads; it "
                f"reads {list(allowed)}"
            )
        if isinstance(setting, list):
            kind = "filters" if any(isinstance(s, Mapping) for s in setting) else "gradients"
            raise MergeError(
                f"mergekit key '{where}.{key}' is a list: per-layer parameter {kind} are not supported; give one value"
            )
        if isinstance(setting, Mapping):
            raise MergeError(
                f"mergekit key '{where}.{key}' is a mapping: per-layer parameter filters are not "
                "supported; give one value"
            )
        wants_flag = isinstance(METHODS[method].globals.get(key), bool)
        if wants_flag and not isinstance(setting, bool):
            raise MergeError(f"mergekit key '{where}.{key}' must be true or false, got {setting!r}")
        if not wants_flag and (isinstance(setting, bool) or not isinstance(setting, (int, float))):
            raise MergeError(f"mergekit key '{where}.{key}' must be a number, got {setting!r}")
    return dict(value)


def _per_model(name: str, own: Mapping[str, Any], where: str, top: Mapping[str, Any], method: Method) -> float:
    value = own.get(name, top.get(name, method.per_model[name]))
    if value is None:
        raise MergeError(f"mergekit key '{where}.parameters.{name}' is required (or set parameters.{name} for all)")
    return float(value)


def _dtypes(data: Mapping[str, Any]) -> tuple[torch.dtype | None, torch.dtype | None]:
    out = []
    for key in ("dtype", "out_dtype"):
        value = data.get(key)
        name = value.removeprefix("torch.") if isinstance(value, str) else value
        if value is not None and name not in DTYPES:
            raise MergeError(f"mergekit key {key!r} is {value!r}; colearn merge writes one of {list(DTYPES)}")
        out.append(None if value is None else DTYPES[name])
    return out[0], out[1]


def merged_tensor(key: str, tensors: Sequence[Tensor], recipe: MergekitRecipe, seed: int = 0) -> Tensor:
    """Returns one tensor of the output: the recipe's method over the inputs' tensors (the reference's first), in the
    output dtype.  Arithmetic runs in at least float32; DARE draws from a generator seeded with
    `tensor_seed(seed, key)`.  A non-floating tensor is the reference's."""
    reference = tensors[0]
    if not reference.is_floating_point():
        return reference.clone()
    dtype = torch.promote_types(reference.dtype, torch.float32)
    inputs = [t.to(dtype) for t in tensors]
    params = recipe.params
    if recipe.method == "linear":
        merged = mergekit_methods.linear(inputs, recipe.weights, params["normalize"])
    elif recipe.method == "slerp":
        merged = mergekit_methods.slerp(float(params["t"]), inputs[0], inputs[1])
    else:
        method = METHODS[recipe.method]
        generator = torch.Generator(device=reference.device).manual_seed(tensor_seed(seed, key))
        merged = mergekit_methods.generalized_task_arithmetic(
            inputs[0],
            inputs[1:],
            recipe.weights,
            recipe.densities,
            method.sparsification,
            method.consensus,
            bool(params["normalize"]),
            bool(params["rescale"]),
            float(params["lambda"]),
            generator,
        )
    return merged.to(recipe.output_dtype or reference.dtype)
