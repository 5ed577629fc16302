"""The diagonal Fisher information of a LoRA adapter, estimated from data, for Fisher-weighted merging (Matena &
Raffel 2022, "Merging Models with Fisher-Weighted Averaging", arXiv 2111.09832).

    F = lm.fisher.estimate("HuggingFaceTB/SmolLM2-135M-Instruct", lm.load("adapters/math"), "math.jsonl")
    F.save("math.fisher.safetensors")

The model with the adapter attached defines p(y|x); the Fisher is the mean over the examples x of
E_{y ~ p(.|x)} [(∇_θ log p(y|x))²], its diagonal only. The log-likelihood l_y of a sequence y is the SUM of its
tokens' log-probabilities. Every example's gradient is its own, never a square of a batch gradient: one
backward pass of a batch's summed log-likelihoods gives each adapted layer the gradient of its output for every
sequence separately (sequences do not interact), and with the layer's input that makes each sequence's gradient.

Rows are LoraHub's JSONL rows and prompts (`lorahub.PROMPT`, "{input}\nAnswer:", the target after a space);
decoder-only models. A multiple-choice row `{"input", "options", "answer"}` makes the model a classifier over
its options, p~(y|x) = softmax_y(l_y), and with g_j the gradient of l_j, ∇ log p~(y|x) = g_y - ḡ,
ḡ = Σ_j p~_j g_j. A free-text row `{"input", "output"}` keeps the model's own distribution: ∇ log p(y|x) = g_y.

Kinds, what y is:
- `expected`: multiple choice: the exact Σ_y p~_y (g_y - ḡ)²; free text: a Monte-Carlo estimate with ONE
  sample y from the model (the same draw as `sampled`);
- `empirical`: the data's answer (the "empirical Fisher", a squared gradient of the training loss);
- `sampled`: one y per example drawn from the model, reproducibly from `seed`: from p~ for multiple choice, by
  ancestral sampling for free text (up to `max_new_tokens`, ending after an EOS token, which is scored).

Spaces:
- `factor`: the Fisher of the adapter's own parameters A (r x in) and B (out x r);
- `delta`: the Fisher of each module's dense update W = s B A (out x in), i.e. of the layer's weight.
A factor-space Fisher average is meaningful only between adapters whose factors share a basis, i.e. adapters
fine-tuned from one common LoRA initialisation: otherwise their factors are unrelated (B R⁻¹ and R A give the
same update for any invertible R), and only the delta space compares like with like.

`gram=True` also sums each adapted layer's input Gram matrix XᵀX (RegMean) over the tokens of every example's
prompt + data answer, in the same forward passes (a sampled free-text row brings its answer as an extra row).

`Fisher.save` writes safetensors (`lora_merge.stfile`): in factor space the adapter's own keys and shapes
(`base_model.model.<module>.lora_A.weight`, `.lora_B.weight`), in delta space `base_model.model.<module>.delta.weight`,
the Grams in a sibling file (`base_model.model.<module>.gram`), and `meta` as the metadata. `Fisher.load` and
`load_gram` read them back, checked.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from . import __version__, stfile
from .adapter import Adapter, LoraWeight, check_compatible
from .errors import AdapterLoadError, LoraMergeError, MethodError, NonFiniteError, OutputExistsError
from .io import PREFIX, _sha256, _split_key, load, state_dict
from .lorahub import PROMPT, Example, _load_model, _model_name, _pad, read_examples
from .merge import resolve_device
from .model import Composition, answer_logits

URL = "https://arxiv.org/abs/2111.09832"
KINDS = ("expected", "empirical", "sampled")
SPACES = ("factor", "delta")
DELTA, GRAM = ".delta.weight", ".gram"


@dataclass
class Fisher:
    """A diagonal Fisher: module path -> {"A", "B"} (factor space) or {"delta"} (delta space), the input Gram
    matrices if estimated with `gram=True`, and how it was estimated (`meta`, strings)."""

    space: str
    tensors: dict[str, dict[str, torch.Tensor]]
    gram: dict[str, torch.Tensor] | None = None
    meta: dict[str, str] = field(default_factory=dict)

    @cached_property
    def norm(self) -> float:
        """The global L2 norm over all of the Fisher's values (what `normalize` divides by in a merge)."""
        return math.sqrt(sum(float((t.double() ** 2).sum()) for m in self.tensors.values() for t in m.values()))

    def save(self, path: str | os.PathLike, *, force: bool = False,
             gram_path: str | os.PathLike | None = None) -> Path:
        """Write the Fisher to `path`, and the Gram matrices (if any) to `gram_path` (default: beside it,
        `<name>.gram.safetensors`). Existing files are replaced only with `force=True`."""
        path = Path(path)
        if self.space == "factor":
            modules = {m: LoraWeight(A=t["A"], B=t["B"], scale=1.0) for m, t in self.tensors.items()}
            files = {path: state_dict(Adapter(modules, {}), torch.float32)}     # the adapter's own keys
        else:
            files = {path: {PREFIX + m + DELTA: t["delta"].float() for m, t in self.tensors.items()}}
        if self.gram is not None:
            gram_path = Path(gram_path or path.with_name(path.name.removesuffix(".safetensors") + ".gram.safetensors"))
            files[gram_path] = {PREFIX + m + GRAM: g.float() for m, g in self.gram.items()}
        elif gram_path is not None:
            raise MethodError("this Fisher holds no Gram matrices (estimate it with gram=True)", key="gram_path")
        for p in files:
            if p.exists() and not force:
                raise OutputExistsError(f"{p}: already exists; pass force=True to overwrite it", file=str(p))
        for p, tensors in files.items():
            _write(p, tensors, {"format": "pt", **self.meta, "space": self.space})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *, gram_path: str | os.PathLike | None = None) -> Fisher:
        """A Fisher written by `save` (and its Gram matrices from `gram_path`), every key and value checked."""
        tensors, meta = _read(path)
        meta.pop("format", None)                # safetensors' own key, written by `save`
        space = meta.get("space")
        if space not in SPACES:
            raise AdapterLoadError(f"{path}: metadata 'space' is {space!r}, expected one of {list(SPACES)}",
                                   file=str(path), key="space")
        out: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            split = _fisher_key(key, space)
            if split is None:
                raise AdapterLoadError(f"{path}: {key} is not a {space}-space Fisher key", file=str(path), key=key)
            _check(path, key, t)
            out.setdefault(split[0], {})[split[1]] = t
        for module, t in out.items():
            if space == "factor" and ("A" not in t or "B" not in t or t["A"].shape[0] != t["B"].shape[1]):
                shapes = {slot: tuple(x.shape) for slot, x in t.items()}
                raise AdapterLoadError(f"{path}: module {module} needs lora_A (r, in) and lora_B (out, r), has "
                                       f"{shapes}", file=str(path), module=module)
        return cls(space, out, load_gram(gram_path) if gram_path is not None else None, meta)


def load_gram(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The Gram matrices of a file written by `Fisher.save`: module path -> XᵀX (in x in), checked."""
    out = {}
    for key, t in _read(path)[0].items():
        if not (key.startswith(PREFIX) and key.endswith(GRAM)) or t.dim() != 2 or t.shape[0] != t.shape[1]:
            raise AdapterLoadError(f"{path}: {key} {tuple(t.shape)} is not a Gram matrix "
                                   f"('{PREFIX}<module>{GRAM}', square)", file=str(path), key=key)
        _check(path, key, t, diagonal=True)
        out[key.removeprefix(PREFIX).removesuffix(GRAM)] = t
    return out


def estimate(model, adapter: Adapter | str | os.PathLike, data: str | os.PathLike | list[Example], *,
             tokenizer=None, n_examples: int = 256, kind: str = "expected", space: str = "factor",
             batch_size: int = 8, seed: int = 0, device: str | torch.device | None = "auto",
             max_new_tokens: int = 32, progress: Callable[[int, int], None] | None = None,
             gram: bool = False) -> Fisher:
    """The diagonal Fisher of `adapter` on the first `n_examples` rows of `data` (see the module docstring).

    `model` is a transformers causal LM (with its `tokenizer`) or a name/path to load; `adapter` an Adapter or
    its folder; `data` a JSONL path or a list of `lorahub.Example`. `batch_size` examples go into one
    forward/backward pass (with all options of a multiple-choice row); `progress(done, total)` is called after
    each batch. The same seed gives the same estimate, whatever the batch size.
    """
    return estimate_variants(model, adapter, data, tokenizer=tokenizer, n_examples=n_examples, kinds=(kind,),
                             spaces=(space,), batch_size=batch_size, seed=seed, device=device,
                             max_new_tokens=max_new_tokens, progress=progress, gram=gram)[(kind, space)]


def estimate_variants(model, adapter: Adapter | str | os.PathLike, data: str | os.PathLike | list[Example], *,
                      kinds: Sequence[str] = KINDS, spaces: Sequence[str] = SPACES, tokenizer=None,
                      n_examples: int = 256, batch_size: int = 8, seed: int = 0,
                      device: str | torch.device | None = "auto", max_new_tokens: int = 32,
                      progress: Callable[[int, int], None] | None = None,
                      gram: bool = False) -> dict[tuple[str, str], Fisher]:
    """Several kinds and spaces of the Fisher from ONE pass over the data: {(kind, space): Fisher}, each equal to
    what `estimate` gives for that kind and space (the per-example gradients are the same; only which labels
    weigh them, and how they are contracted, differ). With `gram=True` every Fisher carries the same Grams."""
    kinds, spaces = tuple(dict.fromkeys(kinds)), tuple(dict.fromkeys(spaces))
    for key, values, allowed in (("kind", kinds, KINDS), ("space", spaces, SPACES)):
        if not values:
            raise MethodError(f"no {key} given; use some of {list(allowed)}", key=key)
        for value in values:
            if value not in allowed:
                raise MethodError(f"unknown {key} {value!r}; use one of {list(allowed)}", key=key)
    for key, value in (("n_examples", n_examples), ("batch_size", batch_size), ("max_new_tokens", max_new_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise MethodError(f"{key} must be a positive integer, got {value!r}", key=key)
    adapter = adapter if isinstance(adapter, Adapter) else load(adapter)
    check_compatible([adapter])
    examples, sha = _examples(data, n_examples)
    model, tokenizer = _load_model(model, tokenizer, resolve_device(device))
    if getattr(model.config, "is_encoder_decoder", False):
        raise MethodError(f"{type(model).__name__} is an encoder-decoder model; the Fisher estimate supports "
                          "decoder-only (causal) language models", key="model")
    settings = _Settings(kinds, spaces, batch_size, seed, max_new_tokens, gram, progress)
    return _estimate(model, tokenizer, adapter, examples, sha, settings)


def estimate_many(model, adapters: Sequence[Adapter | str | os.PathLike],
                  data_per_adapter: Sequence[str | os.PathLike | list[Example]], *, tokenizer=None,
                  device: str | torch.device | None = "auto", **settings) -> list[Fisher]:
    """One Fisher per adapter, each on its own data, with the base model loaded once; the other settings are
    those of `estimate` (`progress` counts the examples of the adapter being estimated)."""
    if len(adapters) != len(data_per_adapter):
        raise MethodError(f"got {len(data_per_adapter)} data sets for {len(adapters)} adapters", key="data")
    model, tokenizer = _load_model(model, tokenizer, resolve_device(device))
    return [estimate(model, adapter, data, tokenizer=tokenizer, device=device, **settings)
            for adapter, data in zip(adapters, data_per_adapter)]


@dataclass(frozen=True)
class _Settings:
    kinds: tuple[str, ...]
    spaces: tuple[str, ...]
    batch_size: int
    seed: int
    max_new_tokens: int
    gram: bool
    progress: Callable[[int, int], None] | None


def _examples(data, n: int) -> tuple[list[Example], str]:
    """The first `n` examples and the sha256 of the data file (or of the examples' JSON)."""
    if isinstance(data, list):
        examples = data[:n]
        text = json.dumps([dataclasses.asdict(e) for e in examples], sort_keys=True)
        return examples, hashlib.sha256(text.encode()).hexdigest()
    return read_examples(data, limit=n), _sha256(Path(data))


@dataclass
class _Item:
    """One example: its prompt's token ids, one target per row (multiple choice: the options, `answer` the data's;
    free text: the sample y if a kind needs it, then the data's answer if a kind or the Gram needs it), `rows` the
    row of each kind (free text), `gram_row` the data answer's row."""

    index: int
    prompt: list[int]
    targets: list[list[int]]
    answer: int | None = None
    gram_row: int = 0
    rows: dict[str, int] = field(default_factory=dict)


def _estimate(model, tokenizer, adapter: Adapter, examples: list[Example], sha: str, s: _Settings
              ) -> dict[tuple[str, str], Fisher]:
    device = next(model.parameters()).device
    composition = Composition(model, [adapter], mode="delta")      # y = base(x) + s (x Aᵀ) Bᵀ, in float32
    composition.set_weights([1.0])
    factors = {path: adapter.modules[path].to(device) for path in composition.layers}
    acc: dict[tuple[str, str], dict[str, dict[str, torch.Tensor]]] = {}
    for kind in s.kinds:
        for space in s.spaces:
            acc[kind, space] = {path: {slot: torch.zeros(shape, device=device) for slot, shape in
                                       (({"A": w.A.shape, "B": w.B.shape} if space == "factor" else
                                         {"delta": w.shape}).items())} for path, w in factors.items()}
    grams = {path: torch.zeros(w.shape[1], w.shape[1], device=device) for path, w in factors.items()} \
        if s.gram else None
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = {tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}
    tokens = 0
    try:
        for start in range(0, len(examples), s.batch_size):
            items = [_item(model, tokenizer, ex, i, s, eos)
                     for i, ex in enumerate(examples[start:start + s.batch_size], start)]
            tokens += _batch(model, tokenizer, composition, factors, items, acc, grams, s)
            if s.progress is not None:
                s.progress(min(start + s.batch_size, len(examples)), len(examples))
    finally:
        composition.detach()
    meta = {"n_examples": str(len(examples)), "data_sha256": sha, "prompt_template": PROMPT,
            "base_model": _model_name(model) or "", "adapter": adapter.name, "adapter_source": adapter.source or "",
            "seed": str(s.seed), "max_new_tokens": str(s.max_new_tokens), "lora_merge_version": __version__,
            "url": URL}
    if grams is not None:
        meta["gram_tokens"] = str(tokens)
        grams = {p: g.cpu() for p, g in grams.items()}
    n = len(examples)
    return {(kind, space): Fisher(space, {p: {k: (v / n).cpu() for k, v in t.items()} for p, t in a.items()},
                                  None if grams is None else dict(grams),
                                  {"kind": kind, "space": space, **meta})
            for (kind, space), a in acc.items()}


def _item(model, tokenizer, ex: Example, index: int, s: _Settings, eos: set[int]) -> _Item:
    """Tokenise one example (as `lorahub.FewShotLoss` does) and, for a free-text row that needs it, sample y."""
    prompt = tokenizer(PROMPT.format(input=ex.prompt))["input_ids"]

    def encode(text) -> list[int]:
        ids = tokenizer(" " + text, add_special_tokens=False)["input_ids"] if isinstance(text, str) else []
        if not ids:
            raise LoraMergeError(f"example {index + 1}: the target {text!r} is not a string that tokenises to at "
                                 "least one token", key="options" if ex.options is not None else "output")
        return ids

    if ex.options is not None:
        if isinstance(ex.answer, bool) or not isinstance(ex.answer, int) or not 0 <= ex.answer < len(ex.options):
            raise LoraMergeError(f"example {index + 1}: answer {ex.answer!r} is not an index into its "
                                 f"{len(ex.options)} options", key="answer")
        return _Item(index, prompt, [encode(o) for o in ex.options], ex.answer, ex.answer)
    answer = encode(ex.target)
    item = _Item(index, prompt, [])
    if any(kind != "empirical" for kind in s.kinds):            # expected and sampled: one draw y of the model
        item.targets.append(_sample(model, prompt, _generator(s.seed, index), s.max_new_tokens, eos))
        item.rows.update({kind: 0 for kind in s.kinds if kind != "empirical"})
    if "empirical" in s.kinds or s.gram:
        item.gram_row = len(item.targets)
        item.rows["empirical"] = item.gram_row
        item.targets.append(answer)
    return item


def _batch(model, tokenizer, composition, factors, items: list[_Item], acc, grams, s: _Settings) -> int:
    """Add the batch's examples' Fishers (and Grams) to the sums; returns the number of Gram tokens."""
    device = next(model.parameters()).device
    rows = [(e, item.prompt, t) for e, item in enumerate(items) for t in item.targets]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    ids, mask = (t.to(device) for t in _pad([r[1] + r[2] for r in rows], pad))
    labels = _pad([r[2] for r in rows], -100)[0].to(device)                  # (S, W): the targets, left-aligned
    starts = torch.tensor([len(r[1]) - 1 for r in rows])                     # the position predicting each first
    example = torch.tensor([r[0] for r in rows], device=device)
    with torch.enable_grad(), _recording(composition) as (inputs, zeros):
        logits = answer_logits(model, ids, mask, starts, labels.shape[1])
        scored = labels != -100
        logp = logits[scored].float().log_softmax(-1).gather(1, labels[scored].unsqueeze(1)).squeeze(1)
        ll = torch.zeros(len(rows), device=device).index_add(0, scored.nonzero()[:, 0], logp)
        grads = torch.autograd.grad(ll.sum(), list(zeros.values()), allow_unused=True)

    p, c, gram_rows = _coefficients(items, ll.detach().cpu(), s)
    p, gram_rows = p.to(device), gram_rows.to(device)
    c = {kind: v.to(device) for kind, v in c.items()}
    m = mask.unsqueeze(-1).float()
    for path, g in zip(zeros, grads):
        X = inputs[path].float() * m                                            # (S, T, in), pads zeroed
        gout = (torch.zeros_like(zeros[path]) if g is None else g).float() * m   # (S, T, out)
        w = factors[path]
        for space in s.spaces:
            if space == "delta":
                per_row = {"delta": torch.einsum("sto,sti->soi", gout, X)}
            else:
                per_row = {"B": w.scale * torch.einsum("sto,str->sor", gout, X @ w.A.float().T),
                           "A": w.scale * torch.einsum("str,sti->sri", gout @ w.B.float(), X)}
            for slot, G in per_row.items():
                squares = _centred_squares(G, example, p)
                for kind in s.kinds:
                    acc[kind, space][path][slot] += torch.tensordot(c[kind], squares, dims=1)
        if grams is not None:
            Xg = X[gram_rows].reshape(-1, X.shape[-1])
            grams[path] += Xg.T @ Xg
    return int(mask[gram_rows].sum()) if grams is not None else 0


def _coefficients(items: list[_Item], ll: torch.Tensor, s: _Settings
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """Per row, p, and c of each kind, such that an example's Fisher is Σ_j c_j (g_j - Σ_k p_k g_k)²; the Gram
    rows."""
    p, gram_rows = torch.zeros(len(ll)), []
    c = {kind: torch.zeros(len(ll)) for kind in s.kinds}
    start = 0
    for item in items:
        rows = slice(start, start + len(item.targets))
        if item.answer is None:                         # free text: ∇ log p(y|x) = g_y, no centring
            for kind in s.kinds:
                c[kind][start + item.rows[kind]] = 1.0
        else:
            p[rows] = ll[rows].double().softmax(0).float()
            for kind in s.kinds:
                if kind == "expected":
                    c[kind][rows] = p[rows]
                else:
                    y = item.answer if kind == "empirical" else \
                        int(torch.multinomial(p[rows], 1, generator=_generator(s.seed, item.index)))
                    c[kind][start + y] = 1.0
        gram_rows.append(start + item.gram_row)
        start = rows.stop
    return p, c, torch.tensor(gram_rows)


def _centred_squares(G: torch.Tensor, example: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """(G_s - ḡ_e(s))² for per-row gradients G (S, ...), ḡ_e = Σ_{s of example e} p_s G_s: an example's Fisher is
    then Σ_s c_s of these, in the centred form (no cancellation as in Σ c g² - ḡ²)."""
    shape = (-1,) + (1,) * (G.dim() - 1)
    gbar = torch.zeros((int(example.max()) + 1, *G.shape[1:]), device=G.device).index_add_(0, example,
                                                                                            G * p.view(shape))
    return (G - gbar[example]).square()


@contextmanager
def _recording(composition: Composition):
    """Forward hooks on the composition's layers: each saves its input and adds to its output a zero tensor that
    requires grad, whose gradient is then the gradient of the layer's output (the model's weights need none)."""
    inputs: dict[str, torch.Tensor] = {}
    zeros: dict[str, torch.Tensor] = {}

    def hook(path, module, args, output):
        if path in inputs:
            raise MethodError(f"module {path} is called twice in one forward pass; its Fisher cannot be separated",
                              module=path)
        inputs[path] = args[0].detach()
        zeros[path] = torch.zeros_like(output, requires_grad=True)
        return output + zeros[path]

    handles = [layer.register_forward_hook(partial(hook, path)) for path, (*_, layer) in composition.layers.items()]
    try:
        yield inputs, zeros
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def _sample(model, prompt: list[int], generator: torch.Generator, max_new_tokens: int, eos: set[int]) -> list[int]:
    """Ancestral sampling of a continuation of `prompt`, token by token with a KV cache, at temperature 1 with
    no truncation; stops after an EOS token (kept) or `max_new_tokens`."""
    ids = torch.tensor([prompt], device=next(model.parameters()).device)
    out: list[int] = []
    past = None
    while len(out) < max_new_tokens and not (out and out[-1] in eos):
        result = model(input_ids=ids, past_key_values=past, use_cache=True)
        past = result.past_key_values
        out.append(int(torch.multinomial(result.logits[0, -1].double().softmax(-1).float().cpu(), 1,
                                         generator=generator)))
        ids = ids.new_tensor([[out[-1]]])
    return out


def _generator(seed: int, index: int) -> torch.Generator:
    """The random stream of one example: the draws do not depend on batching or on the other examples."""
    digest = hashlib.sha256(f"lora-merge fisher {seed} {index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def _fisher_key(key: str, space: str) -> tuple[str, str] | None:
    """(module path, slot) of a key of a Fisher file in `space`; None if it is not one."""
    if not key.startswith(PREFIX):
        return None
    if space == "delta":
        return (key[len(PREFIX):-len(DELTA)], "delta") if key.endswith(DELTA) else None
    split = _split_key(key)                 # the adapter's own keys: lora_A.weight / lora_B.weight
    return (split[0], split[1]) if split and split[1] in ("A", "B") and split[2] is False else None


def _read(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k).clone() for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterLoadError(f"{path}: not a readable safetensors file ({e})", file=str(path)) from None


def _check(path, key: str, t: torch.Tensor, diagonal: bool = False) -> None:
    """A 2-d float tensor, finite, >= 0 (on its diagonal only, for a Gram matrix)."""
    if not torch.is_floating_point(t) or t.dim() != 2:
        raise AdapterLoadError(f"{path}: {key} is {t.dim()}-d {t.dtype}, expected a 2-d floating-point tensor",
                               file=str(path), key=key)
    if not bool(torch.isfinite(t).all()):
        raise NonFiniteError(f"{path}: {key} holds NaN or Inf values", file=str(path), key=key)
    if bool(((t.diagonal() if diagonal else t) < 0).any()):
        raise AdapterLoadError(f"{path}: {key} holds negative values; a Fisher (and a Gram's diagonal) is >= 0",
                               file=str(path), key=key)


def _write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write to a temporary file beside `path` and rename it into place: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        stfile.write(tmp, tensors, metadata)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


__all__ = ["Fisher", "estimate", "estimate_many", "estimate_variants", "load_gram", "KINDS", "SPACES", "URL"]
