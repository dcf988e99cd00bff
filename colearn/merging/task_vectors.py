"""Task vectors (partner - ancestor; Ilharco et al. 2023) of one tensor, visited chunk by chunk.

Chunks keep every temporary of a merge in cache and let a checkpoint stream through memory one
tensor at a time; nothing here materializes all N task vectors of a tensor at once.  Everything
runs on the tensors' own device.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

CHUNK = 1 << 17  # elements per chunk: 512 KiB of float32, so a chunk's temporaries stay in cache
TINY_NORM = 1e-8  # below this norm a task vector has no direction


@dataclass(frozen=True)
class TaskVectors:
    """The N task vectors of one tensor, flattened, computed chunk by chunk in `dtype` (never all at once)."""

    partners: Sequence[Tensor]  # N x (n,): the partners' flat tensors (or the task vectors when base is None)
    base: Tensor | None  # (n,) the ancestor's flat tensor; None when `partners` already are task vectors
    dtype: torch.dtype  # arithmetic dtype, at least float32
    chunk_size: int = CHUNK

    @property
    def numel(self) -> int:
        return self.partners[0].numel()

    @property
    def device(self) -> torch.device:
        return self.partners[0].device

    def chunks(self) -> Iterator[tuple[slice, Tensor | None, list[Tensor]]]:
        """Yields (slice, base chunk or None, N task-vector chunks) over the flat tensor, in order."""
        for start in range(0, self.numel, self.chunk_size):
            where = slice(start, min(start + self.chunk_size, self.numel))
            yield where, *self.at(where)

    def at(self, where: slice | Tensor) -> tuple[Tensor | None, list[Tensor]]:
        """Returns the base (or None) and the N task vectors at a slice or an index tensor, as tensors of their own
        (operators overwrite them) except the base at a slice, a view when it has the arithmetic dtype."""
        if self.base is None:
            return None, [_picked(p, where).to(self.dtype, copy=True) for p in self.partners]
        base = _picked(self.base, where).to(self.dtype)  # (c,)
        return base, [_picked(p, where).to(self.dtype) - base for p in self.partners]

    def whole(self, index: int) -> Tensor:
        """Returns task vector `index` materialized (for DELLA, which ranks a whole tensor's magnitudes)."""
        if self.base is None:
            return self.partners[index].to(self.dtype, copy=True)
        return self.partners[index].to(self.dtype) - self.base.to(self.dtype)


def _picked(x: Tensor, where: slice | Tensor) -> Tensor:
    return x[where] if isinstance(where, slice) else x.index_select(0, where)


def gram_matrix(tv: TaskVectors) -> Tensor:
    """Returns the (N, N) float64 matrix of dot products between the task vectors (on the CPU).

    Each chunk's products are sums of at most `chunk_size` terms in the arithmetic dtype,
    added up in float64.
    """
    count = len(tv.partners)
    gram = torch.zeros(count, count, dtype=torch.float64, device=tv.device)
    for _, _, deltas in tv.chunks():
        stacked = torch.stack(deltas)  # (N, c)
        gram += (stacked @ stacked.T).double()
    return gram.cpu()


def cosines(gram: Tensor) -> Tensor:
    """Returns the (N, N) cosines from a Gram matrix; 0 where either vector has (almost) no norm."""
    norms = gram.diagonal().clamp(min=0).sqrt()  # (N,)
    outer = norms[:, None] * norms[None, :]  # (N, N)
    return torch.where(outer > TINY_NORM**2, gram / outer.clamp(min=TINY_NORM**2), torch.zeros_like(gram))
