"""Streaming: a loaded adapter keeps no values in memory, a merge reads one module of each input at a time and
writes byte for byte what the in-memory path writes, and the batched re-factoring does not depend on how the
modules are chunked."""

from __future__ import annotations

import weakref

import pytest
import torch
from conftest import rel

import lora_merge as lm
from lora_merge.adapter import Adapter, LoraWeight
from lora_merge.lazy import LazyModules

METHODS = ["cat", "svd", "linear", "ties", "ties_svd", "dare_ties_svd", "magnitude_prune_svd"]


def files(paths, lazy: bool):
    return [lm.load(p, lazy=lazy) for p in paths]


def test_a_loaded_adapter_holds_no_values(mixed_rank):
    a = lm.load(mixed_rank[0])
    eager = lm.load(mixed_rank[0], lazy=False)
    assert isinstance(a.modules, LazyModules)
    assert all(w.A.device.type == "meta" and w.B.device.type == "meta" for w in a.metas.values())
    assert set(a.modules) == set(eager.modules)
    for path, w in eager.modules.items():
        lazy = a.modules[path]
        assert lazy.A.device.type == "cpu"
        assert torch.equal(lazy.A, w.A) and torch.equal(lazy.B, w.B) and lazy.scale == w.scale
        assert a.metas[path].shape == w.shape and a.metas[path].rank == w.rank
    assert a.dtype == eager.dtype


@pytest.mark.parametrize("method", METHODS)
def test_streaming_writes_what_the_in_memory_path_writes(same_rank, tmp_path, method):
    params = {"density": 0.5} if "ties" in method or "dare" in method or "prune" in method else {}
    for lazy in (True, False):
        merged = lm.merge(files(same_rank, lazy), [0.5, 0.3, 0.7], method, name="m", **params)
        merged.save(tmp_path / str(lazy))
    streamed = (tmp_path / "True" / "adapter_model.safetensors").read_bytes()
    assert streamed == (tmp_path / "False" / "adapter_model.safetensors").read_bytes()


def test_a_merge_holds_one_module_of_each_input_at_a_time(mixed_rank, monkeypatch):
    """Count the module values still alive whenever one is read: with streaming, only those of the module
    being merged (one per input) are; an in-memory merge would hold every module of every input."""
    adapters = files(mixed_rank, lazy=True)
    alive: list[weakref.ref] = []
    most = [0]
    for a in adapters:
        load = a.modules._load

        def counting(path, load=load):
            w = load(path)
            alive.append(weakref.ref(w.A))
            most[0] = max(most[0], sum(r() is not None for r in alive))
            return w
        monkeypatch.setattr(a.modules, "_load", counting)
    lm.merge(adapters, [1.0, 1.0, 1.0], "ties_svd", density=0.5)
    total = sum(len(a.metas) for a in adapters)
    assert len(alive) == total                  # every module read once
    assert most[0] <= len(adapters) < total


def test_an_expression_streams_too(mixed_rank, tmp_path):
    a, b, c = files(mixed_rank, lazy=True)
    combo = 0.6 * a - 0.3 * b + c
    assert isinstance(combo.modules, LazyModules)
    assert all(w.A.device.type == "meta" for w in combo.metas.values())
    path = next(p for p in combo.metas if p in a.metas and p in b.metas and p in c.metas)
    d = 0.6 * a.delta(path) - 0.3 * b.delta(path) + c.delta(path)
    assert rel(combo.delta(path), d) < 1e-6
    combo.save(tmp_path / "streamed")
    eager = 0.6 * lm.load(mixed_rank[0], lazy=False) - 0.3 * lm.load(mixed_rank[1], lazy=False) \
        + lm.load(mixed_rank[2], lazy=False)
    eager.save(tmp_path / "eager")
    assert (tmp_path / "streamed" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "eager" / "adapter_model.safetensors").read_bytes()


def test_a_file_changed_after_loading_is_a_clear_error(tmp_path, same_rank):
    import shutil
    folder = tmp_path / "a"
    shutil.copytree(same_rank[0], folder)
    a = lm.load(folder)
    shutil.copy(same_rank[2] / "adapter_model.safetensors", folder / "adapter_model.safetensors")
    with pytest.raises(lm.LoraMergeError, match=r"changed|can no longer be read") as e:
        lm.merge([a], [1.0], "sum")
    assert str(folder) in str(e.value)


def big_adapters(n_modules: int = 3, K: int = 3, shape=(600, 520), r: int = 8):
    """Adapters with modules large enough for the randomized path (built in memory)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for k in range(K):
        mods = {f"model.layers.{i}.mlp.up_proj": LoraWeight(A=torch.randn(r, shape[1], generator=g) / 10,
                                                            B=torch.randn(shape[0], r, generator=g) / 10, scale=2.0)
                for i in range(n_modules)}
        out.append(Adapter(mods, {"r": r, "lora_alpha": 2 * r, "target_modules": ["up_proj"]}, name=f"a{k}"))
    return out


def test_chunking_does_not_change_the_result(monkeypatch):
    adapters = big_adapters()
    one = lm.merge(adapters, [0.5, 0.3, 0.7], "ties_svd", density=0.3)
    monkeypatch.setenv("LORA_MERGE_CHUNK_BYTES", "1")          # every module decomposed alone
    alone = lm.merge(adapters, [0.5, 0.3, 0.7], "ties_svd", density=0.3)
    for path in one.modules:
        assert torch.equal(one.modules[path].A, alone.modules[path].A)
        assert torch.equal(one.modules[path].B, alone.modules[path].B)


def test_a_bad_chunk_size_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("LORA_MERGE_CHUNK_BYTES", "lots")
    with pytest.raises(lm.LoraMergeError, match="LORA_MERGE_CHUNK_BYTES must be a positive number of bytes"):
        lm.merge(big_adapters(1, 2), None, "ties_svd", density=0.5)


def test_randomized_merge_against_exact(monkeypatch):
    """At these shapes "auto" takes the randomized path; its result is the exact path's within the stated
    tolerance, though TIES' deltas have no gap at the rank (the sketch is as wide as the inputs' total rank)."""
    adapters = big_adapters()
    fast = lm.merge(adapters, [0.5, 0.3, 0.7], "ties_svd", density=0.3, rank=8)
    exact = lm.merge(adapters, [0.5, 0.3, 0.7], "ties_svd", density=0.3, rank=8, svd="exact")
    assert fast.provenance["params"]["svd"] == "auto"
    full = lm.merge(adapters, [0.5, 0.3, 0.7], "ties_svd", density=0.3, svd="exact", energy=1.0)
    for path in fast.modules:
        target = full.delta(path).double()
        err_fast = float((fast.delta(path).double() - target).norm())
        err_exact = float((exact.delta(path).double() - target).norm())
        assert err_exact <= err_fast * (1 + 1e-5)
        assert err_fast <= (1 + 1e-5) * err_exact
        assert rel(fast.delta(path), exact.delta(path)) < 1e-4


def test_svd_is_a_parameter_of_the_dense_methods_only():
    assert "svd" in lm.get_method("ties_svd").params
    assert "svd" not in lm.get_method("svd").params        # factored: exact and cheap already
    with pytest.raises(lm.LoraMergeError, match="svd must be one of"):
        lm.merge(big_adapters(1, 2), None, "ties_svd", density=0.5, svd="fast")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_batched_equals_cpu():
    adapters = big_adapters(n_modules=4)
    for svd in ("exact", "randomized"):
        cpu = lm.merge(adapters, [0.5, 0.3, 0.7], "ties_svd", density=0.3, svd=svd)
        gpu = lm.merge(adapters, [0.5, 0.3, 0.7], "ties_svd", density=0.3, svd=svd, device="cuda")
        for path in cpu.modules:
            assert rel(gpu.delta(path), cpu.delta(path)) < 1e-4, (svd, path)


def test_the_writer_is_safetensors_and_reproducible(tmp_path):
    """Our writer's files read back with safetensors, equal `save_file`'s layout, and do not vary between
    saves (save_file orders the metadata keys from a hash map)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from lora_merge import stfile
    g = torch.Generator().manual_seed(0)
    tensors = {"w.b": torch.randn(3, 4, generator=g), "w.a": torch.randn(5, generator=g).to(torch.bfloat16),
               "i": torch.arange(6).reshape(2, 3), "h": torch.tensor(1.5, dtype=torch.float16),
               "empty": torch.zeros(0, 3), "m": torch.tensor([True, False])}
    meta = {"format": "pt", "lora_merge_version": "x", "z": "1"}
    stfile.write(tmp_path / "a.safetensors", tensors, meta)
    stfile.write(tmp_path / "b.safetensors", dict(reversed(tensors.items())), dict(reversed(meta.items())))
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        assert f.metadata() == meta
        for k, t in tensors.items():
            assert f.get_tensor(k).dtype == t.dtype and torch.equal(f.get_tensor(k), t)
    save_file(tensors, str(tmp_path / "c.safetensors"), metadata=meta)
    ours, theirs = (tmp_path / "a.safetensors").read_bytes(), (tmp_path / "c.safetensors").read_bytes()
    assert len(ours) == len(theirs)
    n = int.from_bytes(ours[:8], "little")
    assert ours[8 + n:] == theirs[8 + n:]                    # the same tensors at the same offsets
