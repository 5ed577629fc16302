"""`merge`: run a registered method over the union of the adapters' modules, one module at a time."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
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
          progress: Callable[[str], None] | None = None, fishers: Any = None, grams: Any = None,
          **params: Any) -> Adapter:
    """Combine adapters into one with a registered method (see `lora_merge.METHODS`).

    `weights` defaults to 1.0 per adapter. `params` are the method's own (`density`, `majority_sign_method`,
    `seed`) and the output `rank` / `energy`. A module that an adapter lacks contributes zero to it.
    `device` ("cpu", "cuda", "auto") is where each module is computed; results come back to the CPU.
    `progress(module)` is called after each module.

    `fishers` / `grams`: each input's statistics for the methods weighted by data (`fisher`, `regmean`): one per
    adapter (a `lora_merge.fisher.Fisher`, or the path of its file; for `grams` also `load_gram`'s mapping), as a
    list in the adapters' order or a mapping by adapter name. Left out, each adapter's `fisher.safetensors` /
    `fisher.gram.safetensors` beside its `adapter_model.safetensors` is used; an adapter without one is a clear
    error.

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
    stats = statistics(spec, adapters, fishers if spec.needs == "fisher" else grams) if spec.needs else None
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
        elif spec.family == "data":
            out = _data(spec, path, entries, p, stats)
            if isinstance(out, torch.Tensor):
                queue.put(path, out, oversample=sum(x.rank for _, x, _ in entries))
            else:
                done(path, _truncate(out, rank, p.get("energy")))
        else:
            done(path, combine(spec, path, entries, p, rng, rank))
        del entries
    queue.close()
    modules = {path: modules[path] for path in table}

    resolved = dict(p, rank=rank) if "rank" in p else dict(p)
    provenance = {"method": spec.name, "params": resolved, "inputs": [_input_record(a, x) for a, x in zip(adapters, w)],
                  "lora_merge_version": __version__}
    if stats is not None:
        provenance["statistics"] = {a.name: _stat_meta(stats[id(a)]) for a in adapters}
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


def _data(spec: MergeMethod, path: str, entries: Entries, p: dict, stats: dict) -> LoraWeight | torch.Tensor:
    """One module of a method weighted by data: its inputs and their statistics."""
    _plain_only(spec, path, entries)
    mine = [stats[id(a)] for _, _, a in entries]
    if spec.needs == "fisher" and mine[0].space == "factor":
        check_equal_ranks(spec.name, path, entries)
    if spec.needs == "gram":
        mine = [x.gram for x in mine]
    return spec.op(path, entries, mine, **_op_kwargs(spec, p, None))


def _truncate(w: LoraWeight, rank: int | None, energy: float | None) -> LoraWeight:
    """`w` re-factored to `rank` / `energy` by the factored SVD; as it is if it is already within the rank."""
    if energy is None and (rank is None or rank >= w.rank):
        return w
    B, A = lowrank(w.B, w.A, rank, energy)
    return dataclasses.replace(w, A=A, B=B, scale=1.0)


def statistics(spec: MergeMethod, adapters: list[Adapter], given: Any) -> dict[int, Any]:
    """Each adapter's statistics (by `id`) for a method weighted by data: given (a list in the adapters' order, a
    mapping by name; each a Fisher or a file path), or the file beside the adapter."""
    from .fisher import Fisher, load_gram
    filename = {"fisher": "fisher.safetensors", "gram": "fisher.gram.safetensors"}[spec.needs]
    if given is not None and not isinstance(given, Mapping):
        given = list(given)
        if len(given) != len(adapters):
            raise MethodError(f"{spec.name}: {len(given)} {spec.needs} statistics for {len(adapters)} adapters; pass "
                              "one per adapter, in order, or a mapping by adapter name", key=f"{spec.needs}s")
        given = {a.name: g for a, g in zip(adapters, given)}
    unknown = sorted(set(given or {}) - {a.name for a in adapters})
    if unknown:
        raise MethodError(f"{spec.name}: {spec.needs} statistics given for '{unknown[0]}', which is not one of the "
                          f"adapters ({', '.join(a.name for a in adapters)})", key=f"{spec.needs}s")
    out = {}
    for a in adapters:
        item = (given or {}).get(a.name)
        if item is None:
            beside = Path(a.source) / filename if a.source and Path(a.source).is_dir() else None
            if beside is None or not beside.is_file():
                where = f"beside its adapter_model.safetensors ({a.source})" if a.source else "for it"
                raise MethodError(
                    f"{spec.name}: no {'Fisher' if spec.needs == 'fisher' else 'Gram matrices'} for adapter "
                    f"'{a.name}': pass {spec.needs}s=..., or put {filename} {where}; estimate it with "
                    f"`lora-merge fisher {a.source or a.name} --base-model MODEL --data FILE.jsonl"
                    f"{' --gram' if spec.needs == 'gram' else ''}`", file=a.source, key=f"{spec.needs}s")
            item = beside
        if isinstance(item, (str, os.PathLike)):
            file = item
            item = Fisher.load(file) if spec.needs == "fisher" else Fisher("delta", {}, load_gram(file), {})
            item.meta = {**item.meta, "file": str(file)}       # the card's recipe names the file it used
        elif spec.needs == "gram" and isinstance(item, Mapping):      # `load_gram`'s: module path -> Gram
            item = Fisher("delta", {}, dict(item), {})
        if spec.needs == "gram" and getattr(item, "gram", None) is None:
            raise MethodError(f"{spec.name}: the statistics given for adapter '{a.name}' hold no Gram matrices "
                              "(estimate them with gram=True / --gram)", file=a.source, key="grams")
        out[id(a)] = item
    if spec.needs == "fisher":
        spaces = {out[id(a)].space for a in adapters}
        if len(spaces) > 1:
            listing = ", ".join(f"{a.name}: {out[id(a)].space}" for a in adapters)
            raise MethodError(f"{spec.name}: the Fishers are of different spaces ({listing}); estimate all in one "
                              "space (--space factor or delta)", key="fishers")
    return out


def _stat_meta(stat: Any) -> dict:
    return dict(getattr(stat, "meta", {}) or {})


def _op_kwargs(spec: MergeMethod, p: dict, rng: torch.Generator | None) -> dict:
    """The resolved parameters that the method's tensor operation takes, and its random generator."""
    kwargs = {k: v for k, v in p.items() if k not in ("rank", "energy", "seed", "svd")}
    return kwargs | ({"rng": rng} if rng is not None else {})


__all__ = ["merge", "resolve_device"]
