"""Fused CPU loops for the merge passes that eager PyTorch makes cost many times their I/O.

An eager merge runs ~45 separate tensor operations per chunk for TIES (subtract, trim,
count, elect, agree, sum, divide, ...), each a full pass over memory.  Here each element is
read once and merged in registers: a numba loop that LLVM vectorizes because it has no
branches (selects only).  On one core the TIES merge takes ~0.5 ns an element on arrays in
anonymous memory, about what copying them costs; with the trim's statistics ~1.7 ns, and
~4 ns on memory-mapped inputs, against ~9 ns eager.  The fused passes:

* `trimmed_pass`: TIES, magnitude pruning and breadcrumbs with provisional thresholds, and
  the counts and positions `colearn.trimming.MagnitudeTrim` needs to make them exact;
* `gram`: the dot products between task vectors (slerp's angle, Model Stock's ratio);
* `combination`: base + a weighted sum of the task vectors, when the weights are not
  convex (slerp's usually are not: their sum exceeds 1 between orthogonal task vectors);
* `ascending_ranks`: the magnitude ranks DELLA's keep probabilities follow (a radix sort).

They run for contiguous float32/float64 tensors on the CPU when numba is installed (a core
dependency; without it, or with `COLEARN_MERGE_KERNELS=0`, the eager chunked code runs, and
tests compare the two), for tensors of at least `_MIN_ELEMENTS`.  The first call of each
signature compiles (~1 s) and is cached on disk (numba's `cache=True`); loading numba's
registries and the cached loops costs ~0.2 s once per process (`load_in_background`).
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
from torch import Tensor

try:
    from numba import njit
except ImportError:  # pragma: no cover - numba is a dependency; this keeps a platform without it working
    njit = None

R = TypeVar("R")
_DIGIT = 11  # bits per pass of the radix sort: 2048 buckets, whose counters stay in L1
_BLOCK = 4096  # elements whose trimming statistics are gathered while they are in L1/L2
_MIN_ELEMENTS = 1 << 18  # smaller tensors take the eager path: ~2 ms each, less than loading the loops (~0.2 s)
SUM, TOTAL, FREQUENCY = 0, 1, 2  # how kept task-vector values combine (see `trimmed_pass`)
RULES = {"sum": SUM, "total": TOTAL, "frequency": FREQUENCY}
_DTYPES = (torch.float32, torch.float64)
_enabled = os.environ.get("COLEARN_MERGE_KERNELS", "1") != "0"


@contextmanager
def disabled() -> Iterator[None]:
    """Runs the block with the eager PyTorch merge code (for comparisons and for timing it)."""
    global _enabled
    previous, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = previous


def usable(*tensors: Tensor | None) -> bool:
    """Returns whether the fused loops run on these tensors: numba present and enabled, a large tensor (a small one
    gains less than numba's one-off load), all of one float32 or float64 dtype, contiguous, on the CPU."""
    if njit is None or not _enabled or tensors[0] is None or tensors[0].numel() < _MIN_ELEMENTS:
        return False
    dtype = tensors[0].dtype
    return dtype in _DTYPES and all(
        t is not None and t.device.type == "cpu" and t.dtype == dtype and t.is_contiguous() for t in tensors
    )


def load_in_background() -> threading.Thread | None:
    """Starts loading the compiled loops on a thread and returns it (None when they won't run).

    The load is ~0.2 s of mostly Python imports (numba's typing registries); a caller can
    read its inputs meanwhile.  A loop called before the thread ends waits for it (numba's
    compiler lock).
    """
    if njit is None or not _enabled:
        return None
    thread = threading.Thread(target=_load, name="colearn-kernels-load", daemon=True)
    thread.start()
    return thread


def _load() -> None:
    x = np.zeros(1, dtype=np.float32)
    with suppress(Exception):  # a failure shows again, with its traceback, where the loops are called
        _combination(x, x, (x,), (np.float32(0),))


def _arrays(tensors: Sequence[Tensor]) -> tuple[np.ndarray, ...]:
    return tuple(t.detach().reshape(-1).numpy() for t in tensors)


def _spans(n: int) -> list[slice]:
    """Returns the parts of range(n) that threads take, one per torch thread, whole blocks each (one part when the
    tensor is small: a thread costs ~50 us)."""
    parts = max(1, min(torch.get_num_threads(), n // (64 * _BLOCK)))
    size = -(-n // parts // _BLOCK) * _BLOCK
    return [slice(start, min(start + size, n)) for start in range(0, n, size)] or [slice(0, 0)]


def _in_threads(work: Callable[[slice], R], n: int) -> list[R]:
    """Returns work(part) for the parts of range(n), run on threads (the loops release the GIL)."""
    spans = _spans(n)
    if len(spans) == 1:
        return [work(spans[0])]
    with ThreadPoolExecutor(len(spans)) as pool:
        return list(pool.map(work, spans))


def gram(base: Tensor, partners: Sequence[Tensor]) -> Tensor:
    """Returns the (N, N) float64 dot products between the task vectors partner_i - base, in one pass."""
    b, ps = _arrays([base])[0], _arrays(partners)
    return torch.from_numpy(sum(_in_threads(lambda at: _gram(b[at], tuple(p[at] for p in ps)), b.size)))


def combination(out: Tensor, base: Tensor, partners: Sequence[Tensor], coefficients: Sequence[float]) -> None:
    """Writes base + sum_i c_i * (partner_i - base) into the flat `out`, in one pass."""
    o, b, ps = out.numpy(), _arrays([base])[0], _arrays(partners)
    c = tuple(map(o.dtype.type, coefficients))
    _in_threads(lambda at: _combination(o[at], b[at], tuple(p[at] for p in ps), c), o.size)


def ascending_ranks(magnitudes: Tensor) -> Tensor:
    """Returns each element's 0-based rank in the stable ascending order of a flat tensor of magnitudes (>= 0 or NaN:
    their float bits then order like their values), as int32 (fewer than 2**31 elements): numpy's stable argsort,
    inverted.  An LSD radix sort on 11-bit digits of the bits, ~7x faster than that argsort; it overwrites the
    magnitudes (their buffer takes turns with one other as the keys travel with the indices)."""
    keys = magnitudes.numpy().view(np.uint32 if magnitudes.dtype == torch.float32 else np.uint64)
    digits = -(-(8 * keys.itemsize - 1) // _DIGIT)  # the sign bit is 0
    return torch.from_numpy(_ascending_ranks(keys, digits).view(np.int32))


def trimmed_pass(out: Tensor, base: Tensor, partners: Sequence[Tensor], weights: Sequence[float], rule: str,
                 keep: Sequence[tuple[float, float]], step: float,
                 brackets: Sequence[Sequence[tuple[float, float]]] = ()) -> Found:
    """Writes base + step * merge of the trimmed task vectors into the flat `out`, and returns what the trims'
    exact thresholds need (`Found`): where some task vector's magnitude lies in one of its `brackets`.

    Task vector i keeps the values whose magnitude m has keep[i][0] < m <= keep[i][1].  The
    kept values combine by `rule`: "sum" is sum_i w_i d_i; "total" and "frequency" are the
    TIES disjoint mean (the sign of the sum of the values, or of their signs, ties to +;
    then sum_i w_i d_i over the agreeing i, divided by their count).  A bracket (low, high)
    of task vector i counts the magnitudes above `high` and collects those in [low, high].
    """
    o, b, ps = out.numpy(), _arrays([base])[0], _arrays(partners)
    n_partners, n_brackets = len(ps), len(brackets[0]) if brackets else 0
    scalar = o.dtype.type  # per-partner parameters as tuples: numba keeps them in registers (arrays may alias `out`)
    # numba cannot type an empty tuple's items: without brackets, one that holds nothing ([inf, -inf])
    rows = brackets if n_brackets else [[(math.inf, -math.inf)]] * n_partners
    bounds = [tuple(tuple(scalar(b[end]) for b in row) for row in rows) for end in (0, 1)]
    parameters = (tuple(map(scalar, weights)), tuple(scalar(k[0]) for k in keep), tuple(scalar(k[1]) for k in keep),
                  RULES[rule], scalar(step), *bounds, n_brackets > 0)

    def part(at: slice) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        size = at.stop - at.start if n_brackets else 0
        above = np.zeros((n_partners, n_brackets), dtype=np.int64)
        positions = np.empty(size, dtype=np.int64)  # room for every position; only the pages written are memory
        values = np.empty((n_partners + 1, size), dtype=o.dtype)  # base, then each partner
        count = _trimmed_pass(o[at], b[at], tuple(p[at] for p in ps), *parameters, above, positions, values)
        return above, positions[:count] + at.start, values[:, :count]

    parts = _in_threads(part, o.size)
    found = torch.from_numpy(np.concatenate([values for _, _, values in parts], axis=1))  # (N + 1, c)
    return Found(sum(above for above, _, _ in parts).tolist(),
                 torch.from_numpy(np.concatenate([positions for _, positions, _ in parts])), found[0], list(found[1:]))


@dataclass
class Found:
    """What a trimmed pass collected inside the brackets: counts above them, and the positions with their values."""

    above: list[list[int]]  # per task vector and bracket: magnitudes above the bracket
    positions: Tensor  # (c,) ascending positions where some magnitude lies in its bracket
    base: Tensor  # (c,) the base there
    partners: list[Tensor]  # N x (c,) the partners there


if njit is not None:

    @njit(inline="always")
    def _merged(x, partners, j, weights, low, high, rule):  # noqa: ANN001, ANN202 - numba
        # every constant float32: a bool or int operand makes numba compute in float64 (half the speed)
        zero, one = np.float32(0), np.float32(1)
        votes = zero
        for i in range(len(partners)):
            d = partners[i][j] - x
            m = abs(d)
            d = d if (m > low[i]) & (m <= high[i]) else zero
            if rule == SUM:
                votes += weights[i] * d
            elif rule == TOTAL:
                votes += d
            else:
                votes += (one if d > zero else zero) - (one if d < zero else zero)
        if rule == SUM:
            return votes
        majority = one if votes >= zero else -one
        total = zero
        agreeing = zero
        for i in range(len(partners)):
            d = partners[i][j] - x
            m = abs(d)
            agrees = (m > low[i]) & (m <= high[i]) & (d * majority > zero)
            total += weights[i] * d if agrees else zero
            agreeing += one if agrees else zero
        return total / max(agreeing, one)

    @njit(nogil=True, cache=True, error_model="numpy", boundscheck=False)
    def _trimmed_pass(out, base, partners, weights, low, high, rule, step, bracket_low, bracket_high, observe,
                      above, positions, values):  # noqa: ANN001, ANN202 - numba
        n = base.shape[0]
        n_brackets = len(bracket_low[0])  # a tuple's length: known when compiling, so the loops unroll
        flags = np.zeros(_BLOCK, dtype=np.uint8)
        lanes = np.zeros(_BLOCK, dtype=np.uint32)  # the flagged lanes of a block
        over = np.zeros((len(partners) * n_brackets, _BLOCK), dtype=np.uint8)  # per lane: whether above a bracket
        count = 0
        for start in range(0, n, _BLOCK):
            # unsigned indices: with signed ones numba handles negative indices and LLVM does not vectorize
            first, size = np.uint64(start), np.uint64(min(_BLOCK, n - start))
            for lane in range(size):
                j = first + lane
                x = base[j]
                out[j] = x + step * _merged(x, partners, j, weights, low, high, rule)
                inside = False
                for i in range(len(partners)):
                    m = abs(partners[i][j] - x)
                    for k in range(n_brackets):
                        over[i * n_brackets + k, lane] = m > bracket_high[i][k]
                        inside |= (m >= bracket_low[i][k]) & (m <= bracket_high[i][k]) & (m != 0)
                flags[lane] = inside
            if not observe:
                continue
            for row in range(len(partners) * n_brackets):
                total = 0
                for lane in range(size):
                    total += over[row, lane]
                above[row // n_brackets, row % n_brackets] += total
            found = np.uint64(0)
            for lane in range(size):  # without branches (a few percent are flagged, at random): each lane's index
                lanes[found] = lane   # is written, and kept when flagged
                found += flags[lane]
            for f in range(found):
                j = first + lanes[f]
                positions[count] = j
                values[0, count] = base[j]
                for i in range(len(partners)):
                    values[i + 1, count] = partners[i][j]
                count += 1
        return count

    @njit(nogil=True, cache=True, error_model="numpy", boundscheck=False)
    def _combination(out, base, partners, coefficients):  # noqa: ANN001, ANN202 - numba
        for j in range(np.uint64(base.shape[0])):
            x = base[j]
            total = coefficients[0] * (partners[0][j] - x)
            for i in range(1, len(partners)):
                total += coefficients[i] * (partners[i][j] - x)
            out[j] = x + total

    @njit(nogil=True, cache=True, boundscheck=False)
    def _ascending_ranks(keys, digits):  # noqa: ANN001, ANN202 - numba
        n = keys.shape[0]
        mask = np.uint64((1 << _DIGIT) - 1)
        starts = np.zeros((digits, 1 << _DIGIT), dtype=np.int64)  # every digit's histogram in one pass, then offsets
        for j in range(n):
            for d in range(digits):
                starts[d, (np.uint64(keys[j]) >> np.uint64(_DIGIT * d)) & mask] += 1
        for d in range(digits):
            total = 0
            for b in range(1 << _DIGIT):
                count = starts[d, b]
                starts[d, b] = total
                total += count
        # indices as uint32 (n < 2**32): 12 bytes an element besides the keys
        order, spare = np.arange(n).astype(np.uint32), np.empty(n, dtype=np.uint32)
        spare_keys = np.empty_like(keys)
        for d in range(digits):
            shift, last = np.uint64(_DIGIT * d), d == digits - 1
            for j in range(n):  # stable: equal digits keep their order; the keys travel along, read in sequence
                key = keys[j]
                digit = (np.uint64(key) >> shift) & mask
                at = starts[d, digit]
                starts[d, digit] = at + 1
                if last:  # the last pass writes ranks instead of an order: spare is not read in it
                    spare[order[j]] = at
                else:
                    spare_keys[at] = key
                    spare[at] = order[j]
            if not last:
                keys, spare_keys = spare_keys, keys
                order, spare = spare, order
        return spare

    @njit(nogil=True, cache=True, error_model="numpy", boundscheck=False, fastmath={"reassoc"})
    def _gram(base, partners):  # noqa: ANN001, ANN202 - numba
        n_partners = len(partners)
        out = np.zeros((n_partners, n_partners))
        # float64 sums of float32 products, a block at a time: as exact as the chunked float32 sums, vectorized
        for start in range(0, base.shape[0], _BLOCK):
            begin, stop = np.uint64(start), np.uint64(min(start + _BLOCK, base.shape[0]))
            for i in range(n_partners):
                for k in range(i, n_partners):
                    pi, pk = partners[i], partners[k]
                    s = 0.0
                    for j in range(begin, stop):
                        s += (pi[j] - base[j]) * (pk[j] - base[j])
                    out[i, k] += s
        for i in range(n_partners):
            for k in range(i):
                out[i, k] = out[k, i]
        return out
