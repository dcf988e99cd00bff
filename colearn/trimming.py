"""Magnitude trimming at exact k-th largest thresholds, found with one pass that only counts.

TIES, magnitude pruning and Model Breadcrumbs keep each task vector's elements above (and
below) k-th largest magnitudes of the whole tensor.  peft finds them with a full `topk`
(~90 ns an element); here a stratified sample of the magnitudes brackets each threshold,
and one pass over the tensor counts the magnitudes above each bracket and collects those
inside it (a few percent), whose order statistic is then the exact threshold.  If a
bracket missed its threshold (probability ~1e-4), the whole tensor is searched.  Small
tensors are searched whole.  With the fused loops (`colearn.kernels`) this happens when the
merge is planned, before its pass: in `colearn merge` on the thread that reads ahead, while
the previous tensor merges.  Without them, the chunks of the merge pass itself are counted
(`observe`, trimmed meanwhile at the sample's guesses), and afterwards the positions inside
some bracket are merged again (`corrections`; every chunk again if a bracket missed).
Comparisons go through `hardshrink` and float sums: torch's comparisons into bool tensors
cost ~5x an add here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from colearn import kernels
from colearn.task_vectors import TaskVectors, gathered

_SAMPLE = 1 << 16  # at most this many magnitudes are sampled to bracket each threshold
_NUMPY = {torch.float32: np.float32, torch.float64: np.float64}

Levels = list[list["float | None"]]  # per task vector, per threshold: the `shrink` level (see trim_level)
ChunkMerge = Callable[[slice | Tensor, list[Tensor]], Tensor]


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


def shrink(x: Tensor, level: float | None) -> Tensor:
    """Returns x where |x| > level, else 0 (a new tensor; x itself when level is None)."""
    return x if level is None else torch.nn.functional.hardshrink(x, level)


def nonzero_positions(x: Tensor) -> Tensor:
    """Returns the indices of the nonzero entries of a 1-D tensor, ascending (numpy's on the CPU: 6x torch's)."""
    if x.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(x.numpy() != 0))
    return x.nonzero().squeeze(1)


def stratified_sample(n: int, m: int, device: torch.device) -> Tensor:
    """Returns m sorted indices into range(n), one uniformly at random in each of m equal strata (seeded: a
    tensor's thresholds don't depend on the global RNG); in order, so gathering them reads memory forward."""
    generator = torch.Generator().manual_seed(0)
    offsets = torch.rand(m, generator=generator, dtype=torch.float64)  # (m,)
    index = ((torch.arange(m, dtype=torch.float64) + offsets) * (n / m)).long().clamp_(max=n - 1)  # (m,)
    return index.to(device)


def _fused(tv: TaskVectors) -> bool:
    """Returns whether the fused loops run on the task vectors' models (`colearn.kernels.usable`)."""
    return tv.base is not None and tv.base.dtype == tv.dtype and kernels.usable(tv.base, *tv.partners)


def _sampled_magnitudes(tv: TaskVectors, m: int) -> list[Tensor]:
    """Returns per task vector its magnitudes at m stratified positions (`stratified_sample`, or the fused loop's)."""
    if _fused(tv):
        return kernels.sampled_magnitudes(tv.base, tv.partners, m)
    return [d.abs() for d in tv.at(stratified_sample(tv.numel, m, tv.device))[1]]


def _bracket(sample: Tensor, n: int, k: int) -> tuple[float, float, float]:
    """Returns (low, guess, high): the k-th largest of n lies in [low, high] but for a chance of ~1e-4, and near the
    guess (the sample's own k-th largest fraction)."""
    # The k-th largest of n sits near rank (1 - k/n) m among the m samples (0 = smallest); 4 binomial standard
    # deviations either side miss it with probability ~1e-4, and a miss only costs time.
    m = sample.numel()
    p = min(max(k / n, 0.0), 1.0)
    position, margin = (1 - p) * m, 4 * math.sqrt(m * p * (1 - p)) + 4
    low, guess, high = math.floor(position - margin), min(max(round(position), 0), m - 1), math.ceil(position + margin)
    ranks = sorted({r for r in (low, guess, high) if 0 <= r < m})
    values = dict(zip(ranks, _order_statistics(sample, ranks)))
    return values.get(low, -math.inf), values[guess], values.get(high, math.inf)


def _order_statistics(x: Tensor, ranks: list[int]) -> list[float]:
    """Returns the values of the 1-D tensor x at the given 0-based ranks in ascending order."""
    if not ranks:
        return []
    if x.device.type == "cpu":
        return [float(v) for v in np.partition(x.numpy(), ranks)[ranks]]  # one partial sort for all ranks
    return [float(x.kthvalue(r + 1).values) for r in ranks]


def _within(x: Tensor, low: float, high: float) -> Tensor:
    """Returns the nonzero values of x in [low, high] (numpy's comparisons on the CPU: torch's cost ~4x)."""
    if x.device.type == "cpu":
        a = x.numpy()
        return torch.from_numpy(a[(a >= low) & (a <= high) & (a != 0)])
    return x[(x >= low) & (x <= high) & (x != 0)]


def _exact_thresholds(magnitudes: Tensor, ks: Sequence[int]) -> list[float]:
    n = magnitudes.numel()
    ranks = [n - min(k, n) for k in ks if k > 0]  # the k-th largest is the (n - k)-th smallest, 0-based
    unique = sorted(set(ranks))
    values = dict(zip(unique, _order_statistics(magnitudes, unique)))
    return [math.inf if k == 0 else values[n - min(k, n)] for k in ks]


def _ranked(k: int, above: int, inside: Tensor, low: float) -> float | None:
    """Returns the k-th largest magnitude of a tensor from the number of its magnitudes above a bracket and the
    nonzero ones inside it (inf for k = 0), or None when the bracket missed it."""
    rank = k - above  # the threshold is the rank-th largest inside the bracket
    if k == 0:
        return math.inf
    if 1 <= rank <= inside.numel():
        return _order_statistics(inside, [inside.numel() - rank])[0]
    if rank > inside.numel() and low <= 0:
        return 0.0  # the k-th largest is one of the zeros: keep everything
    return None


class MagnitudeTrim:
    """The k-th largest magnitudes of each task vector of one tensor, for several k.

    Found up front (`known`) for small tensors and when the fused loops run; otherwise during
    a merge pass: `provisional()` levels trim the chunks of the pass, each chunk is first shown
    to `observe`, and after the pass `thresholds()` are exact and `corrections(merge_at)` yields
    the positions to merge again with `merge_at(exact levels)`.
    """

    def __init__(self, tv: TaskVectors, ks: Sequence[int]) -> None:
        self.tv, self.ks = tv, list(ks)
        n, count = tv.numel, len(tv.partners)
        m = min(_SAMPLE, max(n // 256, 4096))
        self.above = [[0] * len(ks) for _ in range(count)]  # magnitudes > the bracket's top, counted by `observe`
        # where some task vector's magnitude lies in a bracket: positions, and the base and task vectors there
        self.uncertain: list[tuple[Tensor, Tensor | None, list[Tensor]]] = []
        self.missed = False  # whether some bracket missed its threshold (known after `thresholds`)
        self.exact: list[list[float]] | None = None  # per task vector and k, once known
        if n <= 4 * m:
            self.exact = [_exact_thresholds(tv.whole(i).abs(), ks) for i in range(count)]
        else:
            found = [[_bracket(sample, n, k) for k in ks] for sample in _sampled_magnitudes(tv, m)]
            self.brackets = [[(low, high) for low, _, high in row] for row in found]
            self.guesses = [[guess for _, guess, _ in row] for row in found]
            if _fused(tv):
                above, inside = kernels.bracket_counts(tv.base, tv.partners, self.brackets)
                self.exact = self._from_counts(above, lambda i, j: inside[i][j])
        self.known = self.exact is not None  # before any pass: nothing to observe or correct

    def levels(self, thresholds: Sequence[Sequence[float]]) -> Levels:
        return [[trim_level(t, self.tv.dtype) for t in row] for row in thresholds]

    def provisional(self) -> Levels:
        """Returns the levels to trim the pass's chunks with: the exact ones when known, else the sample's guesses,
        inside the brackets, so that the exact levels keep other values only inside the brackets."""
        return self.levels(self.exact if self.known else self.guesses)

    def observe(self, where: slice, deltas: list[Tensor]) -> None:
        """Counts and collects what the thresholds need from one chunk (before it is trimmed)."""
        if self.known:
            return
        uncertain = None
        for i, delta in enumerate(deltas):
            magnitude = delta.abs()  # (c,)
            for j, (low, high) in enumerate(self.brackets[i]):
                over = shrink(magnitude, high)  # |x| where |x| > high, else 0
                window = shrink(magnitude - over, trim_level(low, self.tv.dtype))  # |x| in [low, high], else 0
                self.above[i][j] += int(over.sign_().sum())
                uncertain = window if uncertain is None else uncertain.add_(window)
        local = nonzero_positions(uncertain)
        base = self.tv.base_at(where)
        self.uncertain.append((local + where.start, None if base is None else gathered(base, local),
                               [gathered(d, local) for d in deltas]))

    def exact_levels(self) -> Levels:
        """Returns the `shrink` levels of the exact thresholds (after the pass; see `thresholds`)."""
        return self.levels(self.thresholds())

    def thresholds(self) -> list[list[float]]:
        """Returns, per task vector and k, the exact k-th largest magnitude (inf for k = 0): after the pass, unless
        `known`."""
        if self.exact is None:
            self.exact = self._from_counts(self.above, self._within)
        return self.exact

    def _from_counts(self, above: list[list[int]], inside: Callable[[int, int], Tensor]) -> list[list[float]]:
        """Returns the thresholds from the counts above each bracket and inside(i, j), the nonzero magnitudes of task
        vector i inside its bracket j; a task vector with a missed bracket is searched whole (and `missed` set)."""
        out = []
        for i in range(len(self.tv.partners)):
            row = [_ranked(k, above[i][j], inside(i, j), self.brackets[i][j][0]) for j, k in enumerate(self.ks)]
            if None in row:
                self.missed = True
                row = _exact_thresholds(self.tv.whole(i).abs(), self.ks)
            out.append(row)
        return out

    def _within(self, index: int, bracket: int) -> Tensor:
        """Returns the nonzero magnitudes of task vector `index` inside its bracket `bracket`, among those `observe`
        collected."""
        low, high = self.brackets[index][bracket]
        return _within(torch.cat([deltas[index] for _, _, deltas in self.uncertain]).abs(), low, high)

    def corrections(self, merge_at: Callable[[Levels], ChunkMerge]
                    ) -> Iterator[tuple[slice | Tensor, Tensor | None, Tensor]]:
        """Yields (positions, base there or None, merged task vector there) where the provisional trim may have
        been wrong: the positions kept by `observe`, or every chunk again if a bracket missed (none when `known`)."""
        if self.known:
            return
        merge = merge_at(self.exact_levels())
        if self.missed:
            for where, base, deltas in self.tv.chunks():
                yield where, base, merge(where, deltas)
            return
        for positions, base, deltas in self.uncertain:
            if positions.numel():
                yield positions, base, merge(positions, deltas)


def magnitude_thresholds(tv: TaskVectors, ks: Sequence[int]) -> Tensor:
    """Returns (N, len(ks)): each task vector's exact k-th largest magnitude for each k (inf for k = 0).

    Keeping |delta| >= threshold keeps the top k (more only where magnitudes tie at it).
    """
    trim = MagnitudeTrim(tv, ks)
    for where, _, deltas in tv.chunks():
        trim.observe(where, deltas)
    return torch.tensor(trim.thresholds(), dtype=torch.float64)
