"""Every PEFT combination type: our merge equals PEFT 0.21's add_weighted_adapter, module by module,
and our saved folder, loaded by PeftModel.from_pretrained, gives PEFT's own logits."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import lora_layers, peft_with, rel, tiny_llama

import lora_merge as lm

WEIGHTS = [0.7, 0.5, -0.3]
FACTOR = ["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"]
DENSE_AND_EXACT = ["cat", "svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd"]


def _peft_kwargs(method: str) -> dict:
    if method in ("linear", "cat", "svd"):
        return {}
    density = 1.0 if method.startswith("dare") else 0.5   # DARE is random: compared at density 1 exactly
    return {"density": density}


def _peft_delta(layer, name: str) -> torch.Tensor:
    """PEFT's delta in our orientation (B @ A: an embedding's update transposed)."""
    d = layer.get_delta_weight(name)
    return d.T if name in layer.lora_embedding_A else d


def _check(paths, method: str, tmp_path, majority: str = "total"):
    model = peft_with(paths)
    kwargs = _peft_kwargs(method)
    if "ties" in method:
        kwargs["majority_sign_method"] = majority
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.add_weighted_adapter(["a", "b", "c"], WEIGHTS, "m", combination_type=method, **kwargs)
    ours = lm.merge([lm.load(p) for p in paths], WEIGHTS, method, **kwargs)

    layers = lora_layers(model)
    merged_paths = {p for p, layer in layers.items() if "m" in layer.lora_A or "m" in layer.lora_embedding_A}
    assert merged_paths == set(ours.modules)
    for path in sorted(merged_paths):
        layer = layers[path]
        peft_delta = _peft_delta(layer, "m")
        assert rel(ours.delta(path), peft_delta) < 1e-5, (method, path)

    # our folder, loaded by PEFT, gives the logits of PEFT's own merged adapter
    out = tmp_path / method
    ours.save(out)
    from peft import PeftModel
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = PeftModel.from_pretrained(tiny_llama(), str(out)).eval()
    model.set_adapter("m")
    x = torch.arange(12).reshape(2, 6)
    with torch.no_grad():
        expected, got = model(x).logits, reloaded(x).logits
    assert rel(got, expected) < 1e-5


@pytest.mark.parametrize("method", FACTOR)
def test_factor_methods_match_peft(same_rank, method, tmp_path):
    _check(same_rank, method, tmp_path)


@pytest.mark.parametrize("method", ["ties", "ties_svd", "dare_ties"])
def test_frequency_sign_election_matches_peft(same_rank, method, tmp_path):
    _check(same_rank, method, tmp_path, majority="frequency")


@pytest.mark.parametrize("method", DENSE_AND_EXACT)
def test_dense_and_exact_methods_match_peft_with_mixed_ranks(mixed_rank, method, tmp_path):
    _check(mixed_rank, method, tmp_path)


@pytest.mark.parametrize("method", ["svd", "ties_svd", "magnitude_prune_svd"])
def test_explicit_rank_matches_peft_svd_rank(mixed_rank, method):
    model = peft_with(mixed_rank)
    kwargs = _peft_kwargs(method)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.add_weighted_adapter(["a", "b", "c"], WEIGHTS, "m", combination_type=method, svd_rank=5, **kwargs)
    ours = lm.merge([lm.load(p) for p in mixed_rank], WEIGHTS, method, rank=5, **kwargs)
    checked = 0
    for path, layer in lora_layers(model).items():
        if "m" in layer.lora_A or "m" in layer.lora_embedding_A:
            assert ours.modules[path].rank == 5
            assert rel(ours.delta(path), _peft_delta(layer, "m")) < 1e-5, path
            checked += 1
    assert checked == len(ours.modules) and any(w.embedding for w in ours.modules.values())
