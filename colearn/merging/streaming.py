"""Merging safetensors checkpoints tensor by tensor, without holding a model in memory.

Inputs are memory-mapped (`safetensors.safe_open`): a tensor's pages are read when the
merge touches them and belong to the page cache, not to the process.  The output has the
ancestor's layout (same names, dtypes, shapes and byte offsets), so its header is the
ancestor's header, written first; each merged tensor is then written at its offset and
dropped.  Peak memory is two output buffers of the largest tensor's size (one being
merged, one being written), the plans of the tensors read ahead and the chunk
temporaries, whatever the model's size.  The file is written aside, fsynced and renamed into place.  Each large
tensor's writeback starts as soon as it is written (`posix_fadvise`), so the disk writes
run while the next tensors merge and the final fsync has little left: in a one-off script
writing 512 MB in 111 tensors with compute between them, the fsync fell from 0.48-0.58 s
to 0.01 s and the whole from 2.4-3.1 s to 2.0-2.3 s.  The writes run on a thread, so each
tensor goes to the page cache while the next one merges (on another core).
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from functools import partial
from typing import Any, BinaryIO

import torch
from safetensors import safe_open
from torch import Tensor

from colearn.merging.merge import Recipe, check_same_tensors, merge_tensor, plan_tensor
from colearn.merging.operators import MergeError

PathLike = str | os.PathLike[str]
_WRITEBACK_MIN = 1 << 20  # bytes: smaller tensors are left to the final fsync


@dataclass(frozen=True)
class Layout:
    """Where each tensor's bytes lie in a safetensors file (read from its header, per the format's spec)."""

    header: bytes  # the 8-byte length and the JSON header, as stored
    spans: dict[str, tuple[int, int]]  # tensor name -> (begin, end) byte offsets in the data section


def read_layout(path: PathLike) -> Layout:
    """Returns the layout of a safetensors file: 8 bytes little-endian header length, then the JSON header."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        raw = f.read(length)
    header = json.loads(raw)
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    return Layout(struct.pack("<Q", length) + raw, {k: tuple(v["data_offsets"]) for k, v in entries.items()})


_FLOAT_CODES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def retyped(layout: Layout, dtype: torch.dtype | None) -> Layout:
    """Returns the layout of the same tensors with every floating one stored in `dtype` (the layout itself when
    None): data offsets recomputed in data order, the JSON header padded with spaces to 8 bytes."""
    if dtype is None:
        return layout
    header = json.loads(layout.header[8:])
    offset = 0
    for key in data_order(layout):
        entry = header[key]
        size = layout.spans[key][1] - layout.spans[key][0]
        if entry["dtype"] in _FLOAT_CODES.values():
            entry["dtype"] = _FLOAT_CODES[dtype]
            size = math.prod(entry["shape"]) * dtype.itemsize
        entry["data_offsets"] = [offset, offset + size]
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return Layout(struct.pack("<Q", len(raw)) + raw, {k: tuple(header[k]["data_offsets"]) for k in layout.spans})


def tensor_bytes(tensor: Tensor) -> memoryview:
    """Returns the raw little-endian bytes of a tensor (no copy when it is contiguous on the CPU)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


@contextmanager
def atomic_file(path: PathLike) -> Iterator[BinaryIO]:
    """Yields a file opened for writing aside `path`; on success it is fsynced and renamed onto `path`,
    on failure removed, so `path` is never left half written."""
    tmp = f"{os.fspath(path)}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_like(layout: Layout, tensors: Iterator[tuple[str, Tensor]], out: BinaryIO) -> None:
    """Writes a safetensors file with `layout`'s header from (name, tensor) pairs, each name of the layout once, in
    any order (`merge_order`).

    Each tensor must fill exactly its span (same dtype size and shape as the layout's file)
    and goes to its offset.  It is written on a thread while the next one is produced (a
    merge computes while the last tensor goes to the page cache), so a producer may reuse a
    tensor's memory only two tensors later: when tensor k + 1 is asked for, tensor k - 1 is
    written.
    """
    out.write(layout.header)
    out.flush()
    written: set[str] = set()
    with ThreadPoolExecutor(1, thread_name_prefix="colearn-write") as writer:
        pending: Future | None = None
        for key, tensor in tensors:
            span = layout.spans.get(key)
            data = tensor_bytes(tensor)
            if span is None or key in written or data.nbytes != span[1] - span[0]:
                slot = (
                    "no slot"
                    if span is None
                    else "a slot already written"
                    if key in written
                    else f"a slot of {span[1] - span[0]} bytes"
                )
                raise MergeError(
                    f"tensor {key!r} ({data.nbytes} bytes) has {slot} in the output; partners must "
                    f"share the ancestor's architecture"
                )
            written.add(key)
            if pending is not None:
                pending.result()  # one at a time: a tensor's writeback starts once it is all written
            pending = writer.submit(_write_at, out, data, len(layout.header) + span[0])
        if pending is not None:
            pending.result()
    if len(written) != len(layout.spans):
        missing = sorted(set(layout.spans) - written)
        raise MergeError(f"the output lacks {len(missing)} of its layout's tensors, the first {missing[0]!r}")


def _write_at(out: BinaryIO, data: memoryview, offset: int) -> None:
    view = data.cast("B")
    while view.nbytes:  # pwrite may write less than asked
        view = view[os.pwrite(out.fileno(), view, offset + data.nbytes - view.nbytes) :]
    _start_writeback(out, offset, data.nbytes)


def _start_writeback(out: BinaryIO, offset: int, size: int) -> None:
    # Submits the disk writes of the bytes just written and returns (DONTNEED starts the writeback of dirty pages;
    # pages still being written stay cached): the disk completes them while the next tensor merges, and the
    # final fsync has less left to do.
    if hasattr(os, "posix_fadvise") and size >= _WRITEBACK_MIN:
        with suppress(OSError):  # a file system without it: the fsync writes everything, as before
            os.posix_fadvise(out.fileno(), offset, size, os.POSIX_FADV_DONTNEED)


def data_order(layout: Layout) -> list[str]:
    """Returns the tensor names in the order their bytes lie in the file."""
    return sorted(layout.spans, key=lambda k: layout.spans[k][0])


def merge_order(layout: Layout) -> list[str]:
    """Returns the tensor names in the order a pipeline merges them: the data order, rotated to put the largest
    tensor in the middle.  While the first tensor is read and merged, and the last one merged and written, the
    pipeline's other stages wait: those two had better be small (a model's largest tensors, the embeddings and the
    head, are at one end of the data order)."""
    keys = data_order(layout)
    if not keys:
        return keys
    largest = max(range(len(keys)), key=lambda i: layout.spans[keys[i]][1] - layout.spans[keys[i]][0])
    start = (largest - len(keys) // 2) % len(keys)
    return keys[start:] + keys[:start]


def merge_safetensors_files(
    ancestor_path: PathLike, partner_paths: Sequence[PathLike], out_path: PathLike, recipe: Recipe
) -> None:
    """Writes the offspring of single-file safetensors checkpoints to `out_path`, atomically, one tensor at a time.

    Shapes, the recipe and its group patterns are checked from the headers before anything
    is written; the output carries the ancestor's header (metadata included).
    """
    recipe.check(len(partner_paths))
    layout = read_layout(ancestor_path)
    with ExitStack() as stack:
        ancestor = stack.enter_context(safe_open(os.fspath(ancestor_path), framework="pt"))
        partners = [stack.enter_context(safe_open(os.fspath(p), framework="pt")) for p in partner_paths]
        check_same_tensors(_header_shapes(ancestor), [_header_shapes(p) for p in partners])
        recipe.check_groups_match(layout.spans)
        with atomic_file(out_path) as out:
            write_like(
                layout,
                outputs(
                    layout,
                    ancestor,
                    partners,
                    partial(merge_tensor, recipe=recipe),
                    partial(plan_tensor, recipe=recipe),
                ),
                out,
            )


def outputs(
    layout: Layout,
    ancestor: Any,
    partners: Sequence[Any],
    compute: Callable[..., Tensor],
    plan: Callable[[str, Tensor, list[Tensor]], Any] | None = None,
) -> Iterator[tuple[str, Tensor]]:
    """Yields (key, compute(key, ancestor's tensor, partners' tensors, out=buffer, planned=...)) in `merge_order`, for
    `write_like`: a pipeline over two cores.

    While one tensor is computed, a thread reads the next one's inputs (one byte a page: on
    a cold cache this is the disk read) and makes its `plan(key, ancestor's, partners')` (an
    operator's whole-tensor statistics), and the writer thread writes the previous one.  The
    thread reads several small tensors ahead, its work per tensor varying more than the
    merge's.  Two output buffers per dtype take turns; two of the largest tensor's size are
    faulted in on the thread early on, since fresh memory costs a fault per 4 KiB page (on a
    VM, several times more), and the turns grow into them at the first large tensors.
    """
    keys = merge_order(layout)
    if not keys:
        return

    def ready(key: str) -> tuple[Tensor, list[Tensor], Any]:
        base, found = ancestor.get_tensor(key), [p.get_tensor(key) for p in partners]
        for tensor in (base, *found):
            _read_pages(tensor)
        return base, found, plan(key, base, found) if plan else None

    sizes = {k: layout.spans[k][1] - layout.spans[k][0] for k in keys}
    largest = max(keys, key=sizes.get)
    with ThreadPoolExecutor(1, thread_name_prefix="colearn-ahead") as ahead:
        upcoming: deque[tuple[int, Future]] = deque()  # (bytes, its `ready`) of the next tensors, in order
        submitted = 0

        def read_ahead() -> None:
            # Several tensors ahead while they are small (the thread's work varies more than the merge's), but a plan
            # may be as large as its tensor: at most the largest tensor's bytes beyond the next one.
            nonlocal submitted
            while submitted < len(keys) and (
                len(upcoming) < 2
                or sum(b for b, _ in upcoming) - upcoming[0][0] + sizes[keys[submitted]] <= sizes[largest]
            ):
                upcoming.append((sizes[keys[submitted]], ahead.submit(ready, keys[submitted])))
                submitted += 1

        upcoming.append((sizes[keys[0]], ahead.submit(ready, keys[0])))
        submitted = 1
        like = ancestor.get_tensor(largest)  # the output buffers grow into these when they reach the largest tensor
        spares = [ahead.submit(lambda: torch.empty(like.numel(), dtype=like.dtype).zero_()) for _ in range(2)]
        read_ahead()
        turns: list[dict[torch.dtype, Tensor]] = [{}, {}]
        for index, key in enumerate(keys):
            base, found, planned = upcoming.popleft()[1].result()
            read_ahead()
            buffers = turns[index % 2]
            buffer = buffers.get(base.dtype)
            if buffer is None or buffer.numel() < base.numel():
                # a large tensor takes a spare (faulted in while small ones merged); a small one, fresh memory
                large = bool(spares) and base.dtype == like.dtype and 2 * base.numel() > like.numel()
                buffer = buffers[base.dtype] = (
                    spares.pop().result() if large else torch.empty(base.numel(), dtype=base.dtype)
                )
            yield key, compute(key, base, found, out=buffer, planned=planned)


def _read_pages(tensor: Tensor) -> None:
    """Reads one byte of every page of a memory-mapped tensor, so its pages are read and mapped (a torch reduction:
    it releases the GIL)."""
    flat = tensor.reshape(-1)
    if flat.numel():
        flat.view(torch.uint8)[:: mmap.PAGESIZE].sum()


def _header_shapes(handle: Any) -> dict[str, list[int]]:
    """Returns the tensor shapes of an open safetensors file, read from its header without loading data."""
    return {key: handle.get_slice(key).get_shape() for key in handle.keys()}
