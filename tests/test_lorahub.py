"""LoraHub's search on a tiny random Llama with adapters trained in the test on synthetic tasks whose answer is
known: the few-shot task is one of the adapters' tasks, so the search must find that adapter."""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from typer.testing import CliRunner

import lora_merge as lm
from lora_merge.cli import app
from lora_merge.lorahub import Example, FewShotLoss, read_examples, search
from lora_merge.model import Composition

WORDS = [f"w{i}" for i in range(60)]
TASKS = {"t10": "w10", "t20": "w20", "t30": "w30"}      # each task answers one fixed word, whatever the input


def base_model():
    """The tiny random Llama with a larger output layer: at the usual 0.02 init its logits cannot move enough
    for any adapter to learn an answer."""
    model = tiny_llama()
    with torch.no_grad():
        model.lm_head.weight.mul_(50)
    return model


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"[PAD]": 0, "[UNK]": 1, "Answer:": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


def examples(task: str, n: int, seed: int) -> list[Example]:
    rng = random.Random(seed)
    return [Example(" ".join(rng.choice(WORDS) for _ in range(3)), TASKS[task]) for _ in range(n)]


def train_adapter(path: Path, task: str, steps: int = 60) -> Path:
    """A PEFT LoRA trained for a few steps on `task` (with PEFT, on the tiny Llama)."""
    from peft import LoraConfig, get_peft_model
    tok = tokenizer()
    torch.manual_seed(0)
    model = get_peft_model(base_model(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"],
                                                    lora_dropout=0.0))
    data = examples(task, 64, seed=1)
    rows = [tok(f"{e.prompt}\nAnswer: {e.target}")["input_ids"] for e in data]
    ids = torch.tensor(rows)
    labels = torch.full_like(ids, -100)
    labels[:, -1] = ids[:, -1]
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    for _ in range(steps):
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def library(tmp_path_factory):
    root = tmp_path_factory.mktemp("library")
    return {task: train_adapter(root / task, task) for task in TASKS}


@pytest.fixture
def adapters(library):
    return [lm.load(p, name=t) for t, p in library.items()]


def test_the_search_finds_the_adapter_of_the_task(adapters):
    few = examples("t20", 5, seed=7)
    result = search(base_model(), adapters, few, tokenizer=tokenizer(), budget=40, seed=0, device="cpu")
    assert len(result.history) == 40 and result.history[0]["weights"] == [0.0, 0.0, 0.0]
    assert result.base_loss == result.history[0]["loss"]
    uniform = FewShotLoss(model := base_model(), tokenizer(), few, comp := Composition(model, adapters))(
        torch.full((1, 3), 1 / 3))[0]
    comp.detach()
    assert result.loss < float(uniform) < result.base_loss
    # t20's adapter weighs most (the factor composition's update is even in w: w and -w give the same one)
    assert max(range(3), key=lambda i: abs(result.weights[i])) == 1
    rec = result.adapter.provenance["lorahub"]
    assert rec["weights"] == dict(zip(TASKS, result.weights)) and len(rec["history"]) == 40


def test_the_same_seed_gives_the_same_weights(adapters):
    few = examples("t30", 4, seed=3)
    runs = [search(base_model(), adapters, few, tokenizer=tokenizer(), budget=12, seed=s, device="cpu").weights
            for s in (5, 5, 6)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


@pytest.mark.parametrize("mode", ["factor", "delta"])
def test_a_batched_population_scores_as_one_candidate_at_a_time(adapters, mode):
    model = base_model()
    comp = Composition(model, adapters, mode)
    loss = FewShotLoss(model, tokenizer(), examples("t10", 5, seed=2), comp)
    W = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.3, -0.7, 1.2], [-1.5, 1.5, 0.1], [0.5, 0.5, 0.5]])
    batched = loss(W)
    single = torch.stack([loss(w[None])[0] for w in W])
    assert (batched - single).abs().max() < 1e-5
    loss.chunk = 2                                            # chunked populations give the same losses
    assert (loss(W) - batched).abs().max() < 1e-5
    comp.detach()
    assert not any("Weighted" in type(m).__name__ for m in model.modules())


@pytest.mark.parametrize("mode", ["factor", "delta"])
def test_the_composition_is_the_adapter_that_is_saved(adapters, mode, tmp_path):
    """The model the search scores is the model PEFT builds from the saved result."""
    from peft import PeftModel
    w = [0.8, -0.4, 1.1]
    method = "lorahub_factor" if mode == "factor" else "sum"
    lm.merge(adapters, w, method).save(tmp_path / "out", dtype="float32")
    ids = torch.tensor([[3, 5, 9, 2, 12], [7, 8, 9, 10, 2]])
    model = base_model()
    comp = Composition(model, adapters, mode)
    comp.set_weights(w)
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        comp.detach()
        peft = PeftModel.from_pretrained(base_model(), str(tmp_path / "out")).eval()
        theirs = peft(input_ids=ids).logits
    assert (ours - theirs).abs().max() < 1e-5


def test_lorahub_factor_is_the_original_codes_update(adapters):
    """LoraHub's code sums lora_A and lora_B state dicts: update = s (sum w_i B_i)(sum w_i A_i), all s equal."""
    w = [0.6, -0.2, 0.9]
    m = "model.layers.1.self_attn.v_proj"
    x = [a.modules[m] for a in adapters]
    want = x[0].scale * (sum(c * y.B.double() for c, y in zip(w, x)) @ sum(c * y.A.double() for c, y in zip(w, x)))
    got = lm.merge(adapters, w, "lorahub_factor").delta(m, torch.float64)
    assert float((got - want).norm() / want.norm()) < 1e-6


def test_cobyla_keeps_the_budget_and_starts_at_zero(adapters):
    result = search(base_model(), adapters, examples("t20", 3, seed=1), tokenizer=tokenizer(), budget=15,
                    optimizer="cobyla", device="cpu")
    assert len(result.history) == 15 and result.history[0]["weights"] == [0.0, 0.0, 0.0]
    assert all(-1.5 <= x <= 1.5 for h in result.history for x in h["weights"])
    assert result.objective == min(h["objective"] for h in result.history) < result.history[0]["objective"]


def test_examples_in_both_forms_and_bad_rows(tmp_path):
    path = tmp_path / "few.jsonl"
    path.write_text('{"input": "a", "output": "b"}\n\n{"input": "c", "options": ["x", "y"], "answer": 1}\n')
    assert read_examples(path) == [Example("a", "b"), Example("c", "y")]
    path.write_text('{"input": "a", "output": "b"}\n{"input": "c", "options": ["x"], "answer": 3}\n')
    with pytest.raises(lm.LoraMergeError, match="few.jsonl, line 2: expected 'output'"):
        read_examples(path)
    path.write_text('{"input": "a", "output": "b"}\nnot json\n')
    with pytest.raises(lm.LoraMergeError, match="line 2: not valid JSON"):
        read_examples(path)


def test_bad_settings_are_clear_errors(adapters):
    with pytest.raises(lm.MethodError, match="unknown optimizer"):
        search(base_model(), adapters, examples("t10", 2, 0), tokenizer=tokenizer(), optimizer="adam")
    with pytest.raises(lm.MethodError, match="bounds must hold 0"):
        search(base_model(), adapters, examples("t10", 2, 0), tokenizer=tokenizer(), bounds=(0.5, 1.0))


@pytest.fixture(scope="session")
def base_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base") / "tiny-llama"
    base_model().save_pretrained(str(folder))
    tokenizer().save_pretrained(str(folder))
    return folder


def test_the_hub_command_and_a_recipe_write_the_adapter_and_its_search(library, base_folder, tmp_path):
    few = tmp_path / "few.jsonl"
    few.write_text("".join(json.dumps({"input": e.prompt, "output": e.target}) + "\n" for e in examples("t20", 5, 7)))
    out = tmp_path / "hub"
    r = CliRunner().invoke(app, [
        "hub", "--adapters", ",".join(str(p) for p in library.values()), "--base-model", str(base_folder),
        "--examples", str(few), "--budget", "12", "--seed", "1", "-o", str(out), "--json", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    record = json.loads((out / "lorahub.json").read_text())
    assert summary["weights"] == record["weights"] and len(record["history"]) == 12
    assert "LoraHub" in (out / "README.md").read_text()
    recipe = tmp_path / "hub.yaml"
    recipe.write_text(f"method: lorahub\nbase_model: {base_folder}\n"
                      f"parameters: {{examples: {few}, budget: 12}}\n"
                      f"inputs: [{', '.join(str(p) for p in library.values())}]\nseed: 1\n")
    adapter, folder = lm.run_recipe(lm.load_recipe(recipe), tmp_path / "from_recipe", device="cpu")
    assert json.loads((folder / "lorahub.json").read_text())["weights"] == record["weights"]
