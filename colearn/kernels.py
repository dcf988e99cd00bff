"""Fused CPU loops for the merge passes that eager PyTorch makes cost many times their I/O.

An eager merge runs ~45 separate tensor operations per chunk for TIES (subtract, trim,
count, elect, agree, sum, divide, ...), each a full pass over memory.  Here each element is
read once and merged in registers: C loops (`colearn/_kernels.c`) that the compiler
vectorizes because they have no branches (masks only).  On one core, on 24.6M-element
arrays in anonymous memory (one-off scripts), the TIES merge takes ~1.2 ns an element,
about what reading its three inputs and writing the output costs (memory-bound), against
~9 ns eager, and counting for its thresholds ~0.9 ns.  The passes:

* `trimmed_pass`: TIES, magnitude pruning and breadcrumbs at given thresholds;
* `bracket_counts`: what `colearn.trimming.MagnitudeTrim` needs to make its thresholds
  exact: the magnitudes above each bracket, counted, and those inside it, collected (with
  AVX-512's compressing stores for float32 where the CPU has them: ~0.9 against ~1.4 ns);
* `gram`: the dot products between task vectors (slerp's angle, Model Stock's ratio);
* `combination`: base + a weighted sum of the task vectors, when the weights are not
  convex (slerp's usually are not: their sum exceeds 1 between orthogonal task vectors);
* `ascending_ranks`: the magnitude ranks DELLA's keep probabilities follow (a radix sort).

They run for contiguous float32/float64 tensors on the CPU, of at least `_MIN_ELEMENTS`,
when the extension `colearn._kernels` was built (by `pip install`, with the machine's C
compiler; without one the install goes on and the eager chunked code runs, as it does with
`COLEARN_MERGE_KERNELS=0`; tests compare the two).  The library is loaded with ctypes, in
about a millisecond, and its calls release the GIL, so a tensor splits across threads.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import numpy as np
import torch
from torch import Tensor

R = TypeVar("R")
_BLOCK = 4096  # elements per block of the trimmed pass (as BLOCK in _kernels.c)
_DIGIT = 11  # bits per pass of the radix sort (as DIGIT in _kernels.c)
_MAX_PARTNERS = 16  # as MAX_PARTNERS in _kernels.c (a trimmed pass keeps a block's flags per partner)
_MIN_ELEMENTS = 1 << 18  # smaller tensors take the eager path: ~2 ms each, and a thread costs ~50 us
SUM, TOTAL, FREQUENCY = 0, 1, 2  # how kept task-vector values combine (see `trimmed_pass`)
RULES = {"sum": SUM, "total": TOTAL, "frequency": FREQUENCY}
_DTYPES = (torch.float32, torch.float64)
_enabled = os.environ.get("COLEARN_MERGE_KERNELS", "1") != "0"
_P = ctypes.c_void_p


def _library() -> ctypes.CDLL | None:
    """Returns the compiled loops with their signatures declared, or None when the extension was not built."""
    try:
        from colearn import _kernels
    except ImportError:
        return None
    lib = ctypes.CDLL(_kernels.__file__)
    i64, i32 = ctypes.c_int64, ctypes.c_int
    for suffix, scalar in (("f32", ctypes.c_float), ("f64", ctypes.c_double)):
        signatures = {
            "trimmed_pass": (None, [_P, _P, _P, i64, i32, _P, _P, _P, i32, scalar]),
            "bracket_counts": (None, [_P, _P, i64, i32, _P, _P, i32, _P, _P, _P]),
            "combination": (None, [_P, _P, _P, i64, i32, _P]),
            "gram": (None, [_P, _P, i64, i32, _P]),
            "sampled_magnitudes": (None, [_P, _P, i64, i32, i64, _P]),
            "ascending_ranks": (i32, [_P, _P, _P, _P, i64, i32, _P]),
        }
        for name, (result, arguments) in signatures.items():
            function = getattr(lib, f"{name}_{suffix}")
            function.restype, function.argtypes = result, arguments
    return lib


_lib = _library()
available = _lib is not None  # whether the extension was built


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
    """Returns whether the fused loops run on these tensors: the extension built and enabled, a large tensor (a small
    one gains little), all of one float32 or float64 dtype, contiguous, on the CPU, at most 16 partners (with the base
    and the output)."""
    if _lib is None or not _enabled or tensors[0] is None or tensors[0].numel() < _MIN_ELEMENTS:
        return False
    dtype = tensors[0].dtype
    return dtype in _DTYPES and len(tensors) <= _MAX_PARTNERS + 2 and all(
        t is not None and t.device.type == "cpu" and t.dtype == dtype and t.is_contiguous() for t in tensors
    )


def _function(name: str, dtype: np.dtype) -> Callable[..., object]:
    return getattr(_lib, f"{name}_{'f32' if dtype == np.float32 else 'f64'}")


def _scalars(dtype: np.dtype, values: Sequence[float]) -> ctypes.Array:
    """Returns a C array of the values as the loops' element type."""
    scalar = ctypes.c_float if dtype == np.float32 else ctypes.c_double
    return (scalar * max(len(values), 1))(*values)


def _pointers(arrays: Sequence[np.ndarray]) -> ctypes.Array:
    return (_P * len(arrays))(*(a.ctypes.data for a in arrays))


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
    n = len(ps)

    def part(at: slice) -> np.ndarray:
        out = np.zeros((n, n))
        _function("gram", b.dtype)(b[at].ctypes.data, _pointers([p[at] for p in ps]), at.stop - at.start, n,
                                   out.ctypes.data)
        return out

    return torch.from_numpy(sum(_in_threads(part, b.size)))


def combination(out: Tensor, base: Tensor, partners: Sequence[Tensor], coefficients: Sequence[float]) -> None:
    """Writes base + sum_i c_i * (partner_i - base) into the flat `out`, in one pass."""
    o, b, ps = out.numpy(), _arrays([base])[0], _arrays(partners)
    c = _scalars(o.dtype, coefficients)
    run = _function("combination", o.dtype)
    _in_threads(lambda at: run(o[at].ctypes.data, b[at].ctypes.data, _pointers([p[at] for p in ps]),
                               at.stop - at.start, len(ps), c), o.size)


def sampled_magnitudes(base: Tensor, partners: Sequence[Tensor], m: int) -> list[Tensor]:
    """Returns per partner the magnitudes |partner - base| at m sorted positions, one uniformly at random in each of m
    equal strata of the flat tensors (a fixed sequence, the same for every tensor of a size)."""
    b, ps = _arrays([base])[0], _arrays(partners)
    out = np.empty((len(ps), m), dtype=b.dtype)
    _function("sampled_magnitudes", b.dtype)(b.ctypes.data, _pointers(ps), b.size, len(ps), m, out.ctypes.data)
    return list(torch.from_numpy(out))


def ascending_ranks(magnitudes: Tensor) -> Tensor:
    """Returns each element's 0-based rank in the stable ascending order of a flat tensor of magnitudes (>= 0 or NaN:
    their float bits then order like their values), as int32 (fewer than 2**31 elements): numpy's stable argsort,
    inverted.  An LSD radix sort on 11-bit digits of the bits, ~7x faster than that argsort; it overwrites the
    magnitudes (their buffer takes turns with one other as the keys travel with the indices)."""
    keys = magnitudes.numpy().view(np.uint32 if magnitudes.dtype == torch.float32 else np.uint64)
    n, digits = keys.size, -(-(8 * keys.itemsize - 1) // _DIGIT)  # the sign bit is 0
    spare_keys = np.empty_like(keys)
    order, spare = np.arange(n, dtype=np.uint32), np.empty(n, dtype=np.uint32)  # indices: 12 bytes an element
    starts = np.zeros((digits, 1 << _DIGIT), dtype=np.int64)
    in_spare = _function("ascending_ranks", magnitudes.numpy().dtype)(
        keys.ctypes.data, spare_keys.ctypes.data, order.ctypes.data, spare.ctypes.data, n, digits, starts.ctypes.data)
    return torch.from_numpy((spare if in_spare else order).view(np.int32))


def trimmed_pass(out: Tensor, base: Tensor, partners: Sequence[Tensor], weights: Sequence[float], rule: str,
                 keep: Sequence[tuple[float, float]], step: float) -> None:
    """Writes base + step * the merge of the trimmed task vectors into the flat `out` (which must not overlap the
    inputs), in one pass.

    Task vector i keeps the values whose magnitude m has keep[i][0] < m <= keep[i][1].  The
    kept values combine by `rule`: "sum" is sum_i w_i d_i; "total" and "frequency" are the
    TIES disjoint mean (the sign of the sum of the values, or of their signs, ties to +;
    then sum_i w_i d_i over the agreeing i, divided by their count).
    """
    o, b, ps = out.numpy(), _arrays([base])[0], _arrays(partners)
    low, high = (_scalars(o.dtype, [k[end] for k in keep]) for end in (0, 1))
    run, w = _function("trimmed_pass", o.dtype), _scalars(o.dtype, weights)
    _in_threads(lambda at: run(o[at].ctypes.data, b[at].ctypes.data, _pointers([p[at] for p in ps]),
                               at.stop - at.start, len(ps), w, low, high, RULES[rule], step), o.size)


def bracket_counts(base: Tensor, partners: Sequence[Tensor], brackets: Sequence[Sequence[tuple[float, float]]]
                   ) -> tuple[list[list[int]], list[list[Tensor]]]:
    """Returns, per partner i and each of its brackets (low, high), the number of magnitudes |partner_i - base| above
    high and the nonzero magnitudes in [low, high] (in no particular order), from one pass over the flat tensors."""
    b, ps = _arrays([base])[0], _arrays(partners)
    n_brackets = len(brackets[0])
    low, high = (_scalars(b.dtype, [bracket[end] for row in brackets for bracket in row]) for end in (0, 1))
    # room for every element: only the pages written (a few percent) become memory
    inside = [np.empty(b.size, dtype=b.dtype) for _ in range(len(ps) * n_brackets)]
    run = _function("bracket_counts", b.dtype)

    def part(at: slice) -> tuple[slice, np.ndarray, np.ndarray]:
        above, found = np.zeros(len(inside), dtype=np.int64), np.zeros(len(inside), dtype=np.int64)
        run(b[at].ctypes.data, _pointers([p[at] for p in ps]), at.stop - at.start, len(ps), low, high, n_brackets,
            above.ctypes.data, _pointers([x[at] for x in inside]), found.ctypes.data)
        return at, above, found

    parts = _in_threads(part, b.size)
    above = sum(counts for _, counts, _ in parts).reshape(len(ps), n_brackets).tolist()
    found = [torch.from_numpy(np.concatenate([x[at.start:at.start + f[r]] for at, _, f in parts]))
             for r, x in enumerate(inside)]
    return above, [found[i * n_brackets:(i + 1) * n_brackets] for i in range(len(ps))]
