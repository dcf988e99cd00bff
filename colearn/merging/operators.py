"""Merge operators: how N task vectors of one tensor become one merged task vector.

A task vector is partner - ancestor (Ilharco et al. 2023, "Editing Models with Task
Arithmetic").  An operator is planned once per tensor and then applied chunk by chunk:
``METHODS[name](tv, weights, density, **params)`` reads what it needs of the whole tensor
(angles, trim thresholds, ranks) from `TaskVectors` and returns a `Plan`, whose `ChunkMerge`
is applied to every flat chunk in order.  The result does not depend on the chunk size except
for the random draws of DARE and DELLA (fixed by the seed).  Every operator is torch code that
runs on its inputs' device.

How `weights` act depends on the method, as in the papers and in peft:

* normalized, only their ratio matters: ``linear``, ``slerp``, ``model_stock``;
* scaled sum ``sum_i w_i * delta_i``: ``task_arithmetic``, ``magnitude_prune``,
  ``dare_linear``, ``breadcrumbs``;
* sign-elected mean of ``w_i * delta_i`` over the partners that agree with the
  elected sign: ``ties``, ``dare_ties``, ``della``.

So weights ``[0.5, 0.5]`` average two partners under the first two conventions,
while the sign-elected methods need ``[1, 1]`` for the same step size.

peft's `merge_utils` is the reference: the operators compute what peft's functions compute
(tests compare them on random tensors; DARE draws its masks as peft does, chunk by chunk) in
fewer passes, because a merge should cost little more than reading its inputs.
Magnitude trimming (TIES, magnitude_prune, breadcrumbs) keeps the elements at or above an
exact k-th largest magnitude (`colearn.merging.trimming`) instead of peft's whole-tensor `topk`: the
same set wherever magnitudes don't tie at the threshold.  A `ChunkMerge` may overwrite the
chunks it is given.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from colearn.errors import ColearnError
from colearn.merging.task_vectors import CHUNK, TINY_NORM, TaskVectors, cosines, gram_matrix
from colearn.merging.trimming import ChunkMerge, Levels, magnitude_thresholds, shrink, shrink_levels, stratified_sample

_COLINEAR_COS = 0.9995  # above this |cos| slerp's sin(omega) ~ 0 (as in mergekit)
_SIGN_METHODS = ("total", "frequency")
_SORT_PART = 1 << 21  # DELLA sorts a tensor's magnitudes in value ranges of about this many elements
_BITS = {torch.float32: torch.int32, torch.float64: torch.int64}  # magnitudes' bits sort like their values


class MergeError(ColearnError, ValueError):
    """A merge recipe or a set of checkpoints that cannot be merged; the message names the field and the fix."""


@dataclass
class Plan:
    """How an operator merges one tensor: `merge` applied to every chunk in order."""

    merge: ChunkMerge
    coefficients: list[float] | None = None  # when the merge is sum_i c_i * delta_i (see `merge_into`)


def della_keep_probabilities(delta: Tensor, density: float, epsilon: float) -> Tensor:
    """Returns DELLA's per-element keep probabilities (Deep et al. 2024, MagPrune).

    Linear in the element's magnitude rank within the tensor (ties ranked by position): the
    smallest magnitude gets density - epsilon/2 and the largest density + epsilon/2, so the
    mean stays `density`.  The window narrows near 0 and 1 so that every probability stays in
    [0, 1].
    """
    return _keep_probabilities(delta.abs().flatten(), density, epsilon).view_as(delta)


def _keep_probabilities(magnitudes: Tensor, density: float, epsilon: float) -> Tensor:
    """Returns the keep probabilities of a 1-D tensor of magnitudes (see `della_keep_probabilities`), written over
    the magnitudes."""
    n = magnitudes.numel()
    half = min(epsilon / 2, 1.0 - density, density) if n > 1 else 0.0
    step = 2 * half / max(n - 1, 1)
    rank = 0
    for positions in ascending_order(magnitudes):
        for start in range(0, positions.numel(), CHUNK):  # in slices: no float64 full-size temporary
            where = positions[start : start + CHUNK]
            ranks = torch.arange(rank, rank + where.numel(), dtype=torch.float64, device=magnitudes.device)
            magnitudes[where] = (density - half + step * ranks).to(magnitudes.dtype)
            rank += where.numel()
    return magnitudes


def ascending_order(x: Tensor) -> Iterator[Tensor]:
    """Yields the positions of a 1-D tensor of magnitudes (>= 0, or NaN) in stable ascending order (NaN last), in
    parts; the elements of a part yielded are not read again, so the caller may overwrite them.

    float32 and float64 magnitudes are sorted by their bits as integers, which order like
    the values and sort ~4x faster on the CPU.  A sort's indices and buffers take several
    times its input, so a tensor of more than `_SORT_PART` elements is cut at quantiles of a
    sample into value ranges of about that many, each gathered and sorted on its own; which
    range each element falls in is marked first, in a byte.
    """
    n = x.numel()
    keys = x.view(_BITS[x.dtype]) if x.dtype in _BITS else x
    parts = min(-(-n // _SORT_PART), 256)
    if parts <= 1:
        yield keys.argsort(stable=True)
        return
    sample = x.index_select(0, stratified_sample(n, 64 * parts, x.device)).sort().values  # (64 parts,)
    cuts = sample[64::64].unique().tolist()  # at most 255 ascending values
    part = torch.zeros(n, dtype=torch.uint8, device=x.device)  # (n,) the number of cuts at or below each value
    for cut in cuts:
        part += ~(x < cut)  # NaN counts every cut: the last range
    for index in range(len(cuts) + 1):
        positions = (part == index).nonzero().squeeze(1)  # ascending, so equal values keep their order
        yield positions[keys.index_select(0, positions).argsort(stable=True)]


# --------------------------------------------------------------------------- chunk helpers


def _dropped(deltas: list[Tensor], density: float) -> list[Tensor]:
    """Returns DARE's drop and rescale of each chunk, in place (Yu et al. 2024): each element is kept with probability
    `density` and divided by it; density >= 1 keeps every element.  The masks are drawn from the global RNG, one
    chunk after another in order, as peft's random_pruning draws them."""
    if density >= 1:
        return deltas
    return [d.mul_(torch.bernoulli(torch.full_like(d, density))).div_(density) for d in deltas]


def _normalized(weights: Tensor, method: str) -> Tensor:
    """Returns weights divided by their sum (for the methods where only the ratio matters)."""
    total = weights.sum()
    if total.abs() < 1e-12:
        raise MergeError(
            f"merge.weights={weights.tolist()} sum to 0 but merge.method={method!r} divides by their sum; "
            "make the sum non-zero"
        )
    return weights / total


def _check_sign_method(majority_sign_method: str) -> None:
    if majority_sign_method not in _SIGN_METHODS:
        raise MergeError(
            f"merge.params.majority_sign_method={majority_sign_method!r} is unknown; "
            f"choose one of {list(_SIGN_METHODS)}"
        )


def _sign_elected_mean(deltas: list[Tensor], weights: Sequence[float], majority_sign_method: str) -> Tensor:
    """Returns the TIES disjoint mean (Yadav et al. 2023) of N task-vector chunks (c,), overwriting them.

    The sign with the larger total mass (or count, "frequency") wins, ties going to +; each
    partner's weighted value counts where its sign agrees, and the sum is divided by the
    number of agreeing partners.  This is peft's calculate_majority_sign_mask + disjoint_merge
    (tests compare the two) in float arithmetic: peft's bool and int64 masks cost ~4x more.
    """
    terms = [d.sign() for d in deltas] if majority_sign_method == "frequency" else deltas
    votes = terms[0] + terms[1] if len(terms) > 1 else terms[0].clone()  # (c,)
    for term in terms[2:]:
        votes.add_(term)
    majority = votes.sign_().add_(0.5).sign_()  # (c,) +1 where votes >= 0, else -1
    total = count = None
    for delta, weight in zip(deltas, weights):
        aligned = delta.mul_(majority).clamp_(min=0)  # (c,) |delta| where its sign agrees, else 0 (or pruned)
        agrees = aligned.sign()  # (c,) 1 where it agrees, else 0
        total = aligned.mul_(weight) if total is None else total.add_(aligned, alpha=weight)
        count = agrees if count is None else count.add_(agrees)
    return total.mul_(majority).div_(count.clamp_(min=1))


def _weighted_sum(weights: Sequence[float]) -> ChunkMerge:
    """Returns the chunk merge sum_i w_i * delta_i (peft's task_arithmetic, in place on the chunks)."""

    def merge(where: slice, deltas: list[Tensor]) -> Tensor:
        total = deltas[0].mul_(weights[0])
        for delta, weight in zip(deltas[1:], weights[1:]):
            total.add_(delta, alpha=weight)
        return total

    return merge


def _combination(weights: Sequence[float]) -> Plan:
    """Returns the plan of the merge sum_i w_i * delta_i, which `merge_into` may compute from the models directly."""
    return Plan(_weighted_sum(weights), coefficients=list(weights))


def _trimmed(deltas: list[Tensor], levels: Levels) -> list[Tensor]:
    """Returns each chunk with the magnitudes under its task vector's threshold set to 0 (see `trim_level`)."""
    return [shrink(d, row[0]) for d, row in zip(deltas, levels)]


def _trimmed_plan(tv: TaskVectors, ks: list[int], merge_at: Callable[[Levels], ChunkMerge]) -> Plan:
    """Returns the plan of an operator that trims each task vector at its exact k-th largest magnitudes (`ks`,
    found now by `magnitude_thresholds`) and merges with `merge_at(levels)`."""
    return Plan(merge_at(shrink_levels(magnitude_thresholds(tv, ks), tv.dtype)))


# --------------------------------------------------------------------------- operators


def linear(tv: TaskVectors, weights: Tensor, density: float) -> Plan:
    """Weighted average of the task vectors (= weighted average of the models; Wortsman et al. 2022, model soups)."""
    return _combination(_normalized(weights, "linear").tolist())


def task_arithmetic(tv: TaskVectors, weights: Tensor, density: float) -> Plan:
    """Weighted sum of the task vectors (Ilharco et al. 2023, Task Arithmetic; peft)."""
    return _combination(weights.tolist())


def slerp(tv: TaskVectors, weights: Tensor, density: float) -> Plan:
    """Spherical interpolation of two task vectors at t = weights[1] / sum(weights) (Shoemake 1985).

    Applied to task vectors as in WARP (Ramé et al. 2024): the angle comes from the whole
    tensor's unit directions and the unnormalized vectors are interpolated, so t=0 gives
    delta A and t=1 delta B.  Falls back to `linear` when the two are (anti)colinear or
    either is ~0, where the angle is undefined.
    """
    if len(tv.partners) != 2:
        raise MergeError(
            f"merge.method='slerp' merges exactly 2 partners, got {len(tv.partners)}; use linear or model_stock"
        )
    t = float(_normalized(weights, "slerp")[1])
    gram = gram_matrix(tv)
    cos = float(cosines(gram)[0, 1])
    if float(gram.diagonal().min().clamp(min=0).sqrt()) <= TINY_NORM or abs(cos) > _COLINEAR_COS:
        return linear(tv, weights, density)
    omega = math.acos(cos)
    coefficients = [math.sin((1 - t) * omega) / math.sin(omega), math.sin(t * omega) / math.sin(omega)]
    return _combination(coefficients)


def ties(tv: TaskVectors, weights: Tensor, density: float, majority_sign_method: str = "total") -> Plan:
    """TIES (Yadav et al. 2023): trim each task vector to its top-`density` magnitudes, elect signs, then the
    disjoint mean."""
    _check_sign_method(majority_sign_method)
    w = weights.tolist()

    def merge_at(levels: Levels) -> ChunkMerge:
        return lambda where, deltas: _sign_elected_mean(_trimmed(deltas, levels), w, majority_sign_method)

    if density >= 1:
        return Plan(merge_at([[None]] * len(tv.partners)))
    k = int(density * tv.numel)  # as peft's magnitude pruning: floor
    return _trimmed_plan(tv, [k], merge_at)


def magnitude_prune(tv: TaskVectors, weights: Tensor, density: float) -> Plan:
    """Weighted sum of the task vectors each trimmed to its top-`density` magnitudes (peft's magnitude_prune)."""
    weighted_sum = _weighted_sum(weights.tolist())

    def merge_at(levels: Levels) -> ChunkMerge:
        return lambda where, deltas: weighted_sum(where, _trimmed(deltas, levels))

    if density >= 1:
        return Plan(weighted_sum)
    return _trimmed_plan(tv, [int(density * tv.numel)], merge_at)


def dare_linear(tv: TaskVectors, weights: Tensor, density: float) -> ChunkMerge:
    """DARE (Yu et al. 2024): drop at rate 1-density, rescale by 1/density, weighted sum (peft's dare_linear)."""
    weighted_sum = _weighted_sum(weights.tolist())
    return lambda where, deltas: weighted_sum(where, _dropped(deltas, density))


def dare_ties(tv: TaskVectors, weights: Tensor, density: float, majority_sign_method: str = "total") -> ChunkMerge:
    """DARE-TIES (Yu et al. 2024): DARE's random drop and rescale, then TIES sign election on the unweighted task
    vectors and the disjoint mean (peft's dare_ties)."""
    _check_sign_method(majority_sign_method)
    w = weights.tolist()
    return lambda where, deltas: _sign_elected_mean(_dropped(deltas, density), w, majority_sign_method)


def della(
    tv: TaskVectors, weights: Tensor, density: float, epsilon: float = 0.1, majority_sign_method: str = "total"
) -> ChunkMerge:
    """DELLA (Deep et al. 2024): magnitude-ranked random drop, kept elements rescaled by 1 / p_keep, then TIES sign
    election and disjoint mean."""
    if not (math.isfinite(epsilon) and 0.0 <= epsilon <= 1.0):
        raise MergeError(
            f"merge.params.epsilon={epsilon!r} must be in [0, 1] (the width of DELLA's drop-probability window)"
        )
    _check_sign_method(majority_sign_method)
    keeps = [_keep_probabilities(tv.whole(i).abs_(), density, epsilon) for i in range(len(tv.partners))]  # N x (n,)

    def merge(where: slice, deltas: list[Tensor]) -> Tensor:
        pruned = []
        for delta, keep in zip(deltas, keeps):
            p = keep[where]  # (c,)
            kept = torch.bernoulli(p).bool()  # (c,)
            # Where p == 0 nothing is kept, so the 0/0 in the untaken branch never surfaces.
            pruned.append(torch.where(kept, delta / p, torch.zeros_like(delta)))
        return _sign_elected_mean(pruned, weights.tolist(), majority_sign_method)

    return merge


def breadcrumbs(tv: TaskVectors, weights: Tensor, density: float, gamma: float = 0.01) -> Plan:
    """Model Breadcrumbs (Davari & Belilovsky 2023): each task vector keeps the `density` fraction ranked just below
    its largest `gamma` fraction by magnitude (both tails masked out); weighted sum."""
    if not (math.isfinite(gamma) and 0.0 <= gamma < 1.0):
        raise MergeError(f"merge.params.gamma={gamma!r} must be in [0, 1) (the fraction of largest magnitudes dropped)")
    n = tv.numel
    n_top = round(gamma * n)
    n_keep = min(round(density * n), n - n_top)
    weighted_sum = _weighted_sum(weights.tolist())

    def merge_at(levels: Levels) -> ChunkMerge:
        def merge(where: slice, deltas: list[Tensor]) -> Tensor:
            kept = []
            for delta, (top, bottom) in zip(deltas, levels):
                window = shrink(delta, bottom)  # |x| >= the (n_top + n_keep)-th largest
                kept.append(window.sub_(shrink(window, top)))  # and |x| < the n_top-th largest
            return weighted_sum(where, kept)

        return merge

    return _trimmed_plan(tv, [n_top, n_top + n_keep], merge_at)


def model_stock_ratio(gram: Tensor) -> float:
    """Returns Model Stock's interpolation ratio t = N cos / (1 + (N-1) cos) (Jang et al. 2024) from a Gram matrix.

    cos is the mean pairwise cosine between task vectors, clipped to [0, 1]: the paper's
    geometry assumes non-negative angles, and opposing task vectors should pull the merge
    back to the ancestor (t = 0) rather than flip it.
    """
    n = gram.shape[0]
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    cos_matrix = cosines(gram)
    cos = min(max(sum(float(cos_matrix[i, j]) for i, j in pairs) / len(pairs), 0.0), 1.0)
    return n * cos / (1 + (n - 1) * cos)


def model_stock(tv: TaskVectors, weights: Tensor, density: float) -> Plan:
    """Model Stock (Jang et al. 2024): t times the (weighted) average of the task vectors, t from their angles.

    t interpolates between the ancestor (t=0, orthogonal partners) and the partners'
    average (t=1, identical partners).
    """
    if len(tv.partners) < 2:
        raise MergeError(f"merge.method='model_stock' needs at least 2 partners, got {len(tv.partners)}")
    return _combination((model_stock_ratio(gram_matrix(tv)) * _normalized(weights, "model_stock")).tolist())


Operator = Callable[..., "ChunkMerge | Plan"]

METHODS: dict[str, Operator] = {
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
RANDOM_METHODS = frozenset({"dare_linear", "dare_ties", "della"})
# Methods whose weights act as a sign-elected mean: weight 1 per partner is a full step.
_SIGN_ELECTED = frozenset({"ties", "dare_ties", "della"})


def get_method(name: str) -> Operator:
    """Returns the merge operator registered under `name`."""
    if name not in METHODS:
        raise MergeError(f"merge.method={name!r} is unknown; choose one of {sorted(METHODS)}")
    return METHODS[name]


def default_weights(method: str, n_partners: int) -> list[float]:
    """Returns equal weights that make `method` take one full averaging step: 1/N each, or 1 each for the
    sign-elected methods (ties, dare_ties, della), whose disjoint mean already divides by the count."""
    get_method(method)
    return [1.0] * n_partners if method in _SIGN_ELECTED else [1.0 / n_partners] * n_partners


def method_params(name: str) -> list[str]:
    """Returns the names of the extra parameters (beyond tv, weights, density) the method takes."""
    signature = inspect.signature(get_method(name))
    return [p for p in signature.parameters if p not in ("tv", "weights", "density")]


# --------------------------------------------------------------------------- applying an operator


@contextmanager
def seeded_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Seeds the global RNG that DARE's and DELLA's random drops draw from, restoring the caller's RNG afterwards."""
    devices = [device] if device.type == "cuda" else []  # the CPU state is always saved and restored
    with torch.random.fork_rng(devices=devices):
        # Only the generators in use: torch.manual_seed also queues seeding every other accelerator type, which
        # costs ~1 ms a call (a stack trace each), more than merging a small tensor.
        torch.random.default_generator.manual_seed(seed)
        if device.type == "cuda":
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


def plan(method: str, tv: TaskVectors, weights: Tensor, density: float, params: dict | None = None) -> Plan:
    """Returns how `method` merges the tensor of `tv`: what it needs of the whole tensor (angles, trim thresholds,
    ranks) is computed now, the pass over the elements is left to `merge_into`.  No random draws."""
    made = get_method(method)(tv, weights, density, **(params or {}))
    return made if isinstance(made, Plan) else Plan(made)


def _run(plan: Plan, tv: TaskVectors) -> Iterator[tuple[slice, Tensor | None, Tensor]]:
    for where, base, deltas in tv.chunks():
        yield where, base, plan.merge(where, deltas)


def merged_chunks(
    method: str, tv: TaskVectors, weights: Tensor, density: float, seed: int, params: dict | None = None
) -> Iterator[tuple[slice, Tensor | None, Tensor]]:
    """Yields (where, base there or None, merged task vector there) of `method` over the tensor, chunk by chunk in
    order.

    Random draws come from the global RNG seeded with `seed` for the whole tensor; the
    caller's RNG state is restored when the iteration ends.
    """
    with seeded_rng(seed, tv.device):
        yield from _run(plan(method, tv, weights, density, params), tv)


def merge_into(
    out: Tensor,
    method: str,
    tv: TaskVectors,
    weights: Tensor,
    density: float,
    seed: int,
    params: dict | None = None,
    step: float = 1.0,
    planned: Plan | None = None,
) -> None:
    """Writes base + step * merged task vector of `method` into the flat `out` (any float dtype; tv has a base).

    A merge that is a combination sum_i c_i * delta_i with c_i >= 0 and step * sum_i c_i <= 1
    (linear, slerp, model_stock, task_arithmetic with such weights) is computed as
    (1 - step * sum c) * base + sum_i step * c_i * partner_i: a convex combination of the
    models, as exact as the output dtype and with no task vector formed.  Every other merge
    runs chunk by chunk.  `planned` is `plan(...)` of the same arguments, when it was made ahead.
    """
    with seeded_rng(seed, tv.device):
        made = planned or plan(method, tv, weights, density, params)
        scaled = [step * c for c in made.coefficients or []]
        if made.coefficients is not None and min(scaled) >= 0 and sum(scaled) <= 1:
            _convex_into(out, tv, scaled)
            return
        for where, base, delta in _run(made, tv):  # the base at a slice is a view of the ancestor: left as it is
            if out.dtype == base.dtype:
                torch.add(base, delta, alpha=step, out=out[where])
            else:
                out[where] = torch.add(base, delta, alpha=step)


def _convex_into(out: Tensor, tv: TaskVectors, scaled: list[float]) -> None:
    """Writes (1 - sum k) * base + sum_i k_i * partner_i into `out`, chunk by chunk."""
    own = 1.0 - sum(scaled)
    for start in range(0, tv.numel, tv.chunk_size):
        where = slice(start, min(start + tv.chunk_size, tv.numel))
        same = out.dtype == tv.dtype
        target = out[where] if same else torch.empty(where.stop - start, dtype=tv.dtype, device=out.device)
        torch.mul(tv.partners[0][where], scaled[0], out=target)
        for partner, k in zip(tv.partners[1:], scaled[1:]):
            target.add_(partner[where], alpha=k)
        if own != 0:
            target.add_(tv.base[where], alpha=own)
        if target.data_ptr() != out[where].data_ptr():
            out[where].copy_(target)


def merge_task_vectors(
    method: str,
    deltas: Sequence[Tensor],
    weights: Sequence[float] | Tensor,
    density: float = 1.0,
    seed: int = 0,
    **params: object,
) -> Tensor:
    """Returns the merged task vector of N same-shaped task vectors (no recipe checks: see colearn.merging.merge)."""
    dtype = torch.promote_types(deltas[0].dtype, torch.float32)
    tv = TaskVectors([d.reshape(-1) for d in deltas], None, dtype)
    weight_tensor = torch.as_tensor(weights, dtype=dtype, device=tv.device)  # (N,)
    out = torch.empty(tv.numel, dtype=dtype, device=tv.device)  # (n,)
    for where, _, merged in merged_chunks(method, tv, weight_tensor, density, seed, params):
        out[where] = merged
    return out.view_as(deltas[0])
