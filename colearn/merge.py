"""Weight-space merging of partner models relative to their common ancestor.

Every operator merges TASK VECTORS (delta = partner - ancestor; Ilharco et al. 2023,
"Editing Models with Task Arithmetic") of one tensor, with the common signature
``fn(deltas, weights, density, seed, **params) -> merged delta``.  `merge_tensor`
applies one to a single tensor (the streaming form), `merge_state_dicts` to whole
state dicts and `merge_safetensors_files` to checkpoints on disk.

How `weights` act depends on the method, as in the papers and in peft:

* normalized, only their ratio matters: ``linear``, ``slerp``, ``model_stock``;
* scaled sum ``sum_i w_i * delta_i``: ``task_arithmetic``, ``magnitude_prune``,
  ``dare_linear``, ``breadcrumbs``;
* sign-elected mean of ``w_i * delta_i`` over the partners that agree with the
  elected sign: ``ties``, ``dare_ties``, ``della``.

So weights ``[0.5, 0.5]`` average two partners under the first two conventions,
while the sign-elected methods need ``[1, 1]`` for the same step size.
"""

from __future__ import annotations

import fnmatch
import inspect
import math
import os
import re
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager, suppress
from typing import Any

import torch
from peft.utils import merge_utils
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from colearn.errors import ColearnError

MergeFn = Callable[..., Tensor]

# Below this norm a task vector has no direction: slerp falls back to linear, cosines are 0.
_TINY_NORM = 1e-8
# Above this |cos| the two task vectors are colinear and slerp's sin(omega) ~ 0 (as in mergekit).
_COLINEAR_COS = 0.9995
_SIGN_METHODS = ("total", "frequency")


class MergeError(ColearnError, ValueError):
    """A merge recipe or a set of checkpoints that cannot be merged; the message names the field and the fix."""


# --------------------------------------------------------------------------- helpers


@contextmanager
def _peft_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Seeds the global RNG that peft's random pruning draws from, restoring the caller's RNG afterwards."""
    devices = [device] if device.type == "cuda" else []  # the CPU state is always saved and restored
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@contextmanager
def _full_density_is_fine() -> Iterator[None]:
    # peft warns on every tensor when density >= 1; here that is a legitimate "no pruning" setting.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"The density .* no pruning")
        yield


def _normalized(weights: Tensor, method: str) -> Tensor:
    """Returns weights divided by their sum (for the methods where only the ratio matters)."""
    total = weights.sum()
    if total.abs() < 1e-12:
        raise MergeError(
            f"merge.weights={weights.tolist()} sum to 0 but merge.method={method!r} divides by their sum; "
            "make the sum non-zero"
        )
    return weights / total


def _cosine(a: Tensor, b: Tensor) -> float:
    """Returns the cosine between two flattened tensors, 0.0 when either has (almost) no norm."""
    a, b = a.flatten(), b.flatten()  # (n,), (n,)
    norm_a, norm_b = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    if min(norm_a, norm_b) <= _TINY_NORM:
        return 0.0
    return float((a @ b) / (norm_a * norm_b))


def _check_sign_method(majority_sign_method: str) -> None:
    if majority_sign_method not in _SIGN_METHODS:
        raise MergeError(
            f"merge.params.majority_sign_method={majority_sign_method!r} is unknown; "
            f"choose one of {list(_SIGN_METHODS)}"
        )


def _sign_elected_mean(stacked: Tensor, weights: Tensor, majority_sign_method: str) -> Tensor:
    """Returns the TIES disjoint mean (Yadav et al. 2023) of weighted task vectors stacked on dim 0."""
    mask = merge_utils.calculate_majority_sign_mask(stacked, method=majority_sign_method)  # (N, *shape)
    weighted = stacked * merge_utils.reshape_weight_task_tensors(stacked, weights)  # (N, *shape)
    return merge_utils.disjoint_merge(weighted, mask)  # (*shape)


# --------------------------------------------------------------------------- operators


def linear(deltas: list[Tensor], weights: Tensor, density: float, seed: int) -> Tensor:
    """Returns the weighted average of the task vectors (= weighted average of the models)."""
    return merge_utils.task_arithmetic(deltas, _normalized(weights, "linear"))


def task_arithmetic(deltas: list[Tensor], weights: Tensor, density: float, seed: int) -> Tensor:
    """Returns the weighted sum of the task vectors (Ilharco et al. 2023, Task Arithmetic; peft)."""
    return merge_utils.task_arithmetic(deltas, weights)


def slerp(deltas: list[Tensor], weights: Tensor, density: float, seed: int) -> Tensor:
    """Returns the spherical interpolation of two task vectors at t = weights[1] / sum(weights).

    Shoemake 1985, applied to task vectors as in WARP (Ramé et al. 2024): each tensor is
    flattened, the angle comes from the unit directions and the unnormalized vectors are
    interpolated, so t=0 gives delta A and t=1 delta B.  Falls back to `linear` when the
    two are (anti)colinear or either is ~0, where the angle is undefined.
    """
    if len(deltas) != 2:
        raise MergeError(
            f"merge.method='slerp' merges exactly 2 partners, got {len(deltas)}; use linear or model_stock"
        )
    t = _normalized(weights, "slerp")[1]
    a, b = deltas  # (*shape) each
    if min(torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)) <= _TINY_NORM:
        return linear(deltas, weights, density, seed)
    cos = _cosine(a, b)
    if abs(cos) > _COLINEAR_COS:
        return linear(deltas, weights, density, seed)
    omega = torch.arccos(torch.tensor(cos, dtype=a.dtype))
    return (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)


def ties(
    deltas: list[Tensor], weights: Tensor, density: float, seed: int, majority_sign_method: str = "total"
) -> Tensor:
    """Returns the TIES merge (Yadav et al. 2023; peft): trim to the top-`density` magnitudes, elect signs,
    then the disjoint mean."""
    _check_sign_method(majority_sign_method)
    with _full_density_is_fine():
        return merge_utils.ties(deltas, weights, density, majority_sign_method)


def dare_linear(deltas: list[Tensor], weights: Tensor, density: float, seed: int) -> Tensor:
    """Returns the DARE merge (Yu et al. 2024): drop at rate 1-density, rescale by 1/density, weighted sum (peft)."""
    with _peft_rng(seed, deltas[0].device), _full_density_is_fine():
        return merge_utils.dare_linear(deltas, weights, density)


def dare_ties(
    deltas: list[Tensor], weights: Tensor, density: float, seed: int, majority_sign_method: str = "total"
) -> Tensor:
    """Returns the DARE-TIES merge (Yu et al. 2024): DARE's random drop and rescale, then TIES sign election (peft)."""
    _check_sign_method(majority_sign_method)
    with _peft_rng(seed, deltas[0].device), _full_density_is_fine():
        return merge_utils.dare_ties(deltas, weights, density, majority_sign_method)


def magnitude_prune(deltas: list[Tensor], weights: Tensor, density: float, seed: int) -> Tensor:
    """Returns the weighted sum of the task vectors each trimmed to its top-`density` magnitudes (peft)."""
    with _full_density_is_fine():
        return merge_utils.magnitude_prune(deltas, weights, density)


def della_keep_probabilities(delta: Tensor, density: float, epsilon: float) -> Tensor:
    """Returns DELLA's per-element keep probabilities (Deep et al. 2024, MagPrune).

    Linear in the element's magnitude rank within the tensor: the smallest magnitude gets
    density - epsilon/2 and the largest density + epsilon/2, so the mean stays `density`.
    The window narrows near 0 and 1 so that every probability stays in [0, 1].
    """
    n = delta.numel()
    half = min(epsilon / 2, 1.0 - density, density)
    ranks = delta.abs().flatten().argsort(stable=True).argsort()  # (n,) 0 = smallest magnitude
    spread = (2 * ranks - (n - 1)).to(delta.dtype) / max(n - 1, 1)  # (n,) in [-1, 1]
    return (density + half * spread).view_as(delta)


def della(
    deltas: list[Tensor],
    weights: Tensor,
    density: float,
    seed: int,
    epsilon: float = 0.1,
    majority_sign_method: str = "total",
) -> Tensor:
    """Returns the DELLA merge (Deep et al. 2024): magnitude-ranked random drop, kept elements rescaled by
    1 / p_keep, then TIES sign election and disjoint mean."""
    if not (math.isfinite(epsilon) and 0.0 <= epsilon <= 1.0):
        raise MergeError(
            f"merge.params.epsilon={epsilon!r} must be in [0, 1] (the width of DELLA's drop-probability window)"
        )
    _check_sign_method(majority_sign_method)
    generator = torch.Generator(device=deltas[0].device).manual_seed(seed)
    pruned = []
    for delta in deltas:
        keep = della_keep_probabilities(delta, density, epsilon)  # (*shape)
        kept = torch.bernoulli(keep, generator=generator).bool()  # (*shape)
        # Where keep == 0 nothing is kept, so the 0/0 in the untaken branch never surfaces.
        pruned.append(torch.where(kept, delta / keep, torch.zeros_like(delta)))
    return _sign_elected_mean(torch.stack(pruned), weights, majority_sign_method)


def breadcrumbs_mask(delta: Tensor, density: float, gamma: float) -> Tensor:
    """Returns the Model Breadcrumbs mask (Davari & Belilovsky 2023) of one task vector.

    True for the elements ranked just below the largest `gamma` fraction by magnitude,
    `density` of them: both the outlier tail and the small-magnitude tail are masked out.
    """
    n = delta.numel()
    n_top = round(gamma * n)
    n_keep = min(round(density * n), n - n_top)
    order = delta.abs().flatten().argsort(descending=True, stable=True)  # (n,) largest first
    mask = torch.zeros(n, dtype=torch.bool, device=delta.device)  # (n,)
    mask[order[n_top : n_top + n_keep]] = True
    return mask.view_as(delta)


def breadcrumbs(deltas: list[Tensor], weights: Tensor, density: float, seed: int, gamma: float = 0.01) -> Tensor:
    """Returns the weighted sum of task vectors masked by Model Breadcrumbs (Davari & Belilovsky 2023)."""
    if not (math.isfinite(gamma) and 0.0 <= gamma < 1.0):
        raise MergeError(f"merge.params.gamma={gamma!r} must be in [0, 1) (the fraction of largest magnitudes dropped)")
    return merge_utils.task_arithmetic([d * breadcrumbs_mask(d, density, gamma) for d in deltas], weights)


def model_stock_ratio(deltas: list[Tensor]) -> float:
    """Returns Model Stock's interpolation ratio t = N cos / (1 + (N-1) cos) (Jang et al. 2024).

    cos is the mean pairwise cosine between task vectors, clipped to [0, 1]: the paper's
    geometry assumes non-negative angles, and opposing task vectors should pull the merge
    back to the ancestor (t = 0) rather than flip it.
    """
    n = len(deltas)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    cos = min(max(sum(_cosine(deltas[i], deltas[j]) for i, j in pairs) / len(pairs), 0.0), 1.0)
    return n * cos / (1 + (n - 1) * cos)


def model_stock(deltas: list[Tensor], weights: Tensor, density: float, seed: int) -> Tensor:
    """Returns the Model Stock merge (Jang et al. 2024): t times the (weighted) average of the task vectors.

    t interpolates between the ancestor (t=0, orthogonal partners) and the partners'
    average (t=1, identical partners).
    """
    if len(deltas) < 2:
        raise MergeError(f"merge.method='model_stock' needs at least 2 partners, got {len(deltas)}")
    return model_stock_ratio(deltas) * linear(deltas, weights, density, seed)


METHODS: dict[str, MergeFn] = {
    "linear": linear,
    "task_arithmetic": task_arithmetic,
    "slerp": slerp,
    "ties": ties,
    "dare_linear": dare_linear,
    "dare_ties": dare_ties,
    "magnitude_prune": magnitude_prune,
    "della": della,
    "breadcrumbs": breadcrumbs,
    "model_stock": model_stock,
}


def get_method(name: str) -> MergeFn:
    """Returns the merge operator registered under `name`."""
    if name not in METHODS:
        raise MergeError(f"merge.method={name!r} is unknown; choose one of {sorted(METHODS)}")
    return METHODS[name]


# Methods whose weights act as a sign-elected mean: weight 1 per partner is a full step.
_SIGN_ELECTED = frozenset({"ties", "dare_ties", "della"})


def default_weights(method: str, n_partners: int) -> list[float]:
    """Returns equal weights that make `method` take one full averaging step: 1/N each, or 1 each for the
    sign-elected methods (ties, dare_ties, della), whose disjoint mean already divides by the count."""
    get_method(method)
    return [1.0] * n_partners if method in _SIGN_ELECTED else [1.0 / n_partners] * n_partners


def method_params(name: str) -> list[str]:
    """Returns the names of the extra parameters (beyond deltas, weights, density, seed) the method takes."""
    signature = inspect.signature(get_method(name))
    return [p for p in signature.parameters if p not in ("deltas", "weights", "density", "seed")]


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


def _check_weights(weights: Sequence[float], n_partners: int, field: str) -> None:
    if len(weights) != n_partners:
        raise MergeError(f"{field} has {len(weights)} entries for {n_partners} partners; give one weight per partner")
    if not all(isinstance(w, (int, float)) and math.isfinite(w) for w in weights):
        raise MergeError(f"{field}={list(weights)} must be finite numbers")
    if not any(w != 0 for w in weights):
        raise MergeError(f"{field}={list(weights)} are all zero; give at least one partner a non-zero weight")


def _check_fraction(value: float, field: str, low_open: bool) -> None:
    in_range = isinstance(value, (int, float)) and math.isfinite(value) and value <= 1
    if not in_range or (value <= 0 if low_open else value < 0):
        interval = "(0, 1]" if low_open else "[0, 1]"
        raise MergeError(f"{field}={value!r} must be in {interval}")


def _check_params(method: str, params: Mapping[str, Any], field: str) -> None:
    allowed = method_params(method)
    for name in params:
        if name not in allowed:
            raise MergeError(
                f"{field}.{name} is not a parameter of merge.method={method!r}; it takes {allowed or 'none'}"
            )


def check_recipe(
    method: str,
    n_partners: int,
    weights: Sequence[float],
    density: float = 1.0,
    to_ancestor: float = 0.0,
    params: Mapping[str, Any] | None = None,
    groups: Mapping[str, Mapping[str, Any]] | None = None,
) -> None:
    """Raises MergeError naming the first invalid field of a merge recipe, including every group override."""
    get_method(method)
    if n_partners < 1:
        raise MergeError("merge needs at least one partner")
    _check_weights(weights, n_partners, "merge.weights")
    _check_fraction(density, "merge.density", low_open=True)
    _check_fraction(to_ancestor, "merge.to_ancestor", low_open=False)
    _check_params(method, params or {}, "merge.params")
    for pattern, override in (groups or {}).items():
        where = f"merge.groups[{pattern!r}]"
        if "weights" in override:
            _check_weights(override["weights"], n_partners, f"{where}.weights")
        if "density" in override:
            _check_fraction(override["density"], f"{where}.density", low_open=True)
        if "to_ancestor" in override:
            _check_fraction(override["to_ancestor"], f"{where}.to_ancestor", low_open=False)
        _check_params(method, {k: v for k, v in override.items() if k not in _RECIPE_FIELDS}, where)


def check_groups_match(groups: Mapping[str, Any] | None, keys: Iterable[str]) -> None:
    """Raises MergeError for a group pattern that matches none of the keys' layer groups (most likely a typo)."""
    names = group_names(keys)
    for pattern in groups or {}:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            raise MergeError(f"merge.groups[{pattern!r}] matches no layer group; the groups here are {names}")


def group_recipe(
    group: str,
    weights: Sequence[float],
    density: float = 1.0,
    to_ancestor: float = 0.0,
    params: Mapping[str, Any] | None = None,
    groups: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Returns {weights, density, to_ancestor, params} for one layer group.

    Every `groups` entry whose key equals or fnmatch-matches the group overrides the global
    values, in the dict's order (later entries win); keys other than weights, density and
    to_ancestor are method params.
    """
    recipe: dict[str, Any] = {"weights": list(weights), "density": density, "to_ancestor": to_ancestor}
    merged_params = dict(params or {})
    for pattern, override in (groups or {}).items():
        if fnmatch.fnmatchcase(group, pattern):
            for name, value in override.items():
                if name in _RECIPE_FIELDS:
                    recipe[name] = list(value) if name == "weights" else value
                else:
                    merged_params[name] = value
    recipe["params"] = merged_params
    return recipe


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
    method: str,
    weights: Sequence[float],
    density: float = 1.0,
    to_ancestor: float = 0.0,
    seed: int = 0,
    params: Mapping[str, Any] | None = None,
    groups: Mapping[str, Mapping[str, Any]] | None = None,
) -> Tensor:
    """Returns ancestor + (1 - to_ancestor) * merged task vector for one tensor, in the ancestor's dtype.

    The recipe is the global one with `groups` overrides for the key's `layer_group`;
    `seed` is the global seed (the tensor's own comes from `tensor_seed`).  `to_ancestor`
    is WARP's interpolation toward the initialization (Ramé et al. 2024).  Arithmetic runs
    in at least float32; non-floating tensors are copied from partner 0.
    """
    recipe = group_recipe(layer_group(key), weights, density, to_ancestor, params, groups)
    check_recipe(method, len(partners), recipe["weights"], recipe["density"], recipe["to_ancestor"], recipe["params"])
    for index, partner in enumerate(partners):
        if partner.shape != ancestor.shape:
            raise _shape_error(key, index, partner.shape, ancestor.shape)
    if not ancestor.is_floating_point():
        return _shared_buffer(key, partners)
    if recipe["to_ancestor"] == 1:
        return ancestor.clone()
    dtype = torch.promote_types(ancestor.dtype, torch.float32)  # bf16/fp16 deltas lose too much
    base = ancestor.to(dtype)  # (*shape)
    deltas = [partner.to(dtype) - base for partner in partners]  # N x (*shape)
    weight_tensor = torch.tensor(recipe["weights"], dtype=dtype, device=base.device)  # (N,)
    merged = get_method(method)(deltas, weight_tensor, recipe["density"], tensor_seed(seed, key), **recipe["params"])
    return (base + (1 - recipe["to_ancestor"]) * merged).to(ancestor.dtype)


def _shapes(state: Mapping[str, Tensor]) -> dict[str, torch.Size]:
    return {key: tensor.shape for key, tensor in state.items()}


def merge_state_dicts(
    ancestor: Mapping[str, Tensor],
    partners: Sequence[Mapping[str, Tensor]],
    method: str,
    weights: Sequence[float],
    density: float = 1.0,
    to_ancestor: float = 0.0,
    seed: int = 0,
    params: Mapping[str, Any] | None = None,
    groups: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Tensor]:
    """Returns the offspring state dict: every tensor merged by `merge_tensor`, in the ancestor's key order.

    The recipe, the group patterns and the partners' keys and shapes are all checked
    before any tensor is merged.
    """
    check_recipe(method, len(partners), weights, density, to_ancestor, params, groups)
    check_same_tensors(_shapes(ancestor), [_shapes(p) for p in partners])
    check_groups_match(groups, ancestor)
    return {
        key: merge_tensor(
            key, tensor, [p[key] for p in partners], method, weights, density, to_ancestor, seed, params, groups
        )
        for key, tensor in ancestor.items()
    }


def _header_shapes(handle: Any) -> dict[str, list[int]]:
    """Returns the tensor shapes of an open safetensors file, read from its header without loading data."""
    return {key: handle.get_slice(key).get_shape() for key in handle.keys()}


def merge_safetensors_files(
    ancestor_path: str | os.PathLike[str],
    partner_paths: Sequence[str | os.PathLike[str]],
    out_path: str | os.PathLike[str],
    method: str,
    weights: Sequence[float],
    density: float = 1.0,
    to_ancestor: float = 0.0,
    seed: int = 0,
    params: Mapping[str, Any] | None = None,
    groups: Mapping[str, Mapping[str, Any]] | None = None,
) -> None:
    """Writes the offspring of single-file safetensors checkpoints to `out_path`, atomically.

    Inputs are read tensor by tensor with `safe_open` and never loaded whole; the output is
    accumulated in memory and written to a temporary file that then replaces `out_path`.
    Returns nothing; the output carries the ancestor's metadata.
    """
    check_recipe(method, len(partner_paths), weights, density, to_ancestor, params, groups)
    with ExitStack() as stack:
        ancestor = stack.enter_context(safe_open(os.fspath(ancestor_path), framework="pt"))
        partners = [stack.enter_context(safe_open(os.fspath(p), framework="pt")) for p in partner_paths]
        check_same_tensors(_header_shapes(ancestor), [_header_shapes(p) for p in partners])
        check_groups_match(groups, ancestor.keys())
        merged = {
            key: merge_tensor(
                key, ancestor.get_tensor(key), [p.get_tensor(key) for p in partners],
                method, weights, density, to_ancestor, seed, params, groups,
            )
            for key in ancestor.keys()
        }
        metadata = ancestor.metadata()
    # A sibling temp file (same filesystem, so the rename is atomic; created by save_file with the usual permissions).
    tmp_path = f"{os.fspath(out_path)}.{os.getpid()}.tmp"
    try:
        save_file(merged, tmp_path, metadata=metadata)
        os.replace(tmp_path, out_path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp_path)
        raise
