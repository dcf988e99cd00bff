"""Task vectors (partner - ancestor; Ilharco et al. 2023) of one tensor, visited chunk by chunk.

Chunks keep every temporary of a merge in cache and let a checkpoint stream through memory one
tensor at a time; nothing here materializes all N task vectors of a tensor at once.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from colearn import kernels

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

    def base_at(self, where: slice | Tensor) -> Tensor | None:
        """Returns the base at a slice or an index tensor, in `dtype` (None without a base)."""
        return None if self.base is None else _picked(self.base, where).to(self.dtype)

    def at(self, where: slice | Tensor) -> tuple[Tensor | None, list[Tensor]]:
        """Returns the base chunk (or None) and the N task vectors at a slice or an index tensor."""
        if self.base is None:  # a copy: operators trim chunks in place
            return None, [_picked(p, where).to(self.dtype, copy=True) for p in self.partners]
        base = self.base_at(where)  # (c,)
        return base, [_picked(p, where).to(self.dtype) - base for p in self.partners]

    def whole(self, index: int) -> Tensor:
        """Returns task vector `index` materialized (for the operators that sort a whole tensor)."""
        if self.base is None:
            return self.partners[index].to(self.dtype)
        return self.partners[index].to(self.dtype) - self.base.to(self.dtype)


def gathered(x: Tensor, index: Tensor) -> Tensor:
    """Returns x[index] for a 1-D tensor, as a copy (numpy's take on the CPU: torch's indexing costs ~10x here)."""
    if x.device.type == "cpu" and x.dtype != torch.bfloat16:  # numpy has no bfloat16
        return torch.from_numpy(x.detach().numpy().take(index.numpy()))
    return x[index]


def _picked(x: Tensor, where: slice | Tensor) -> Tensor:
    return x[where] if isinstance(where, slice) else gathered(x, where)


def gram_matrix(tv: TaskVectors) -> Tensor:
    """Returns the (N, N) float64 matrix of dot products between the task vectors.

    Fused in one pass on the CPU (`colearn.kernels.gram`: float64 sums of blocks); otherwise
    each chunk's products are float32 sums of at most `chunk_size` terms, added up in float64.
    """
    if tv.base is not None and tv.base.dtype == tv.dtype and kernels.usable(tv.base, *tv.partners):
        return kernels.gram(tv.base, tv.partners)
    gram = torch.zeros(len(tv.partners), len(tv.partners), dtype=torch.float64)
    for start in range(0, tv.numel, tv.chunk_size):
        where = slice(start, min(start + tv.chunk_size, tv.numel))
        stacked = torch.stack([p[where] for p in tv.partners]).to(tv.dtype)  # (N, c)
        if tv.base is not None:
            stacked.sub_(tv.base[where].to(tv.dtype))
        gram += (stacked @ stacked.T).double().cpu()
    return gram


def cosines(gram: Tensor) -> Tensor:
    """Returns the (N, N) cosines from a Gram matrix; 0 where either vector has (almost) no norm."""
    norms = gram.diagonal().clamp(min=0).sqrt()  # (N,)
    outer = norms[:, None] * norms[None, :]  # (N, N)
    return torch.where(outer > TINY_NORM**2, gram / outer.clamp(min=TINY_NORM**2), torch.zeros_like(gram))
