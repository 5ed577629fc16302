"""What PEFT sees when it loads our folder: exactly our modules, each with its rank and scale."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from conftest import lora_layers, make_adapter, rel, tiny_llama
from torch import nn

import lora_merge as lm


def _reload(model, path):
    from peft import PeftModel
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(model, str(path)).eval()


def _deltas(peft_model):
    return {m: layer.get_delta_weight("default") for m, layer in lora_layers(peft_model).items()}


def test_partly_overlapping_adapters_give_peft_exactly_our_modules(tmp_path):
    """a: q_proj of layer 0; b: v_proj of layer 1. The union of their targets would make PEFT build four layers
    and initialise the two absent ones at random (init_lora_weights=False); exact paths avoid that."""
    a = lm.load(make_adapter(tmp_path / "a", targets=("q_proj",), layers_to_transform=[0], seed=1))
    b = lm.load(make_adapter(tmp_path / "b", targets=("v_proj",), layers_to_transform=[1], seed=2))
    merged = lm.merge([a, b], [1.0, 0.5], "sum")
    merged.save(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True
    applied = _deltas(_reload(tiny_llama(), tmp_path / "out"))
    assert set(applied) == set(merged.modules) == {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"}
    for m, d in applied.items():
        assert rel(d, merged.delta(m)) < 1e-6


def test_same_targets_keep_the_inputs_config(same_rank, tmp_path):
    merged = lm.merge([lm.load(p) for p in same_rank[:2]], [0.5, 0.5], "svd")
    merged.save(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["embed_tokens", "q_proj", "v_proj"]


class _Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        return self.proj(x)


class _Nested(nn.Module):
    """Two modules whose paths end alike: `proj` and `inner.proj`."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(8, 8)
        self.inner = _Inner()

    def forward(self, x):
        return self.inner(self.proj(x))


def test_pattern_keys_match_one_module_even_when_paths_end_alike(tmp_path):
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(1)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], init_lora_weights=False,
                     rank_pattern={"^proj": 2}, alpha_pattern={"^proj": 32})
    get_peft_model(_Nested(), cfg).save_pretrained(str(tmp_path / "src"))
    a = lm.load(tmp_path / "src")
    assert (a.modules["proj"].rank, a.modules["proj"].scale) == (2, 16.0)
    assert (a.modules["inner.proj"].rank, a.modules["inner.proj"].scale) == (4, 2.0)
    a.save(tmp_path / "copy")
    lm.merge([a], [0.5], "sum").save(tmp_path / "half")
    for folder, k in (("copy", 1.0), ("half", 0.5)):
        applied = _deltas(_reload(_Nested(), tmp_path / folder))
        for m in ("proj", "inner.proj"):
            assert rel(applied[m], k * a.delta(m)) < 1e-6, (folder, m)


def test_base_changing_inits_are_refused(tmp_path):
    src = make_adapter(tmp_path / "a", seed=1)
    cfg_path = src / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["init_lora_weights"] = "pissa_niter_4"
    cfg_path.write_text(json.dumps(cfg))
    a = lm.load(src)                                     # loading is fine
    with pytest.raises(lm.UnsupportedAdapterError, match="pissa_niter_4") as info:
        lm.merge([a, lm.load(make_adapter(tmp_path / "b", seed=2))])
    assert info.value.file == str(src)


def test_saved_folder_is_readable_like_any_new_folder(same_rank, tmp_path):
    lm.load(same_rank[0]).save(tmp_path / "out")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask


def test_energy_alone_is_not_capped_by_the_default_rank(tmp_path):
    from pathlib import Path
    ex = Path(__file__).resolve().parents[1] / "examples" / "adapters"
    adapters = [lm.load(ex / n) for n in ("addition", "subtraction", "intent")]
    merged = lm.merge(adapters, [1.0, 1.0, 1.0], "svd", energy=0.99)
    exact = lm.merge(adapters, [1.0, 1.0, 1.0], "sum")
    assert max(w.rank for w in merged.modules.values()) > 8
    assert merged.provenance["params"]["rank"] is None
    for m in list(merged.modules)[:6]:
        s = torch.linalg.svdvals(exact.delta(m, torch.float64))
        k = merged.modules[m].rank
        assert (s[:k] ** 2).sum() / (s ** 2).sum() >= 0.99 - 1e-9


def test_float16_overflow_is_caught_before_writing(tmp_path):
    from pathlib import Path
    a = lm.load(Path(__file__).resolve().parents[1] / "examples" / "adapters" / "addition")
    (1e7 * a).save(tmp_path / "fine")                    # the split sqrt(|c s|) keeps this in float16 range
    assert lm.load(tmp_path / "fine")
    with pytest.raises(lm.NonFiniteError, match="float16"):
        (1e14 * a).save(tmp_path / "big")
    assert not (tmp_path / "big").exists()
    (1e14 * a).save(tmp_path / "big32", dtype="float32")
