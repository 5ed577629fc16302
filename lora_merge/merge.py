"""`merge`: run a registered method over the union of the adapters' modules, one module at a time."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from . import __version__
from .adapter import (
    Adapter,
    Entries,
    LoraWeight,
    _check_plain,
    _input_record,
    as_weights,
    check_compatible,
    combined_config,
    common_dtype,
    concat,
    module_table,
    read_entries,
    shared_extras,
    split_weight,
)
from .batching import RefactorQueue, chunk_bytes
from .errors import MethodError, UnsupportedAdapterError
from .linalg import lowrank
from .methods import MergeMethod, get_method
from .methods.stack import LowRankStack


def merge(adapters: Sequence[Adapter] | Mapping[str, Adapter],
          weights: Sequence[float] | Mapping[str, float] | None = None, method: str = "sum", *,
          name: str | None = None, allow_base_mismatch: bool = False, device: str | torch.device = "cpu",
          progress: Callable[[str], None] | None = None, **params: Any) -> Adapter:
    """Combine adapters into one with a registered method (see `lora_merge.METHODS`).

    `weights` defaults to 1.0 per adapter. `params` are the method's own (`density`, `majority_sign_method`,
    `seed`) and the output `rank` / `energy`. A module that an adapter lacks contributes zero to it.
    `device` ("cpu", "cuda", "auto") is where each module is computed; results come back to the CPU.
    `progress(module)` is called after each module.

    Memory: the inputs are read one module at a time (adapters loaded by `lora_merge.load` keep no values in
    memory), so the peak is one module's inputs plus the result. The dense methods build one module's delta at
    a time and re-factor deltas of the same shape in one batched SVD (`lora_merge.batching`); their `svd`
    parameter picks the exact thin SVD or a randomized truncated one ("auto": randomized where only the top
    `rank` of a large matrix are needed).
    """
    if isinstance(adapters, Mapping):   # the mapping's keys name the adapters
        adapters = [dataclasses.replace(a, name=n) if a.name != n else a
                    for n, a in zip(adapters, map(_as_adapter, adapters.values()))]
    adapters = [_as_adapter(a) for a in adapters]
    if not adapters:
        raise MethodError("merge needs at least one adapter")
    spec = get_method(method)
    w = as_weights(adapters, weights)
    p = spec.resolve(params)
    check_compatible(adapters, allow_base_mismatch)
    extra = shared_extras(adapters)

    table = module_table(adapters, w)
    if not table:
        raise MethodError(f"{spec.name}: the adapters have no modules (all terms cancelled?); nothing to merge")
    rank = p.get("rank")
    if rank is None and spec.default_rank == "max" and p.get("energy") is None:
        rank = max(x.rank for entries in table.values() for _, x, _ in entries)
    rng = torch.Generator().manual_seed(p["seed"]) if spec.uses_rng else None
    combine = {"exact": _exact, "factor": _factor}.get(spec.family)
    dev = resolve_device(device)
    modules = {}

    def done(path: str, weight: LoraWeight) -> None:
        modules[path] = weight.to("cpu")
        if progress is not None:
            progress(path)

    queue = RefactorQueue(rank, p.get("energy"), p.get("svd", "exact"), chunk_bytes(dev), done)
    for path, entries in table.items():
        entries = read_entries(path, entries)          # this module of each input, and no other, in memory
        if dev.type != "cpu":
            entries = [(c, x.to(dev), a) for c, x, a in entries]
        if spec.family == "dense":
            queue.put(path, _dense(spec, path, entries, p, rng), entries[0][1].embedding,
                      oversample=sum(x.rank for _, x, _ in entries))
        else:
            done(path, combine(spec, path, entries, p, rng, rank))
        del entries
    queue.close()
    modules = {path: modules[path] for path in table}

    resolved = dict(p, rank=rank) if "rank" in p else dict(p)
    provenance = {"method": spec.name, "params": resolved, "inputs": [_input_record(a, x) for a, x in zip(adapters, w)],
                  "lora_merge_version": __version__}
    return Adapter(modules, combined_config(adapters), name=name or f"{spec.name}-merge",
                   provenance=provenance, extra=extra, storage_dtype=common_dtype(adapters))


def resolve_device(device: str | torch.device | None) -> torch.device:
    """"cpu", "cuda[:n]", or "auto" (CUDA when present) as a torch.device; a clear error if CUDA is missing."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise MethodError(f"unknown device {device!r}; use cpu, cuda or auto", key="device") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MethodError("device 'cuda' was asked for, but torch sees no CUDA device here; use cpu or auto",
                          key="device")
    if dev.type not in ("cpu", "cuda"):
        raise MethodError(f"device {device!r} is not supported; use cpu, cuda or auto", key="device")
    return dev


def _as_adapter(a) -> Adapter:
    """Adapters pass through; a path or Hub id is loaded."""
    if isinstance(a, Adapter):
        return a
    if isinstance(a, (str, os.PathLike)):
        from .io import load
        return load(a)
    raise MethodError(f"merge takes Adapter objects, paths or Hub ids, got {type(a).__name__}")


def _exact(spec: MergeMethod, path: str, entries: Entries, p: dict, rng, rank: int | None) -> LoraWeight:
    w = concat(path, entries)
    if rank is None and p.get("energy") is None:
        return w
    B, A = lowrank(w.B, w.A, rank, p.get("energy"))
    return LoraWeight(A=A, B=B, scale=1.0, embedding=w.embedding, bias=w.bias)


def _plain_only(spec: MergeMethod, path: str, entries: Entries) -> None:
    for _, x, a in entries:
        _check_plain(a, path, x, spec.name)
        if x.bias is not None:
            raise UnsupportedAdapterError(
                f"{spec.name}: adapter '{a.name}' has a LoRA bias (lora_bias) at module {path}; only the exact "
                "methods (sum, cat, svd) merge biases", file=a.source, module=path)


def check_equal_ranks(method: str, path: str, entries: Entries) -> None:
    """The factor family combines A and B element-wise: every input's rank must be the same at `path`."""
    if len({x.rank for _, x, _ in entries}) > 1:
        listing = ", ".join(f"{a.name}: r={x.rank}" for _, x, a in entries)
        raise MethodError(f"{method} combines A and B factors element-wise and needs equal ranks, but module "
                          f"{path} has {listing}; use 'svd' (or 'ties_svd', ...) for adapters of different ranks",
                          module=path, key="method")


def _factor(spec: MergeMethod, path: str, entries: Entries, p: dict, rng, rank: int | None) -> LoraWeight:
    _plain_only(spec, path, entries)
    check_equal_ranks(spec.name, path, entries)
    if spec.split == "pem":
        wa = [abs(c) * math.sqrt(x.scale) for c, x, _ in entries]
        wb = [c * math.sqrt(x.scale) for c, x, _ in entries]
    elif spec.split == "lorahub":
        wa = wb = [c * math.sqrt(x.scale) for c, x, _ in entries]
    else:  # PEFT
        wa, wb = zip(*(split_weight(c * x.scale) for c, x, _ in entries))
    kwargs = _op_kwargs(spec, p, rng)
    dev = entries[0][1].A.device
    A = spec.op(torch.stack([x.A.float() for _, x, _ in entries]), torch.tensor(wa, device=dev), **kwargs)
    B = spec.op(torch.stack([x.B.float() for _, x, _ in entries]), torch.tensor(wb, device=dev), **kwargs)
    if rank is not None or p.get("energy") is not None:
        B, A = lowrank(B, A, rank, p.get("energy"))
    return LoraWeight(A=A, B=B, scale=1.0, embedding=entries[0][1].embedding)


def _dense(spec: MergeMethod, path: str, entries: Entries, p: dict, rng) -> torch.Tensor:
    """One module's merged dense delta (float32); its re-factoring is queued (see `merge`). The inputs' dense
    deltas are never built whole: the method reads them a block of rows at a time (`methods.stack`)."""
    _plain_only(spec, path, entries)
    stack = LowRankStack([x.B for _, x, _ in entries], [x.A for _, x, _ in entries], [x.scale for _, x, _ in entries])
    coefs = torch.tensor([c for c, _, _ in entries], dtype=torch.float32, device=stack.device)
    return spec.op(stack, coefs, **_op_kwargs(spec, p, rng))


def _op_kwargs(spec: MergeMethod, p: dict, rng: torch.Generator | None) -> dict:
    """The resolved parameters that the method's tensor operation takes, and its random generator."""
    kwargs = {k: v for k, v in p.items() if k not in ("rank", "energy", "seed", "svd")}
    return kwargs | ({"rng": rng} if rng is not None else {})


__all__ = ["merge", "resolve_device"]
