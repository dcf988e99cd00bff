"""Weight-space merging of partner models relative to their common ancestor, by recipe.

A `Recipe` names an operator (`colearn.merging.operators.METHODS`), its weights, density and
parameters, WARP's interpolation back toward the ancestor, and overrides per layer group
(`layer_group`: embed, block{i}.attn, block{i}.mlp, head).  `merge_tensor` merges one
tensor chunk by chunk, `merge_state_dicts` whole state dicts; `colearn.merging.streaming` merges
checkpoints on disk tensor by tensor.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from colearn.config import MergeConfig
from colearn.merging.operators import (
    RANDOM_METHODS,
    MergeError,
    Plan,
    default_weights,
    get_method,
    merge_into,
    method_params,
    plan,
)
from colearn.merging.task_vectors import TaskVectors

# --------------------------------------------------------------------------- layer groups

# Parameter-name tokens that place a tensor inside a transformer block's MLP or attention.
# A norm goes with the sublayer it feeds: Llama's post_attention_layernorm normalizes the MLP input.
_MLP_TOKENS = frozenset(
    "mlp feed_forward ffn block_sparse_moe moe experts shared_expert fc1 fc2 c_fc dense_h_to_4h dense_4h_to_h "
    "gate_proj up_proj down_proj w1 w2 w3 post_attention_layernorm pre_feedforward_layernorm "
    "post_feedforward_layernorm ffn_norm ln_2 final_layer_norm".split()
)
_ATTN_TOKENS = frozenset(
    "self_attn attn attention self_attention q_proj k_proj v_proj o_proj query_key_value c_attn "
    "input_layernorm ln_1 attention_norm self_attn_layer_norm q_norm k_norm".split()
)
_EMBED_TOKENS = frozenset(
    "embed_tokens wte wpe embed_in word_embeddings embed_positions embeddings tok_embeddings".split()
)
_HEAD_TOKENS = frozenset("lm_head embed_out output norm ln_f final_layernorm final_layer_norm final_norm".split())
_BLOCK = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.(.+)$")


def layer_group(key: str) -> str:
    """Returns the layer group of a causal-LM parameter name.

    One of ``embed``, ``head`` (lm_head and the final norm), ``block{i}.attn``,
    ``block{i}.mlp`` (a block's norms join the sublayer they feed) or ``other``.
    Covers Llama/Qwen/Mistral, GPT-2, GPT-NeoX, OPT, Falcon, Phi and peft-wrapped names.
    """
    block = _BLOCK.search(key)
    if block:
        for token in block.group(2).split("."):
            if token in _MLP_TOKENS:
                return f"block{block.group(1)}.mlp"
            if token in _ATTN_TOKENS:
                return f"block{block.group(1)}.attn"
        return "other"
    tokens = key.split(".")
    if any(t in _EMBED_TOKENS for t in tokens):
        return "embed"
    if any(t in _HEAD_TOKENS for t in tokens):
        return "head"
    return "other"


def _group_order(group: str) -> tuple[int, int, str]:
    # Depth order (embed, block0.attn, block0.mlp, ..., block10..., head, other) rather than
    # lexicographic, where block10 would sort before block2.
    block = re.fullmatch(r"block(\d+)\.(.+)", group)
    if block:
        return (1, int(block.group(1)), block.group(2))
    return ({"embed": 0, "head": 2}.get(group, 3), 0, group)


def group_names(keys: Iterable[str]) -> list[str]:
    """Returns the distinct layer groups of the keys in depth order: embed, block0.attn, block0.mlp, ..., head,
    other."""
    return sorted({layer_group(k) for k in keys}, key=_group_order)


# --------------------------------------------------------------------------- recipes

_RECIPE_FIELDS = ("weights", "density", "to_ancestor")


@dataclass
class Recipe:
    method: str  # one of colearn.merging.operators.METHODS
    weights: list[float]  # one per partner (see colearn.merging.operators for how each method uses them)
    density: float = 1.0  # fraction of each task vector kept (TIES/DARE/DELLA/breadcrumbs/magnitude_prune)
    to_ancestor: float = 0.0  # 0 keeps the merge, 1 returns the ancestor (WARP's interpolation toward init)
    params: dict[str, Any] = field(default_factory=dict)  # extra operator parameters (gamma, epsilon, ...)
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)  # layer-group pattern -> overrides
    seed: int = 0  # seed of the random operators; each tensor's own comes from `tensor_seed`

    @classmethod
    def from_config(cls, cfg: MergeConfig, n_partners: int, method: str | None = None) -> Recipe:
        """Returns the recipe of a MergeConfig (equal weights when merge.weights is empty) for `method`
        (default merge.method; evolve passes its base_method)."""
        method = method or cfg.method
        weights = list(cfg.weights) or default_weights(method, n_partners)
        return cls(
            method,
            weights,
            cfg.density,
            cfg.to_ancestor,
            dict(cfg.params),
            {k: dict(v) for k, v in cfg.groups.items()},
            cfg.seed,
        )

    def as_dict(self) -> dict[str, Any]:
        """Returns the recipe as plain data (for YAML, lineage.json and metrics)."""
        return dataclasses.asdict(self)

    def check(self, n_partners: int) -> Recipe:
        """Returns the recipe; raises MergeError naming its first invalid field, group overrides included."""
        get_method(self.method)
        if n_partners < 1:
            raise MergeError("merge needs at least one partner")
        _check_weights(self.weights, n_partners, "merge.weights")
        if self.method == "slerp" and n_partners != 2:  # an angle between two vectors: known before any tensor
            raise MergeError(
                f"merge.method='slerp' merges exactly 2 partners, got {n_partners}; use linear or model_stock"
            )
        _check_fraction(self.density, "merge.density", low_open=True)
        _check_fraction(self.to_ancestor, "merge.to_ancestor", low_open=False)
        _check_params(self.method, self.params, "merge.params")
        for pattern, override in self.groups.items():
            where = f"merge.groups[{pattern!r}]"
            if "weights" in override:
                _check_weights(override["weights"], n_partners, f"{where}.weights")
            if "density" in override:
                _check_fraction(override["density"], f"{where}.density", low_open=True)
            if "to_ancestor" in override:
                _check_fraction(override["to_ancestor"], f"{where}.to_ancestor", low_open=False)
            _check_params(self.method, {k: v for k, v in override.items() if k not in _RECIPE_FIELDS}, where)
        return self

    def check_groups_match(self, keys: Iterable[str]) -> None:
        """Raises MergeError for a group pattern that matches none of the keys' layer groups (most likely a typo)."""
        names = group_names(keys)
        for pattern in self.groups:
            if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
                raise MergeError(f"merge.groups[{pattern!r}] matches no layer group; the groups here are {names}")

    def for_group(self, group: str) -> Recipe:
        """Returns the recipe of one layer group: every `groups` entry whose pattern fnmatch-matches the group
        overrides the global values, in order (later entries win); keys other than weights, density and
        to_ancestor are operator params."""
        values: dict[str, Any] = {
            "weights": list(self.weights),
            "density": self.density,
            "to_ancestor": self.to_ancestor,
        }
        params = dict(self.params)
        for pattern, override in self.groups.items():
            if fnmatch.fnmatchcase(group, pattern):
                for name, value in override.items():
                    if name in _RECIPE_FIELDS:
                        values[name] = list(value) if name == "weights" else value
                    else:
                        params[name] = value
        return Recipe(self.method, params=params, groups={}, seed=self.seed, **values)

    def restricted_to(self, keys: Iterable[str]) -> Recipe:
        """Returns the recipe with only the group patterns that match some of the keys' layer groups (one shard
        of a checkpoint need not hold every group)."""
        names = group_names(keys)
        groups = {p: v for p, v in self.groups.items() if any(fnmatch.fnmatchcase(n, p) for n in names)}
        return dataclasses.replace(self, groups=groups)


def _check_weights(weights: Sequence[float], n_partners: int, name: str) -> None:
    if len(weights) != n_partners:
        raise MergeError(f"{name} has {len(weights)} entries for {n_partners} partners; give one weight per partner")
    if not all(isinstance(w, (int, float)) and math.isfinite(w) for w in weights):
        raise MergeError(f"{name}={list(weights)} must be finite numbers")
    if not any(w != 0 for w in weights):
        raise MergeError(f"{name}={list(weights)} are all zero; give at least one partner a non-zero weight")


def _check_fraction(value: float, name: str, low_open: bool) -> None:
    in_range = isinstance(value, (int, float)) and math.isfinite(value) and value <= 1
    if not in_range or (value <= 0 if low_open else value < 0):
        interval = "(0, 1]" if low_open else "[0, 1]"
        raise MergeError(f"{name}={value!r} must be in {interval}")


def _check_params(method: str, params: Mapping[str, Any], name: str) -> None:
    allowed = method_params(method)
    for param in params:
        if param not in allowed:
            raise MergeError(
                f"{name}.{param} is not a parameter of merge.method={method!r}; it takes {allowed or 'none'}"
            )


# --------------------------------------------------------------------------- tensors and state dicts


def tensor_seed(seed: int, key: str) -> int:
    """Returns the seed of one tensor: `seed` plus a stable hash of its name.

    A hash rather than a position, so a tensor's random draws don't depend on which other
    tensors are merged, in what order, or whether they are streamed one by one.
    """
    return (seed + zlib.crc32(key.encode())) % 2**63


_SAME_ARCHITECTURE = "partners must share the ancestor's architecture"


def _shape_error(key: str, index: int, shape: Sequence[int], ancestor_shape: Sequence[int]) -> MergeError:
    return MergeError(
        f"partner {index} tensor {key!r} has shape {tuple(shape)} but the ancestor has {tuple(ancestor_shape)}: "
        f"{_SAME_ARCHITECTURE}"
    )


def check_same_tensors(
    ancestor_shapes: Mapping[str, Sequence[int]], partner_shapes: Sequence[Mapping[str, Sequence[int]]]
) -> None:
    """Raises MergeError naming the first (in sorted key order) tensor a partner lacks, adds, or shapes differently."""
    for key in sorted(set(ancestor_shapes).union(*partner_shapes)):
        for index, shapes in enumerate(partner_shapes):
            if key not in shapes:
                raise MergeError(f"partner {index} lacks tensor {key!r} that the ancestor has: {_SAME_ARCHITECTURE}")
            if key not in ancestor_shapes:
                raise MergeError(f"partner {index} has tensor {key!r} that the ancestor lacks: {_SAME_ARCHITECTURE}")
            if tuple(shapes[key]) != tuple(ancestor_shapes[key]):
                raise _shape_error(key, index, shapes[key], ancestor_shapes[key])


def _shared_buffer(key: str, partners: Sequence[Tensor]) -> Tensor:
    """Returns partner 0's copy of a non-floating tensor (e.g. an int buffer), which all partners must share."""
    for index, tensor in enumerate(partners[1:], start=1):
        if not torch.equal(tensor, partners[0]):
            raise MergeError(
                f"partner {index} tensor {key!r} is not floating point and differs from partner 0's; "
                "such buffers cannot be merged"
            )
    return partners[0].clone()


def merge_tensor(
    key: str,
    ancestor: Tensor,
    partners: Sequence[Tensor],
    recipe: Recipe,
    out: Tensor | None = None,
    planned: Plan | None = None,
) -> Tensor:
    """Returns ancestor + (1 - to_ancestor) * merged task vector for one tensor, in the ancestor's dtype.

    The recipe (checked by the caller) applies with its `groups` overrides for the key's
    `layer_group`; the random operators draw from `tensor_seed(recipe.seed, key)`.
    `to_ancestor` is WARP's interpolation toward the initialization (Ramé et al. 2024).
    Arithmetic runs in at least float32, one chunk at a time, on the tensors' device, so the
    only full-size allocation is the result (and DELLA's keep probabilities, one per partner),
    written into `out` when given (a flat buffer of at least ancestor.numel() elements of its
    dtype, reused by a streaming caller: fresh memory costs a page fault per 4 KiB);
    non-floating tensors are copied from partner 0.  `planned` is `plan_tensor` of the same
    arguments, made ahead.
    """
    here = recipe.for_group(layer_group(key))
    for index, partner in enumerate(partners):
        if partner.shape != ancestor.shape:
            raise _shape_error(key, index, partner.shape, ancestor.shape)
    if not ancestor.is_floating_point():
        return _shared_buffer(key, partners)
    if here.to_ancestor == 1:
        return ancestor.clone()
    tv, weights = _task_vectors(ancestor, partners, here)
    if out is None or out.numel() < ancestor.numel() or out.dtype != ancestor.dtype:
        out = torch.empty(ancestor.numel(), dtype=ancestor.dtype, device=ancestor.device)  # (n,)
    out = out[: ancestor.numel()]
    merge_into(
        out,
        here.method,
        tv,
        weights,
        here.density,
        tensor_seed(here.seed, key),
        here.params,
        step=1 - here.to_ancestor,
        planned=planned,
    )
    return out.view_as(ancestor)


def plan_tensor(key: str, ancestor: Tensor, partners: Sequence[Tensor], recipe: Recipe) -> Plan | None:
    """Returns the operator's plan for one tensor (`colearn.merging.operators.plan`), for `merge_tensor` to apply; a
    streaming caller makes it on another thread while the previous tensor merges. None where nothing is worth
    planning ahead: tensors `merge_tensor` copies, mismatched shapes (it raises), and the random operators, whose
    plans can hold a whole tensor (DELLA's keep probabilities: two at once would break the memory bound)."""
    here = recipe.for_group(layer_group(key))
    if (
        here.method in RANDOM_METHODS
        or not ancestor.is_floating_point()
        or here.to_ancestor == 1
        or any(p.shape != ancestor.shape for p in partners)
    ):
        return None
    tv, weights = _task_vectors(ancestor, partners, here)
    return plan(here.method, tv, weights, here.density, here.params)


def _task_vectors(ancestor: Tensor, partners: Sequence[Tensor], here: Recipe) -> tuple[TaskVectors, Tensor]:
    dtype = torch.promote_types(ancestor.dtype, torch.float32)  # bf16/fp16 deltas lose too much
    tv = TaskVectors([p.reshape(-1) for p in partners], ancestor.reshape(-1), dtype)
    return tv, torch.tensor(here.weights, dtype=dtype, device=ancestor.device)  # (N,)


def _shapes(state: Mapping[str, Tensor]) -> dict[str, torch.Size]:
    return {key: tensor.shape for key, tensor in state.items()}


def merge_state_dicts(
    ancestor: Mapping[str, Tensor], partners: Sequence[Mapping[str, Tensor]], recipe: Recipe
) -> dict[str, Tensor]:
    """Returns the offspring state dict: every tensor merged by `merge_tensor`, in the ancestor's key order.

    The recipe, the group patterns and the partners' keys and shapes are all checked
    before any tensor is merged.
    """
    recipe.check(len(partners))
    check_same_tensors(_shapes(ancestor), [_shapes(p) for p in partners])
    recipe.check_groups_match(ancestor)
    return {key: merge_tensor(key, tensor, [p[key] for p in partners], recipe) for key, tensor in ancestor.items()}
