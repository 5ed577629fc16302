"""K task tensors of one shape, read in chunks of entries: what the element-wise methods (TIES, DARE, magnitude
pruning) run over.

An element-wise method touches every entry of K dense m x n deltas several times (absolute value, compare,
count, sign, vote, mask, sum). Over whole tensors each of those passes streams K m n floats through memory; over
chunks of a few hundred thousand entries the passes run in the cache, and only the result is written out. For
the dense methods the deltas are never materialised either: `LowRankStack` computes each chunk of rows of
`s_i B_i A_i` when it is needed, so a module's K dense deltas cost one chunk of memory, not K m n floats.

Chunks are blocks of whole rows (`row_chunk`), the same for every source of a shape, so a method's result, DARE's
random draws included, does not depend on where its task tensors come from.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

CHUNK = 1 << 18   # entries per task tensor per chunk: a few MB at K = 10, cache-sized on a CPU


class TaskStack:
    """K task tensors of shape `shape`: `chunks()` yields `(start, x)` with x (K, c) the flat entries
    start .. start + c - 1 of each; `gather(i, idx)` reads entries of task i by flat index; `task(i)` the whole
    task tensor i, flat."""

    K: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def cols(self) -> int:
        return self.numel // self.shape[0] if self.shape and self.shape[0] else 1

    def row_chunk(self) -> int:
        """Rows per chunk (the last dimensions flattened as one row)."""
        return max(1, CHUNK // max(1, self.cols))

    def chunks(self) -> Iterator[tuple[int, torch.Tensor]]:
        raise NotImplementedError

    def gather(self, i: int, idx: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def task(self, i: int) -> torch.Tensor:
        return torch.cat([x[i] for _, x in self.chunks()])

    def map_chunks(self, fn: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """`fn(start, x)` -> the result's entries for the chunk, for every chunk in order; the result has the
        task tensors' shape."""
        out = torch.empty(self.numel, dtype=self.dtype, device=self.device)
        for start, x in self.chunks():
            out[start:start + x.shape[1]] = fn(start, x)
        return out.reshape(self.shape)


class DenseStack(TaskStack):
    """A stacked tensor (K, ...)."""

    def __init__(self, stack: torch.Tensor):
        self.K, self.shape = stack.shape[0], tuple(stack.shape[1:])
        self.dtype, self.device = stack.dtype, stack.device
        self.flat = stack.reshape(self.K, -1)

    def chunks(self) -> Iterator[tuple[int, torch.Tensor]]:
        step = self.row_chunk() * self.cols
        for start in range(0, self.flat.shape[1], step):
            yield start, self.flat[:, start:start + step]

    def gather(self, i: int, idx: torch.Tensor) -> torch.Tensor:
        return self.flat[i, idx]

    def task(self, i: int) -> torch.Tensor:
        return self.flat[i]


class LowRankStack(TaskStack):
    """The dense deltas `s_i B_i A_i` (float32) of K LoRAs of one module, computed a block of rows at a time.

    Ranks may differ: the factors are zero-padded to the largest, which adds exact zeros."""

    def __init__(self, Bs: list[torch.Tensor], As: list[torch.Tensor], scales: list[float]):
        R = max(a.shape[0] for a in As)
        self.B = torch.stack([torch.nn.functional.pad(b.float(), (0, R - b.shape[1])) for b in Bs])   # (K, m, R)
        self.A = torch.stack([torch.nn.functional.pad(a.float(), (0, 0, 0, R - a.shape[0])) for a in As])
        self.s = torch.tensor(scales, dtype=torch.float32, device=self.A.device)
        self.K, self.shape = len(As), (self.B.shape[1], self.A.shape[2])
        self.dtype, self.device = torch.float32, self.A.device

    def chunks(self) -> Iterator[tuple[int, torch.Tensor]]:
        rows, n = self.row_chunk(), self.shape[1]
        for r in range(0, self.shape[0], rows):
            block = torch.bmm(self.B[:, r:r + rows], self.A)            # (K, rows, n), as B @ A then the scale
            block.mul_(self.s.view(-1, 1, 1))
            yield r * n, block.reshape(self.K, -1)

    def gather(self, i: int, idx: torch.Tensor) -> torch.Tensor:
        rows, cols = idx // self.shape[1], idx % self.shape[1]
        return (self.B[i, rows] * self.A[i, :, cols].T).sum(1) * self.s[i]


def as_stack(stack: torch.Tensor | TaskStack) -> TaskStack:
    return stack if isinstance(stack, TaskStack) else DenseStack(stack)


__all__ = ["TaskStack", "DenseStack", "LowRankStack", "as_stack", "CHUNK"]
