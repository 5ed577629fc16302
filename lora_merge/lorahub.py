"""LoraHub (Huang et al., 2023, arXiv 2307.13269; code sail-sg/lorahub): find composition weights for K LoRAs
from a few examples of a new task, without gradients.

The objective, as in the original code: the few-shot cross-entropy of the composed model plus
`penalty * mean(|w_i|)`; weights bounded to [-1.5, 1.5]; the first evaluation is w = 0 (the bare base model);
budget 40 evaluations. The original searches with nevergrad's NGOpt, which for this bounded low-budget case
runs COBYLA (`optimizer="cobyla"` here, scipy's); the default here is CMA-ES (`cma`).

Unlike the original (FLAN-T5 only; model state rebuilt and reloaded for every candidate; one candidate at a
time), the base model is loaded once, candidate weights change a tensor (`lora_merge.model.Composition`), a
whole CMA-ES population is scored in one batched forward pass, and the examples are tokenised once.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .adapter import Adapter
from .errors import AdapterLoadError, LoraMergeError, MethodError
from .model import MODES, Composition

URL = "https://arxiv.org/abs/2307.13269"
OPTIMIZERS = ("cma", "cobyla")
PROMPT = "{input}\nAnswer:"     # the prompt of a causal LM; the target follows after a space


@dataclass
class Example:
    """One few-shot row. A multiple-choice row also keeps its `options` and the index of its `answer` (the
    target is then `options[answer]`); equality compares the prompt and the target only."""

    prompt: str
    target: str
    options: list[str] | None = field(default=None, compare=False)
    answer: int | None = field(default=None, compare=False)


def read_examples(path: str | os.PathLike, limit: int | None = None) -> list[Example]:
    """JSONL rows `{"input", "output"}` or multiple-choice `{"input", "options", "answer"}` (the answer's
    option is the target). Every bad row is named by its line."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise AdapterLoadError(f"{path}: cannot read the examples ({e})", file=str(path)) from None
    out: list[Example] = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise LoraMergeError(f"{path}, line {i}: not valid JSON ({e.msg})", file=str(path)) from None
        if not isinstance(row, dict) or not isinstance(row.get("input"), str):
            raise LoraMergeError(f"{path}, line {i}: expected an object with a string 'input'", file=str(path),
                                 key="input")
        options = answer = None
        if isinstance(row.get("output"), str):
            target = row["output"]
        elif isinstance(row.get("options"), list) and isinstance(row.get("answer"), int) \
                and 0 <= row["answer"] < len(row["options"]) and isinstance(row["options"][row["answer"]], str):
            options, answer = list(row["options"]), row["answer"]
            target = options[answer]
        else:
            raise LoraMergeError(f"{path}, line {i}: expected 'output' (a string), or 'options' (strings) and "
                                 "'answer' (an index into them)", file=str(path), key="output")
        out.append(Example(row["input"], target, options, answer))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise LoraMergeError(f"{path}: holds no examples", file=str(path))
    return out


class FewShotLoss:
    """The few-shot cross-entropy of a composed model, for a population of weightings at once.

    Tokenises once. `__call__(W)` with W of shape (P, K) returns the P mean token losses; candidates are
    scored in chunks whose logits stay under `max_logits` floats.
    """

    def __init__(self, model, tokenizer, examples: list[Example], composition: Composition,
                 max_logits: int = 2**27):
        self.model, self.composition = model, composition
        self.encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
        self.device = next(model.parameters()).device
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        rows, labels, enc = [], [], []
        for ex in examples:
            if self.encoder_decoder:
                enc.append(tokenizer(ex.prompt)["input_ids"])
                target = tokenizer(ex.target)["input_ids"]             # with the end-of-sequence token
                rows.append(target)
                labels.append(target)
            else:
                prompt = tokenizer(PROMPT.format(input=ex.prompt))["input_ids"]
                target = tokenizer(" " + ex.target, add_special_tokens=False)["input_ids"]
                if not target:
                    raise LoraMergeError(f"an example's target {ex.target!r} is empty once tokenised")
                rows.append(prompt + target)
                labels.append([-100] * len(prompt) + target)
        self.input_ids, self.attention = _pad(rows, pad)
        self.labels, _ = _pad(labels, -100)
        if self.encoder_decoder:
            self.enc_ids, self.enc_attention = _pad(enc, pad)
            start = model.config.decoder_start_token_id
            self.decoder_ids = torch.cat([torch.full((len(rows), 1), start), self.input_ids[:, :-1]], 1)
            self.decoder_ids[self.decoder_ids == -100] = pad
        for name in ("input_ids", "attention", "labels", "enc_ids", "enc_attention", "decoder_ids"):
            if hasattr(self, name):                   # tokenised once, moved to the model's device once
                setattr(self, name, getattr(self, name).to(self.device))
        self.E, self.T = self.input_ids.shape
        self.tokens = int((self.labels != -100).sum())
        vocab = model.get_output_embeddings().weight.shape[0]
        self.chunk = max(1, max_logits // (self.E * self.T * vocab))

    @torch.inference_mode()
    def __call__(self, weights) -> torch.Tensor:
        W = torch.as_tensor(weights, dtype=torch.float32).reshape(-1, self.composition.K)
        out = []
        for start in range(0, W.shape[0], self.chunk):
            w = W[start:start + self.chunk]
            self.composition.set_weights(w)
            out.append(self._losses(w.shape[0]))
        return torch.cat(out)

    def _losses(self, P: int) -> torch.Tensor:
        def rep(t):
            return t.repeat(P, 1)
        if self.encoder_decoder:
            logits = self.model(input_ids=rep(self.enc_ids), attention_mask=rep(self.enc_attention),
                                decoder_input_ids=rep(self.decoder_ids)).logits
            labels = rep(self.labels)
        else:
            logits = self.model(input_ids=rep(self.input_ids), attention_mask=rep(self.attention)).logits[:, :-1]
            labels = rep(self.labels)[:, 1:]
        ce = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                               ignore_index=-100, reduction="none").view(P, -1)
        return (ce.sum(1) / self.tokens).cpu()


def _pad(rows: list[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), value, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids, mask


@dataclass
class SearchResult:
    """The weights found, the composed adapter, and the loss at every evaluation."""

    weights: list[float]
    objective: float
    loss: float
    base_loss: float
    adapter: Adapter
    history: list[dict[str, Any]] = field(default_factory=list)   # one entry per evaluation
    settings: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | os.PathLike, *, force: bool = False, dtype=None) -> Path:
        """The composed adapter as a PEFT folder, with `lorahub.json` (weights, settings, loss per step)."""
        from .io import save
        return save(self.adapter, path, force=force, dtype=dtype,
                    extra_files={"lorahub.json": json.dumps(self.adapter.provenance["lorahub"], indent=2) + "\n"})


def search(base_model, adapters: list[Adapter], examples: list[Example] | str | os.PathLike, *,
           budget: int = 40, seed: int = 0, optimizer: str = "cma", compose: str = "factor", penalty: float = 0.05,
           bounds: tuple[float, float] = (-1.5, 1.5), popsize: int | None = None, tokenizer=None,
           device: str | torch.device | None = "auto", name: str | None = None, progress=None) -> SearchResult:
    """Search weights for `adapters` that minimise the few-shot loss on `examples` plus `penalty * mean|w|`.

    `base_model` is a transformers model or a name/path to load (its tokenizer with it); `examples` a list of
    `Example` or a JSONL path. `compose="factor"` is LoraHub's composition (A and B summed separately),
    `"delta"` the exact weighted sum of the updates. Deterministic for a given seed.
    `progress(evaluations_done, budget, best_objective)` is called after every batch of evaluations.
    """
    from .adapter import check_compatible
    from .merge import merge, resolve_device

    if optimizer not in OPTIMIZERS:
        raise MethodError(f"unknown optimizer {optimizer!r}; use one of {list(OPTIMIZERS)}", key="optimizer")
    if compose not in MODES:
        raise MethodError(f"unknown composition {compose!r}; use one of {list(MODES)}", key="compose")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise MethodError(f"budget must be a positive integer, got {budget!r}", key="budget")
    lo, hi = (float(b) for b in bounds)
    if not lo < 0 < hi:
        raise MethodError(f"bounds must hold 0 (the search starts at w = 0), got {list(bounds)}", key="bounds")
    adapters = list(adapters)
    check_compatible(adapters)
    if not isinstance(examples, list):
        examples = read_examples(examples)
    dev = resolve_device(device)
    model, tokenizer = _load_model(base_model, tokenizer, dev)

    composition = Composition(model, adapters, compose)
    t0 = time.perf_counter()
    try:
        loss_of = FewShotLoss(model, tokenizer, examples, composition)
        history: list[dict[str, Any]] = []

        def evaluate(W: torch.Tensor) -> list[float]:
            W = W.clamp(lo, hi)
            losses = loss_of(W)
            objectives = []
            for w, loss in zip(W.tolist(), losses.tolist()):
                obj = loss + penalty * sum(abs(x) for x in w) / len(w)
                history.append({"evaluation": len(history) + 1, "weights": [round(x, 6) for x in w],
                                "loss": loss, "objective": obj})
                objectives.append(obj)
            if progress is not None:
                progress(len(history), budget, min(h["objective"] for h in history))
            return objectives

        K = len(adapters)
        evaluate(torch.zeros(1, K))                                # the bare base model first, as LoraHub
        if budget > 1:
            search_with = _cma if optimizer == "cma" else _cobyla
            search_with(evaluate, K, budget - 1, lo, hi, seed, popsize, history[0]["objective"])
    finally:
        composition.detach()
    seconds = time.perf_counter() - t0

    best = min(history, key=lambda h: h["objective"])
    weights = best["weights"]
    method = "lorahub_factor" if compose == "factor" else "sum"
    merged = merge(adapters, weights, method, name=name or "lorahub")
    settings = {"budget": budget, "seed": seed, "optimizer": optimizer, "compose": compose, "penalty": penalty,
                "bounds": [lo, hi], "popsize": popsize, "examples": len(examples),
                "base_model": _model_name(model), "seconds": round(seconds, 3), "device": str(dev)}
    record = {"weights": {a.name: w for a, w in zip(adapters, weights)}, "objective": best["objective"],
              "loss": best["loss"], "base_loss": history[0]["loss"], "settings": settings, "history": history,
              "lora_merge_version": __version__, "url": URL}
    merged.provenance["lorahub"] = record
    return SearchResult(weights, best["objective"], best["loss"], history[0]["loss"], merged, history, settings)


def _cma(evaluate, K: int, budget: int, lo: float, hi: float, seed: int, popsize: int | None,
         start: float) -> None:
    import cma
    import numpy as np
    opts = {"bounds": [lo, hi], "seed": seed + 1, "verbose": -9, "verb_log": 0, "verb_disp": 0}
    if popsize:
        opts["popsize"] = popsize
    es = cma.CMAEvolutionStrategy([0.0] * K, (hi - lo) / 6, opts)   # cma's seed 0 would mean "from the clock"
    left = budget
    while left > 0:
        X = es.ask()
        if len(X) > left:                      # the budget ends inside a population: score what fits, stop
            evaluate(torch.tensor(np.array(X[:left]), dtype=torch.float32))
            break
        es.tell(X, evaluate(torch.tensor(np.array(X), dtype=torch.float32)))
        left -= len(X)


def _cobyla(evaluate, K: int, budget: int, lo: float, hi: float, seed: int, popsize: int | None,
            start: float) -> None:
    import numpy as np
    from scipy.optimize import Bounds, minimize
    count = [0]

    def f(x):
        x = np.asarray(x, dtype=np.float64)
        if not x.any():
            return start                        # w = 0 was scored first already: no second evaluation
        if count[0] >= budget:
            return 1e9                          # scipy may ask for one more; it is not scored
        count[0] += 1
        return evaluate(torch.tensor(x[None, :], dtype=torch.float32))[0]

    minimize(f, np.zeros(K), method="COBYLA", bounds=Bounds([lo] * K, [hi] * K),
             options={"maxiter": budget + 1, "rhobeg": (hi - lo) / 6})


def _load_model(base_model, tokenizer, device: torch.device):
    if isinstance(base_model, torch.nn.Module):
        if tokenizer is None:
            raise MethodError("pass the tokenizer with a model object (tokenizer=...)", key="tokenizer")
        model = base_model
    else:
        try:
            from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer
        except ImportError:
            raise MethodError("LoraHub needs transformers: pip install 'lora-merge[transformers]'") from None
        try:
            config = AutoConfig.from_pretrained(str(base_model))
            cls = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
            model = cls.from_pretrained(str(base_model), dtype=torch.float32)
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(str(base_model))
        except (OSError, ValueError) as e:
            first = (str(e).strip().splitlines() or [""])[0]
            raise AdapterLoadError(f"{base_model}: cannot load the base model ({first})",
                                   file=str(base_model)) from None
    model.eval().requires_grad_(False)
    return model.to(device), tokenizer


def _model_name(model) -> str | None:
    return getattr(model.config, "_name_or_path", None) or getattr(model, "name_or_path", None)


__all__ = ["search", "read_examples", "Example", "FewShotLoss", "SearchResult", "URL"]
