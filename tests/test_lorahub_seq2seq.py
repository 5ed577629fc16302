"""LoraHub on an encoder-decoder model (the original's FLAN-T5 case), on a tiny random T5: the few-shot loss is
the model's own seq2seq loss (its own decoder shift, its own end-of-sequence token), a population scored in one
batch equals candidates scored one at a time, the composition equals the merged adapter loaded in PEFT, and a
search from a saved model folder loads it as a seq2seq model."""

from __future__ import annotations

import warnings

import pytest
import torch

import lora_merge as lm
from lora_merge.lorahub import Example, FewShotLoss, search
from lora_merge.model import Composition

WORDS = [f"w{i}" for i in range(40)]


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def tiny_t5(seed: int = 0):
    from transformers import T5Config, T5ForConditionalGeneration
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=len(WORDS) + 3, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2,
                   num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return T5ForConditionalGeneration(cfg).eval()


def make_adapter(path, seed: int):
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], init_lora_weights=False, lora_dropout=0.0,
                        task_type="SEQ_2_SEQ_LM")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(tiny_t5(), config)
        with torch.no_grad():                 # updates large enough to move the loss
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.mul_(3)
        model.save_pretrained(str(path))
    return lm.load(path, name=path.name)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("t5")
    return [make_adapter(root / f"a{i}", seed=10 + i) for i in range(3)]


# targets of different lengths, so the decoder side is padded
FEW = [Example("w1 w2 w3", "w4"), Example("w5 w6", "w7 w8 w9"), Example("w10 w11 w12 w13", "w14 w15")]


def reference_loss(model, tok, examples=FEW) -> float:
    """transformers' own seq2seq loss: mean token cross-entropy, its own decoder shift."""
    enc = tok([e.prompt for e in examples], padding=True, return_tensors="pt")
    labels = tok([e.target for e in examples], padding=True, return_tensors="pt")["input_ids"]
    labels[labels == tok.pad_token_id] = -100
    with torch.no_grad():
        return float(model(**enc, labels=labels).loss)


def test_loss_is_the_models_own_seq2seq_loss(adapters):
    model, tok = tiny_t5(), tokenizer()
    comp = Composition(model, adapters, "factor")
    loss = FewShotLoss(model, tok, FEW, comp)(torch.zeros(1, 3))
    comp.detach()
    assert loss.shape == (1,)
    assert abs(float(loss[0]) - reference_loss(model, tok)) < 1e-5


def test_population_in_one_batch_equals_one_at_a_time(adapters):
    model, tok = tiny_t5(), tokenizer()
    W = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.3, -0.7, 1.2], [-1.5, 1.5, 0.4], [0.2, 0.2, 0.2]])
    for mode in ("factor", "delta"):
        comp = Composition(model, adapters, mode)
        scorer = FewShotLoss(model, tok, FEW, comp)
        together = scorer(W)
        alone = torch.cat([scorer(w[None]) for w in W])
        comp.detach()
        assert torch.allclose(together, alone, atol=1e-5, rtol=0), mode
        assert together.unique().numel() == len(W), "the candidates must give different losses"


@pytest.mark.parametrize("mode,method", [("factor", "lorahub_factor"), ("delta", "sum")])
def test_composition_is_the_merged_adapter_in_peft(adapters, tmp_path, mode, method):
    from peft import PeftModel
    model, tok = tiny_t5(), tokenizer()
    w = [0.6, -0.4, 1.1]
    comp = Composition(model, adapters, mode)
    ours = float(FewShotLoss(model, tok, FEW, comp)(torch.tensor([w]))[0])
    comp.detach()
    lm.merge(adapters, w, method).save(tmp_path / "merged")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = PeftModel.from_pretrained(tiny_t5(), str(tmp_path / "merged")).eval()
    theirs = reference_loss(peft, tok)
    assert abs(ours - theirs) < 1e-5
    assert abs(theirs - reference_loss(tiny_t5(), tok)) > 1e-3, "the merged update must change the loss"


def test_search_from_a_saved_seq2seq_model(adapters, tmp_path):
    tiny_t5().save_pretrained(tmp_path / "base")
    tokenizer().save_pretrained(tmp_path / "base")
    first = search(tmp_path / "base", adapters, FEW, budget=9, seed=3)
    again = search(tmp_path / "base", adapters, FEW, budget=9, seed=3)
    assert first.weights == again.weights
    assert len(first.history) == 9
    assert first.history[0]["weights"] == [0.0, 0.0, 0.0]
    assert abs(first.base_loss - reference_loss(tiny_t5(), tokenizer())) < 1e-5
    assert first.objective <= first.history[0]["objective"]
    assert first.adapter.provenance["lorahub"]["settings"]["base_model"] is not None
