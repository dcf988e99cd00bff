"""Magnitude trimming at exact k-th largest magnitudes, in memory bounded by a chunk.

TIES, magnitude pruning and Model Breadcrumbs keep each task vector's elements whose magnitude
is at or above (breadcrumbs: also below) a k-th largest magnitude of the whole tensor.  peft
finds it with a `topk` over the whole tensor, which holds k indices and costs ~150 ns an
element on the CPU.  `magnitude_thresholds` finds the same value exactly: a stratified sample
of the magnitudes brackets each threshold, one pass over the chunks counts the magnitudes above
each bracket and collects the few percent inside it, and `torch.kthvalue` of those is the
threshold.  If a bracket missed its threshold (probability ~1e-4) or the tensor is small,
`torch.kthvalue` of the whole tensor's magnitudes decides.  Comparisons run as `hardshrink` and
float sums: comparisons into bool tensors cost ~5x an add on the CPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from colearn.merging.task_vectors import TaskVectors

_SAMPLE = 1 << 16  # at most this many magnitudes are sampled to bracket each threshold
_NUMPY = {torch.float32: np.float32, torch.float64: np.float64}

Levels = list[list["float | None"]]  # per task vector, per threshold: the `shrink` level (see trim_level)
ChunkMerge = Callable[[slice, list[Tensor]], Tensor]  # (where, N task-vector chunks) -> merged chunk


def trim_level(threshold: float, dtype: torch.dtype) -> float | None:
    """Returns the `shrink` level that keeps exactly the magnitudes >= threshold in `dtype`: the largest `dtype`
    value below it (None when threshold <= 0: nothing to trim; inf drops everything)."""
    if threshold <= 0:
        return None
    if math.isinf(threshold):
        return math.inf
    if dtype in _NUMPY:  # numpy's scalar nextafter: torch's takes ~50 us a call in tensors
        kind = _NUMPY[dtype]
        return float(np.nextafter(kind(threshold), kind(-math.inf)))
    return float(torch.nextafter(torch.tensor(threshold, dtype=dtype), torch.tensor(-math.inf, dtype=dtype)))


def shrink_levels(thresholds: Sequence[Sequence[float]], dtype: torch.dtype) -> Levels:
    """Returns the `shrink` levels of thresholds given per task vector and k."""
    return [[trim_level(t, dtype) for t in row] for row in thresholds]


def shrink(x: Tensor, level: float | None) -> Tensor:
    """Returns x where |x| > level, else 0 (a new tensor; x itself when level is None)."""
    return x if level is None else torch.nn.functional.hardshrink(x, level)


def stratified_sample(n: int, m: int, device: torch.device) -> Tensor:
    """Returns m sorted indices into range(n), one uniformly at random in each of m equal strata (seeded: a
    tensor's thresholds don't depend on the global RNG); in order, so gathering them reads memory forward."""
    generator = torch.Generator().manual_seed(0)
    offsets = torch.rand(m, generator=generator, dtype=torch.float64)  # (m,)
    index = ((torch.arange(m, dtype=torch.float64) + offsets) * (n / m)).long().clamp_(max=n - 1)  # (m,)
    return index.to(device)


def kth_largest(magnitudes: Tensor, ks: Sequence[int]) -> list[float]:
    """Returns the k-th largest of a 1-D tensor for each k (inf for k = 0), by `torch.kthvalue`."""
    n = magnitudes.numel()
    return [math.inf if k == 0 else float(magnitudes.kthvalue(n - min(k, n) + 1).values) for k in ks]


def _bracket(sample: Tensor, n: int, k: int) -> tuple[float, float]:
    """Returns (low, high) from a sample of m of n magnitudes: the k-th largest of the n lies in [low, high] but for
    a chance of ~1e-4 (-inf and inf stand for the sample's ends)."""
    # The k-th largest of n sits near rank (1 - k/n) m among the m samples (0 = smallest); 4 binomial standard
    # deviations either side miss it with probability ~1e-4, and a miss only costs time.
    m = sample.numel()
    p = min(max(k / n, 0.0), 1.0)
    position, margin = (1 - p) * m, 4 * math.sqrt(m * p * (1 - p)) + 4
    low, high = math.floor(position - margin), math.ceil(position + margin)
    return (
        float(sample.kthvalue(low + 1).values) if low >= 0 else -math.inf,
        float(sample.kthvalue(high + 1).values) if high < m else math.inf,
    )


def _count_pass(
    tv: TaskVectors, brackets: list[list[tuple[float, float]]]
) -> tuple[list[list[int]], list[list[Tensor]]]:
    """Returns, per task vector i and its bracket j, the number of magnitudes above the bracket and the nonzero
    magnitudes inside it, from one pass over the chunks."""
    above = [[torch.zeros((), dtype=torch.float64, device=tv.device) for _ in row] for row in brackets]
    inside: list[list[list[Tensor]]] = [[[] for _ in row] for row in brackets]
    for _, _, deltas in tv.chunks():
        for i, delta in enumerate(deltas):
            magnitude = delta.abs_()  # (c,)
            for j, (low, high) in enumerate(brackets[i]):
                over = shrink(magnitude, high)  # |x| where |x| > high, else 0
                below = magnitude.sub_(over) if j == len(brackets[i]) - 1 else magnitude - over  # |x| <= high, or 0
                window = shrink(below, trim_level(low, tv.dtype))  # |x| in [low, high], else 0
                above[i][j] += over.sign_().sum()
                inside[i][j].append(window[window.bool()])  # a cast: ~6x cheaper than window != 0
    return [[int(count) for count in row] for row in above], [[torch.cat(found) for found in row] for row in inside]


def magnitude_thresholds(tv: TaskVectors, ks: Sequence[int]) -> list[list[float]]:
    """Returns, per task vector and k, its exact k-th largest magnitude (inf for k = 0).

    Keeping |delta| >= threshold keeps the top k (more only where magnitudes tie at it).
    """
    n, count = tv.numel, len(tv.partners)
    m = min(_SAMPLE, max(n // 256, 4096))
    if n <= 4 * m:
        return [kth_largest(tv.whole(i).abs_(), ks) for i in range(count)]
    samples = [d.abs_() for d in tv.at(stratified_sample(n, m, tv.device))[1]]  # N x (m,)
    brackets = [[_bracket(sample, n, k) for k in ks] for sample in samples]
    above, inside = _count_pass(tv, brackets)
    out = []
    for i in range(count):
        row = [_ranked(k, above[i][j], inside[i][j], brackets[i][j][0]) for j, k in enumerate(ks)]
        out.append(kth_largest(tv.whole(i).abs_(), ks) if None in row else row)
    return out


def _ranked(k: int, above: int, inside: Tensor, low: float) -> float | None:
    """Returns the k-th largest magnitude of a tensor from the number of its magnitudes above a bracket and the
    nonzero ones inside it (inf for k = 0), or None when the bracket missed it."""
    rank = k - above  # the threshold is the rank-th largest inside the bracket
    if k == 0:
        return math.inf
    if 1 <= rank <= inside.numel():
        return float(inside.kthvalue(inside.numel() - rank + 1).values)
    if rank > inside.numel() and low <= 0:
        return 0.0  # the k-th largest is one of the zeros: keep everything
    return None
