"""Where PEFT 0.21's add_weighted_adapter is silently wrong, we are right: checked against the float64 formula
and against PEFT applying our saved folder (issues huggingface/peft#3761, #3737)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from conftest import lora_layers, make_adapter, peft_with, rel, tiny_llama

import lora_merge as lm

X = torch.arange(12).reshape(2, 6)


def _reload(path):
    from peft import PeftModel
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(tiny_llama(), str(path)).eval()


def _applied_deltas(path):
    """What PEFT applies when it loads the folder at `path`: module -> delta (our orientation)."""
    return {m: (layer.get_delta_weight("default").T if layer.lora_embedding_A else layer.get_delta_weight("default"))
            for m, layer in lora_layers(_reload(path)).items()}


def _exact_formula(adapters, weights, module):
    out = 0
    for a, c in zip(adapters, weights):
        if module in a.modules:
            w = a.modules[module]
            out = out + c * w.scale * (w.B.double() @ w.A.double())
    return out


@pytest.fixture(scope="module")
def rslora(adapter_dir):
    return [make_adapter(adapter_dir / "rs4", r=4, alpha=8, seed=11, use_rslora=True),
            make_adapter(adapter_dir / "rs8", r=8, alpha=8, seed=12, use_rslora=True)]


def test_rslora_scale_is_read_as_peft_applies_it(rslora):
    a = lm.load(rslora[1])
    assert a.modules["model.layers.0.self_attn.q_proj"].scale == pytest.approx(8 / math.sqrt(8))


@pytest.mark.parametrize("method", ["cat", "svd", "sum"])
def test_rslora_merge_is_right_where_peft_is_not(rslora, method, tmp_path):
    adapters = [lm.load(p) for p in rslora]
    weights = [0.8, -0.5]
    ours = lm.merge(adapters, weights, method, **({"rank": 12} if method == "svd" else {}))
    ours.save(tmp_path / "out")
    applied = _applied_deltas(tmp_path / "out")
    for m in ours.modules:
        expected = _exact_formula(adapters, weights, m)
        assert rel(ours.delta(m), expected) < 1e-5
        assert rel(applied[m], expected) < 1e-5             # PEFT applies exactly what we computed

    if method in ("cat", "svd"):                            # PEFT's own result is sqrt(new_rank) too large
        model = peft_with(rslora, names=("a", "b"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.add_weighted_adapter(["a", "b"], weights, "m", combination_type=method, svd_rank=12)
        layer = lora_layers(model)["model.layers.0.self_attn.q_proj"]
        expected = _exact_formula(adapters, weights, "model.layers.0.self_attn.q_proj")
        assert rel(layer.get_delta_weight("m"), expected) > 0.5


@pytest.fixture(scope="module")
def patterned(adapter_dir):
    """Per-module ranks and alphas through rank_pattern / alpha_pattern."""
    kw = dict(targets=("q_proj", "v_proj", "o_proj"), rank_pattern={"q_proj": 8}, alpha_pattern={"v_proj": 32})
    return [make_adapter(adapter_dir / "pat1", r=4, alpha=8, seed=21, **kw),
            make_adapter(adapter_dir / "pat2", r=4, alpha=2, seed=22, **kw)]


def test_patterns_are_read_per_module(patterned):
    a = lm.load(patterned[0])
    q, v, o = (a.modules[f"model.layers.0.self_attn.{p}"] for p in ("q_proj", "v_proj", "o_proj"))
    assert (q.rank, q.scale) == (8, 1.0)
    assert (v.rank, v.scale) == (4, 8.0)
    assert (o.rank, o.scale) == (4, 2.0)


@pytest.mark.parametrize("method", ["linear", "ties", "magnitude_prune"])
def test_factor_merge_of_patterned_adapters_reloads_and_is_right(patterned, method, tmp_path):
    """PEFT writes rank_pattern={} here, so its merged folder cannot be reloaded (#3737); ours can."""
    adapters = [lm.load(p) for p in patterned]
    weights = [0.6, 0.9]
    kwargs = {} if method == "linear" else {"density": 0.5}
    ours = lm.merge(adapters, weights, method, **kwargs)
    ours.save(tmp_path / "out")
    applied = _applied_deltas(tmp_path / "out")
    for m, w in ours.modules.items():
        assert rel(applied[m], ours.delta(m)) < 1e-6
        assert w.rank == (8 if m.endswith("q_proj") else 4)
    if method == "linear":  # the paper's / PEFT's factor-wise formula, in float64
        for m in ours.modules:
            s = [math.sqrt(abs(c * a.modules[m].scale)) for a, c in zip(adapters, weights)]
            A = sum(si * a.modules[m].A.double() for si, a in zip(s, adapters))
            B = sum(si * a.modules[m].B.double() for si, a in zip(s, adapters))
            assert rel(ours.delta(m), B @ A) < 1e-6


def test_exact_merge_of_patterned_adapters(patterned, tmp_path):
    adapters = [lm.load(p) for p in patterned]
    ours = lm.merge(adapters, [1.0, -2.0], "sum")
    ours.save(tmp_path / "out")
    applied = _applied_deltas(tmp_path / "out")
    for m in ours.modules:
        assert rel(applied[m], _exact_formula(adapters, [1.0, -2.0], m)) < 1e-5


@pytest.mark.parametrize("kwargs", [{}, {"use_rslora": True}, {"lora_bias": True},
                                    {"rank_pattern": {"v_proj": 6}, "alpha_pattern": {"q_proj": 3}}],
                         ids=["plain", "rslora", "lora_bias", "patterns"])
def test_identity_merge_gives_back_the_adapter(adapter_dir, kwargs, tmp_path):
    """Combining one adapter with weight 1.0 must give that adapter back (PEFT fails this for rsLoRA and
    lora_bias, #3761). Checked on the logits PEFT computes with each folder."""
    src = make_adapter(tmp_path / "src", r=4, alpha=8, seed=31, **kwargs)
    ours = lm.merge([lm.load(src)], [1.0], "sum")
    ours.save(tmp_path / "out")
    with torch.no_grad():
        expected = _reload(src)(X).logits
        got = _reload(tmp_path / "out")(X).logits
    assert rel(got, expected) < 1e-5


def test_lora_bias_is_refused_by_factor_methods(adapter_dir, tmp_path):
    src = make_adapter(tmp_path / "b", r=4, alpha=8, seed=32, lora_bias=True)
    with pytest.raises(lm.UnsupportedAdapterError, match="lora_bias"):
        lm.merge([lm.load(src), lm.load(src, name="again")], [0.5, 0.5], "linear")
