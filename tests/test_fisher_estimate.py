"""The Fisher estimate (`lora_merge.fisher`) against what it must equal: a closed form (a LoRA on the output layer
scored on single-token options), a brute-force float64 reference (PEFT, autograd one sequence at a time, on the
LoRA parameters and on the layer's weight), the mean of single-example estimates, and its files read back."""

from __future__ import annotations

import hashlib
import json
import random

import pytest
import torch
from conftest import lora_layers, make_adapter, tiny_llama
from safetensors import safe_open
from test_lorahub import WORDS, tokenizer
from test_lorahub_seq2seq import tiny_t5

import lora_merge as lm
from lora_merge import fisher, stfile
from lora_merge.lorahub import PROMPT, Example

SEED = 3
NEW_TOKENS = 3
EOS = {2}               # the tiny Llama's eos_token_id ("Answer:" in the test tokenizer): sampling stops after it


def base():
    """The tiny Llama with a larger output layer, so that the model's distributions are far from uniform."""
    model = tiny_llama()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    return model


def rows(n: int = 6, seed: int = 0) -> list[Example]:
    """Multiple-choice rows (options of 1-3 words, 2-4 of them) and free-text rows, of different lengths."""
    rng = random.Random(seed)

    def words(k):
        return " ".join(rng.choice(WORDS) for _ in range(k))
    out = []
    for i in range(n):
        prompt = words(rng.randint(1, 5))
        if i % 2 == 0:
            options = [words(rng.randint(1, 3)) for _ in range(rng.randint(2, 4))]
            answer = rng.randrange(len(options))
            out.append(Example(prompt, options[answer], options, answer))
        else:
            out.append(Example(prompt, words(rng.randint(1, 3))))
    return out


@pytest.fixture(scope="module")
def adapter_path(tmp_path_factory):
    return make_adapter(tmp_path_factory.mktemp("fisher") / "qv", r=4, alpha=8, targets=("q_proj", "v_proj"), seed=2)


def estimate(adapter, data, **kw):
    kw = {"tokenizer": tokenizer(), "device": "cpu", "seed": SEED, "max_new_tokens": NEW_TOKENS, **kw}
    return lm.fisher.estimate(base(), adapter, data, **kw)


def worst(est: fisher.Fisher, ref: dict[str, dict[str, torch.Tensor]]) -> float:
    """The largest error of any module's tensor, relative to that tensor's largest value."""
    assert est.tensors.keys() == ref.keys()
    return max(float((est.tensors[m][k].double() - r).abs().max() / r.abs().max())
               for m in ref for k, r in ref[m].items())


# ---- the brute-force reference: PEFT in float64, autograd one sequence at a time ------------------------------
class Reference:
    """Per-sequence gradients of log p(y|x) w.r.t. lora_A, lora_B and the layer's weight (= the update W)."""

    def __init__(self, path):
        from peft import PeftModel
        self.model = PeftModel.from_pretrained(base(), str(path)).double().eval()
        self.params = {}
        for module, layer in lora_layers(self.model).items():
            slots = {"A": layer.lora_A["default"].weight, "B": layer.lora_B["default"].weight,
                     "delta": layer.base_layer.weight}
            for t in slots.values():
                t.requires_grad_(True)
            self.params[module] = (slots, layer.scaling["default"])
        self.tok = tokenizer()

    def encode(self, ex: Example):
        return (self.tok(PROMPT.format(input=ex.prompt))["input_ids"],
                lambda text: self.tok(" " + text, add_special_tokens=False)["input_ids"])

    def grad(self, prompt: list[int], target: list[int]):
        """(l_y, {module: {slot: gradient}}) for one sequence, no padding."""
        logp = self.model(input_ids=torch.tensor([prompt + target])).logits[0, :-1].log_softmax(-1)
        ll = logp[torch.arange(len(prompt) - 1, len(prompt) + len(target) - 1), torch.tensor(target)].sum()
        flat = [t for slots, _ in self.params.values() for t in slots.values()]
        grads = iter(torch.autograd.grad(ll, flat))
        out = {m: {k: next(grads) for k in slots} for m, (slots, _) in self.params.items()}
        for m, (slots, s) in self.params.items():      # the chain rule: the factors' gradients from W's
            g, A, B = out[m]["delta"], slots["A"].detach(), slots["B"].detach()
            assert torch.allclose(out[m]["B"], s * g @ A.T, atol=1e-12)
            assert torch.allclose(out[m]["A"], s * B.T @ g, atol=1e-12)
        return float(ll.detach()), out

    def example(self, ex: Example, index: int, kind: str) -> list[tuple[float, dict]]:
        """(weight, centred gradient) pairs whose weighted squares make the example's Fisher."""
        prompt, encode = self.encode(ex)
        if ex.options is None:
            y = encode(ex.target) if kind == "empirical" else \
                fisher._sample(self.model, prompt, fisher._generator(SEED, index), NEW_TOKENS, EOS)
            return [(1.0, self.grad(prompt, y)[1])]
        scored = [self.grad(prompt, encode(o)) for o in ex.options]
        p = torch.tensor([ll for ll, _ in scored], dtype=torch.float64).softmax(0)
        gbar = {m: {k: sum(pj * g[m][k] for pj, (_, g) in zip(p, scored)) for k in d} for m, d in scored[0][1].items()}
        centred = [{m: {k: g[m][k] - gbar[m][k] for k in d} for m, d in g.items()} for _, g in scored]
        if kind == "expected":
            return list(zip(p.tolist(), centred))
        y = ex.answer if kind == "empirical" else \
            int(torch.multinomial(p.float(), 1, generator=fisher._generator(SEED, index)))
        return [(1.0, centred[y])]

    def fisher(self, examples: list[Example], kind: str, space: str) -> dict[str, dict[str, torch.Tensor]]:
        slots = ("A", "B") if space == "factor" else ("delta",)
        total = {m: {k: 0.0 for k in slots} for m in self.params}
        for i, ex in enumerate(examples):
            for c, g in self.example(ex, i, kind):
                for m in total:
                    for k in slots:
                        total[m][k] = total[m][k] + c * g[m][k].square()
        return {m: {k: v / len(examples) for k, v in d.items()} for m, d in total.items()}


@pytest.fixture(scope="module")
def reference(adapter_path):
    return Reference(adapter_path)


@pytest.mark.parametrize("kind", fisher.KINDS)
@pytest.mark.parametrize("space", fisher.SPACES)
def test_the_estimate_is_the_brute_force_fisher(adapter_path, reference, kind, space):
    data = rows(6)
    est = estimate(lm.load(adapter_path), data, kind=kind, space=space, batch_size=4)
    assert worst(est, reference.fisher(data, kind, space)) < 1e-5


def test_the_closed_form_of_a_lora_on_the_output_layer(tmp_path):
    """Single-token options scored at the last prompt token, the LoRA on lm_head: z = (W + s B A) h, p~ is the
    softmax of z over the options, and ∇_W log p~(y) = (e_y - p~) hᵀ on the options' rows."""
    path = make_adapter(tmp_path / "head", r=3, alpha=6, targets=("lm_head",), seed=5)
    adapter = lm.load(path)
    w = adapter.modules["lm_head"]
    tok, rng = tokenizer(), random.Random(1)
    data = []
    for _ in range(5):
        options = rng.sample(WORDS, rng.randint(2, 5))
        data.append(Example(" ".join(rng.sample(WORDS, 3)), options[0], options, rng.randrange(len(options))))
    model, seen = base().double(), []
    model.lm_head.register_forward_hook(lambda mod, args, out: seen.append(args[0][0, -1]))
    W = model.lm_head.weight.detach() + w.scale * w.B.double() @ w.A.double()
    expected, empirical = torch.zeros_like(W), torch.zeros_like(W)
    factor = {kind: {"A": 0.0, "B": 0.0} for kind in ("expected", "empirical")}
    for ex in data:
        with torch.no_grad():
            model(input_ids=torch.tensor([tok(PROMPT.format(input=ex.prompt))["input_ids"]]))
        h = seen.pop()
        ids = torch.tensor([tok.convert_tokens_to_ids(o) for o in ex.options])
        p = (W[ids] @ h).softmax(0)
        for kind, weights in (("expected", p), ("empirical", torch.eye(len(ids))[ex.answer].double())):
            for y, c in enumerate(weights):
                G = torch.zeros_like(W)
                G[ids] = torch.outer(torch.eye(len(ids))[y].double() - p, h)
                (expected if kind == "expected" else empirical).add_(c * G.square())
                factor[kind]["B"] = factor[kind]["B"] + c * (w.scale * G @ w.A.double().T).square()
                factor[kind]["A"] = factor[kind]["A"] + c * (w.scale * w.B.double().T @ G).square()
    n = len(data)
    for kind, dense in (("expected", expected), ("empirical", empirical)):
        assert worst(estimate(adapter, data, kind=kind, space="delta"), {"lm_head": {"delta": dense / n}}) < 1e-5
        want = {"lm_head": {k: v / n for k, v in factor[kind].items()}}
        assert worst(estimate(adapter, data, kind=kind, space="factor"), want) < 1e-5


def test_the_fisher_of_n_examples_is_the_mean_of_single_example_fishers(adapter_path, reference):
    adapter, data = lm.load(adapter_path), rows(5, seed=4)
    whole = estimate(adapter, data, kind="empirical", batch_size=5)
    singles = [estimate(adapter, [ex], kind="empirical") for ex in data]
    mean = {m: {k: sum(f.tensors[m][k] for f in singles) / len(data) for k in d} for m, d in whole.tensors.items()}
    assert worst(whole, mean) < 1e-5
    # not the square of the mean gradient (the per-example gradients, centred for the multiple-choice rows)
    grads = [reference.example(ex, i, "empirical")[0][1] for i, ex in enumerate(data)]
    batch = {m: {k: (sum(g[m][k] for g in grads) / len(data)).square() for k in d} for m, d in whole.tensors.items()}
    assert worst(whole, batch) > 0.1


@pytest.mark.parametrize("kind", fisher.KINDS)
def test_padding_and_batch_size_change_nothing(adapter_path, kind):
    adapter, data = lm.load(adapter_path), rows(7, seed=9)
    one = estimate(adapter, data, kind=kind, batch_size=1)
    for batch_size in (3, len(data)):
        assert worst(estimate(adapter, data, kind=kind, batch_size=batch_size), one.tensors) < 1e-5


def test_sampling_is_seeded_and_stops_after_eos(adapter_path):
    adapter, data = lm.load(adapter_path), [ex for ex in rows(6) if ex.options is None]
    a, b = (estimate(adapter, data, kind="sampled", seed=1) for _ in range(2))
    c = estimate(adapter, data, kind="sampled", seed=2)
    assert worst(a, b.tensors) == 0 and worst(a, c.tensors) > 1e-3
    gen = fisher._generator(0, 0)
    assert len(fisher._sample(base(), [3, 4, 2], gen, 5, set(range(64)))) == 1    # every token ends it


def test_save_and_load(adapter_path, tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"input": e.prompt, "options": e.options, "answer": e.answer} if e.options
                                       else {"input": e.prompt, "output": e.target}) + "\n" for e in rows(4)))
    assert [(e.options, e.answer) for e in lm.lorahub.read_examples(data)] == [(e.options, e.answer) for e in rows(4)]
    est = estimate(adapter_path, data, gram=True, kind="empirical")
    out = est.save(tmp_path / "f.safetensors", gram_path=tmp_path / "g.safetensors")
    with safe_open(str(adapter_path / "adapter_model.safetensors"), "pt") as f:
        want = {k: f.get_slice(k).get_shape() for k in f.keys()}
    with safe_open(str(out), "pt") as f:
        assert {k: f.get_slice(k).get_shape() for k in f.keys()} == want
        meta = f.metadata()
    assert meta["data_sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    assert {k: meta[k] for k in ("kind", "space", "n_examples", "seed", "prompt_template", "base_model", "adapter")} \
        == {"kind": "empirical", "space": "factor", "n_examples": "4", "seed": str(SEED), "prompt_template": PROMPT,
            "base_model": "tiny-llama", "adapter": "qv"}
    assert meta["lora_merge_version"] == lm.__version__ and meta["adapter_source"] == str(adapter_path)
    back = fisher.Fisher.load(out, gram_path=tmp_path / "g.safetensors")
    assert back.space == "factor" and back.meta == est.meta and worst(back, est.tensors) == 0
    assert all(torch.equal(back.gram[m], est.gram[m]) for m in est.gram)

    with pytest.raises(lm.OutputExistsError, match="f.safetensors: already exists"):
        est.save(out, gram_path=tmp_path / "other.safetensors")
    assert not (tmp_path / "other.safetensors").exists()          # nothing written when one file is refused
    est.save(out, force=True, gram_path=tmp_path / "g.safetensors")

    delta = estimate(adapter_path, data, space="delta", kind="empirical")
    path = delta.save(tmp_path / "d.safetensors")
    assert sorted(fisher.Fisher.load(path).tensors) == sorted(est.tensors)
    key = "base_model.model.model.layers.1.self_attn.v_proj.delta.weight"
    for value, error, words in ((float("nan"), lm.NonFiniteError, "NaN"), (-1.0, lm.AdapterLoadError, "negative")):
        tensors = {f"base_model.model.{m}.delta.weight": t["delta"].clone() for m, t in delta.tensors.items()}
        tensors[key][0, 1] = value
        bad = tmp_path / "bad.safetensors"
        stfile.write(bad, tensors, delta.meta)
        with pytest.raises(error, match=f"bad.safetensors: {key} holds {words}"):
            fisher.Fisher.load(bad)


def test_the_gram_is_the_inputs_gram(adapter_path, reference):
    """XᵀX over every example's prompt + data answer (sampled free-text rows add a row for it), as PEFT sees X."""
    data = rows(5, seed=2)
    est = estimate(lm.load(adapter_path), data, kind="sampled", gram=True, batch_size=2)
    seen = {}
    hooks = [layer.register_forward_hook(lambda mod, args, out, m=m: seen.__setitem__(m, args[0][0]))
             for m, layer in lora_layers(reference.model).items()]
    want, tokens = {}, 0
    with torch.no_grad():
        for ex in data:
            prompt, encode = reference.encode(ex)
            ids = prompt + encode(ex.target)
            tokens += len(ids)
            reference.model(input_ids=torch.tensor([ids]))
            for m, X in seen.items():
                want[m] = want.get(m, 0) + X.T @ X
    for h in hooks:
        h.remove()
    assert est.meta["gram_tokens"] == str(tokens)
    assert max(float((est.gram[m].double() - want[m]).abs().max() / want[m].abs().max()) for m in want) < 1e-5


def test_many_adapters_on_one_model_and_the_model_is_restored(adapter_path, tmp_path):
    other = make_adapter(tmp_path / "other", r=2, alpha=4, targets=("v_proj", "o_proj"), seed=7)
    model, ids = base(), torch.tensor([[3, 4, 5, 2, 9]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    calls = []
    many = lm.fisher.estimate_many(model, [adapter_path, other], [rows(6), rows(3, seed=1)], tokenizer=tokenizer(),
                                   device="cpu", seed=SEED, max_new_tokens=NEW_TOKENS, batch_size=4,
                                   progress=lambda done, total: calls.append((done, total)))
    assert calls == [(4, 6), (6, 6), (3, 3)]
    for f, (path, data) in zip(many, ((adapter_path, rows(6)), (other, rows(3, seed=1)))):
        assert worst(f, estimate(path, data).tensors) < 1e-6 and f.meta["adapter_source"] == str(path)
    assert not any("Weighted" in type(m).__name__ for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)


def test_bad_arguments_are_clear_errors(adapter_path):
    with pytest.raises(lm.MethodError, match="unknown kind 'fisher'"):
        estimate(adapter_path, rows(2), kind="fisher")
    with pytest.raises(lm.MethodError, match="encoder-decoder"):
        lm.fisher.estimate(tiny_t5(), adapter_path, rows(2), tokenizer=tokenizer(), device="cpu")
    with pytest.raises(lm.LoraMergeError, match="example 1: answer 5"):
        estimate(adapter_path, [Example("w1", "w2", ["w2", "w3"], 5)])


def test_all_variants_from_one_pass_equal_their_own_estimates(adapter_path, reference):
    """`estimate_variants` shares the forward/backward pass: every (kind, space) equals `estimate` of it and the
    brute-force reference, and the Grams are those of a single estimate."""
    adapter, data = lm.load(adapter_path), rows(6, seed=5)
    kw = {"tokenizer": tokenizer(), "device": "cpu", "seed": SEED, "max_new_tokens": NEW_TOKENS, "batch_size": 4}
    variants = lm.fisher.estimate_variants(base(), adapter, data, gram=True, **kw)
    assert sorted(variants) == sorted((k, s) for k in fisher.KINDS for s in fisher.SPACES)
    gram = estimate(adapter, data, kind="empirical", gram=True, batch_size=4).gram
    for (kind, space), F in variants.items():
        assert (F.meta["kind"], F.meta["space"], F.space) == (kind, space, space)
        assert worst(F, estimate(adapter, data, kind=kind, space=space, batch_size=4).tensors) < 1e-6
        assert worst(F, reference.fisher(data, kind, space)) < 1e-5
        assert all(torch.allclose(F.gram[m], g, rtol=1e-6, atol=0) for m, g in gram.items())
    two = lm.fisher.estimate_variants(base(), adapter, data, kinds=("empirical",), spaces=("delta",), **kw)
    assert list(two) == [("empirical", "delta")]
    assert worst(two["empirical", "delta"], variants["empirical", "delta"].tensors) < 1e-6
    with pytest.raises(lm.MethodError, match="no kind given"):
        lm.fisher.estimate_variants(base(), adapter, data, kinds=(), **kw)
    with pytest.raises(lm.MethodError, match="unknown space 'dense'"):
        lm.fisher.estimate_variants(base(), adapter, data, spaces=("factor", "dense"), **kw)
