"""Writing safetensors files byte for byte reproducibly.

`safetensors.torch.save_file` writes its `__metadata__` from a hash map, so two saves of the same tensors can
differ in the order of the metadata keys, and a merge could not be checked by its hash. This writer emits the
same format (an 8-byte little-endian header length, a JSON header padded with spaces to 8 bytes, then the
tensors' bytes in header order) with every key in a fixed order: tensors sorted as safetensors sorts them
(by its dtype order, descending, which keeps every tensor aligned; then by name), and metadata keys sorted.
Tensors are written one at a time.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path

import torch

DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
# safetensors' own dtype order; tensors are laid out by it, descending (so by element size), then by name
_RANK = ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64",
         "U64"]


def write(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
    """Write `tensors` (any device; copied to the CPU one at a time) to `path` as a safetensors file."""
    order = sorted(tensors, key=lambda k: (-_RANK.index(DTYPES.get(tensors[k].dtype, "BOOL")), k))
    header: dict = {}
    if metadata:
        header["__metadata__"] = {k: str(metadata[k]) for k in sorted(metadata)}
    offset = 0
    for key in order:
        t = tensors[key]
        if t.dtype not in DTYPES:
            raise TypeError(f"{key}: dtype {t.dtype} cannot be stored in safetensors")
        size = t.numel() * t.element_size()
        header[key] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for key in order:
            t = tensors[key].detach().to("cpu").contiguous()
            f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())


__all__ = ["write"]
