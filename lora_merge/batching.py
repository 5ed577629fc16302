"""Dense deltas queued for their SVD: modules of the same shape are stacked and decomposed in one call.

The dense methods (TIES, DARE, magnitude pruning on the deltas) build one module's m x n delta at a time;
its re-factoring waits here until enough deltas of its shape are queued to fill a chunk that fits the device
memory, then the whole chunk goes through one batched SVD (`linalg.refactor`). On a GPU that replaces
hundreds of small calls by a few large ones; on a CPU it costs nothing. Results do not depend on the chunking.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from .adapter import LoraWeight
from .errors import MethodError
from .linalg import refactor

CPU_CHUNK_BYTES = 512 * 2**20


def chunk_bytes(device: torch.device) -> int:
    """Bytes of queued deltas per batched SVD: a quarter of the free GPU memory (the SVD needs room for its
    factors and workspace), or 512 MiB on the CPU; `LORA_MERGE_CHUNK_BYTES` overrides both."""
    text = os.environ.get("LORA_MERGE_CHUNK_BYTES")
    if text:
        if not text.isdigit() or int(text) < 1:
            raise MethodError(f"LORA_MERGE_CHUNK_BYTES must be a positive number of bytes, got {text!r}",
                              key="LORA_MERGE_CHUNK_BYTES")
        return int(text)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(free // 4, 1)
    return CPU_CHUNK_BYTES


class RefactorQueue:
    """Queue `(path, delta)`; `done(path, LoraWeight)` is called for each once its chunk is decomposed."""

    def __init__(self, rank: int | None, energy: float | None, mode: str, budget: int,
                 done: Callable[[str, LoraWeight], None]):
        self.rank, self.energy, self.mode, self.budget, self.done = rank, energy, mode, budget, done
        self.groups: dict[tuple, list[tuple[str, torch.Tensor, bool]]] = {}

    def put(self, path: str, delta: torch.Tensor, embedding: bool = False, oversample: int = 0) -> None:
        """Queue one module's delta; `oversample`: its inputs' total rank (see `linalg.randomized_svd`)."""
        key = (tuple(delta.shape), delta.dtype, delta.device, oversample)
        group = self.groups.setdefault(key, [])
        group.append((path, delta, embedding))
        if sum(d.numel() * d.element_size() for _, d, _ in group) >= self.budget:
            self._flush(key)

    def close(self) -> None:
        for key in list(self.groups):
            self._flush(key)

    def _flush(self, key: tuple) -> None:
        group = self.groups.pop(key, [])
        if not group:
            return
        stack = torch.stack([d for _, d, _ in group])
        names = [(path, emb) for path, _, emb in group]
        del group                                   # the stack holds the only copy now
        factors = refactor(stack, self.rank, self.energy, self.mode, oversample=key[3])
        del stack
        for (path, emb), (B, A) in zip(names, factors):
            self.done(path, LoraWeight(A=A.contiguous(), B=B.contiguous(), scale=1.0, embedding=emb))
