"""The real SmolLM2-135M adapters of ../shared (skipped where that folder is absent), and the example
adapters that ship with the repository: load, merge (svd, rank 8), save, and check against float64."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import SHARED_ADAPTERS, rel

import lora_merge as lm

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "adapters"
SHARED = ["arithmetic__2_digit_addition", "intent_recognition", "social_iqa"]


def _check_svd_merge(paths, tmp_path):
    adapters = [lm.load(p) for p in paths]
    weights = [0.5, 0.3, -0.2]
    merged = lm.merge(adapters, weights, "svd", rank=8)
    merged.save(tmp_path / "svd8")
    back = lm.load(tmp_path / "svd8")
    assert set(back.modules) == set(adapters[0].modules)
    # computed in float32: within float32 rounding of the float64 optimum; stored: within the storage dtype's
    stored_tol = 1e-5 if adapters[0].dtype == torch.float32 else 1e-3
    for m, w in back.modules.items():
        exact = sum(c * a.modules[m].scale * (a.modules[m].B.double() @ a.modules[m].A.double())
                    for a, c in zip(adapters, weights))
        U, S, Vh = torch.linalg.svd(exact, full_matrices=False)
        best = (U[:, :8] * S[:8]) @ Vh[:8]
        assert w.rank == 8
        assert rel(merged.delta(m, torch.float64), best) < 1e-5, m
        assert rel(w.delta(torch.float64), best) < stored_tol, m
    return back


@pytest.mark.skipif(not SHARED_ADAPTERS.exists(), reason="../shared/adapters/smollm2-135m is not here")
def test_shared_adapters_svd_merge_matches_float64(tmp_path):
    back = _check_svd_merge([SHARED_ADAPTERS / t for t in SHARED], tmp_path)
    assert back.modules["model.layers.0.self_attn.q_proj"].A.dtype == torch.float32
    assert back.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_example_adapters_keep_their_dtype(tmp_path):
    back = _check_svd_merge([EXAMPLES / n for n in ("addition", "subtraction", "intent")], tmp_path)
    assert back.modules["model.layers.0.self_attn.q_proj"].A.dtype == torch.float16
    assert {w.rank for w in back.modules.values()} == {8}


def test_save_load_round_trip_keeps_everything(tmp_path):
    a = lm.load(EXAMPLES / "addition")
    a.save(tmp_path / "copy")
    b = lm.load(tmp_path / "copy")
    for m, w in a.modules.items():
        assert torch.equal(w.A, b.modules[m].A) and torch.equal(w.B, b.modules[m].B)
        assert w.scale == b.modules[m].scale
    a.save(tmp_path / "bf16", dtype="bfloat16")
    assert lm.load(tmp_path / "bf16").modules["model.layers.0.self_attn.q_proj"].A.dtype == torch.bfloat16


def test_model_card_records_inputs_weights_and_method(tmp_path):
    adapters = [lm.load(EXAMPLES / n) for n in ("addition", "intent")]
    lm.merge(adapters, [0.7, -0.2], "ties", density=0.4).save(tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card and "library_name: peft" in card
    assert "- ties" in card and "base_model:adapter:HuggingFaceTB/SmolLM2-135M-Instruct" in card
    assert "| addition | 0.7 |" in card and "| intent | -0.2 |" in card
    assert adapters[0].files["adapter_model.safetensors"][:16] in card
    assert '"density": 0.4' in card
