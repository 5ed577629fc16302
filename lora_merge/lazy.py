"""Modules read on demand, so that a merge holds one module's inputs at a time, never whole adapters.

`LazyModules` is a read-only mapping `module path -> LoraWeight` whose values are built on access: from a
safetensors file (read through `safe_open`, which maps the file and copies out only the tensors asked for), or
from the terms of a combination (concatenated per module). Its `metas` are the same LoraWeights with tensors
on the `meta` device: shapes, dtypes, ranks and scales, known without reading any values. Nothing is cached:
a value that is no longer referenced is freed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch

from .adapter import LoraWeight
from .errors import AdapterLoadError


class LazyModules(Mapping):
    """Module path -> LoraWeight, each read when it is asked for (see the module docstring)."""

    def __init__(self, metas: Mapping[str, LoraWeight], load: Callable[[str], LoraWeight]):
        self.metas = dict(metas)
        self._load = load

    def __getitem__(self, path: str) -> LoraWeight:
        if path not in self.metas:
            raise KeyError(path)
        return self._load(path)

    def __iter__(self) -> Iterator[str]:
        return iter(self.metas)

    def __len__(self) -> int:
        return len(self.metas)

    def __contains__(self, path: object) -> bool:
        return path in self.metas

    def __repr__(self) -> str:
        return f"LazyModules({len(self)} modules)"


def to_meta(t: torch.Tensor | None) -> torch.Tensor | None:
    """A tensor's shape and dtype, without its values."""
    return None if t is None else torch.empty(t.shape, dtype=t.dtype, device="meta")


def meta_weight(w: LoraWeight) -> LoraWeight:
    return LoraWeight(A=to_meta(w.A), B=to_meta(w.B), scale=w.scale, embedding=w.embedding,
                      magnitude=to_meta(w.magnitude), bias=to_meta(w.bias))


def from_safetensors(file: Path, metas: Mapping[str, LoraWeight],
                     keys: Mapping[str, Mapping[str, str]]) -> LazyModules:
    """Modules read from `file`: `keys[path]` names the tensor of each slot (A, B, magnitude, bias)."""
    from safetensors import safe_open

    def load(path: str) -> LoraWeight:
        meta = metas[path]
        try:
            with safe_open(str(file), framework="pt") as f:
                # get_tensor maps the file; a copy cannot fault if the file is replaced while it is in use
                t = {slot: f.get_tensor(key).clone() for slot, key in keys[path].items()}
        except Exception as e:  # noqa: BLE001 - safetensors raises several types for a file changed on disk
            raise AdapterLoadError(f"{file}: module {path} can no longer be read ({e}); was the file changed "
                                   "after it was loaded?", file=str(file), module=path) from None
        for slot, tensor in t.items():
            expected = getattr(meta, slot)
            if tensor.shape != expected.shape or tensor.dtype != expected.dtype:
                raise AdapterLoadError(f"{file}: module {path} changed on disk after it was loaded ({slot} is now "
                                       f"{tuple(tensor.shape)} {tensor.dtype})", file=str(file), module=path)
        return LoraWeight(A=t["A"], B=t["B"], scale=meta.scale, embedding=meta.embedding,
                          magnitude=t.get("magnitude"), bias=t.get("bias"))

    return LazyModules(metas, load)


__all__ = ["LazyModules", "from_safetensors", "meta_weight", "to_meta"]
