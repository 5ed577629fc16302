"""Fixtures: a tiny random Llama and PEFT adapters made with PEFT itself (random A and B)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

SHARED_ADAPTERS = Path(__file__).resolve().parents[2] / "shared" / "adapters" / "smollm2-135m"


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    cfg.name_or_path = "tiny-llama"
    return LlamaForCausalLM(cfg).eval()


def make_adapter(path: Path, *, r: int = 4, alpha: float = 8, targets=("q_proj", "v_proj"), seed: int = 1,
                 base_seed: int = 0, **kwargs) -> Path:
    """Save a PEFT LoRA with random (non-zero) A and B at `path`."""
    from peft import LoraConfig, get_peft_model
    model = tiny_llama(base_seed)
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False,
                        lora_dropout=0.0, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, config)
        peft_model.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def adapter_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("adapters")


@pytest.fixture(scope="session")
def same_rank(adapter_dir):
    """Three adapters of equal rank and different alphas (what PEFT's element-wise methods accept).
    The third targets down_proj instead of the embedding, so module sets differ."""
    return [
        make_adapter(adapter_dir / "a", r=4, alpha=8, targets=("q_proj", "v_proj", "embed_tokens"), seed=1),
        make_adapter(adapter_dir / "b", r=4, alpha=4, targets=("q_proj", "v_proj", "embed_tokens"), seed=2),
        make_adapter(adapter_dir / "c", r=4, alpha=16, targets=("q_proj", "v_proj", "down_proj"), seed=3),
    ]


@pytest.fixture(scope="session")
def mixed_rank(adapter_dir):
    """Three adapters of different ranks and alphas (what PEFT's cat and svd types accept)."""
    return [
        make_adapter(adapter_dir / "r4", r=4, alpha=8, targets=("q_proj", "v_proj", "embed_tokens"), seed=4),
        make_adapter(adapter_dir / "r6", r=6, alpha=3, targets=("q_proj", "v_proj", "embed_tokens"), seed=5),
        make_adapter(adapter_dir / "r8", r=8, alpha=32, targets=("q_proj", "v_proj", "down_proj"), seed=6),
    ]


def peft_with(paths, names=("a", "b", "c"), base_seed: int = 0):
    """A PeftModel holding the adapters at `paths` under `names`."""
    from peft import PeftModel
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(tiny_llama(base_seed), str(paths[0]), adapter_name=names[0])
        for p, n in zip(paths[1:], names[1:]):
            model.load_adapter(str(p), adapter_name=n)
    return model.eval()


def lora_layers(peft_model):
    """Module path (as lora-merge names it) -> PEFT LoraLayer."""
    from peft.tuners.lora import LoraLayer
    out = {}
    for name, module in peft_model.base_model.model.named_modules():
        if isinstance(module, LoraLayer):
            out[name] = module
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative difference ||a - b|| / ||b||, in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))
