"""Adapters attached to a transformers model as weighted multi-LoRA layers, for features that need forward
passes (LoraHub's search). Changing the weights changes a tensor, never the model, and a whole population of
candidate weightings is scored in one batched forward pass: the batch is candidate-major (rows
`p * E ... (p + 1) * E - 1` belong to candidate `p`) and each row sees its own candidate's update.

Two compositions of K adapters with weights w (both exact, no approximation):

- `delta`:  sum_k w_k s_k B_k A_k (the exact weighted sum of the updates);
- `factor`: (sum_k w_k sqrt(s_k) B_k)(sum_k w_k sqrt(s_k) A_k), LoraHub's: it sums the A and the B matrices
            separately (with equal scales s, this is s (sum w_k B_k)(sum w_k A_k), the original code's update).
"""

from __future__ import annotations

import torch
from torch import nn

from .adapter import Adapter
from .errors import MethodError, UnsupportedAdapterError

MODES = ("factor", "delta")


class WeightedLoraLinear(nn.Module):
    """`base(x)` plus the weighted composition of K LoRA updates, one weighting per candidate."""

    def __init__(self, base: nn.Linear, A: torch.Tensor, B: torch.Tensor, scales: torch.Tensor, mode: str):
        super().__init__()
        self.base = base
        K, r, _ = A.shape
        self.mode = mode
        root = scales.sqrt().view(K, 1, 1)
        # float32 copies on the base layer's device; the scale is folded in (delta: into A; factor: sqrt into both)
        dev = base.weight.device
        if mode == "delta":
            self.register_buffer("A", (A * scales.view(K, 1, 1)).reshape(K * r, -1).to(dev), persistent=False)
            self.register_buffer("B", B.permute(1, 0, 2).reshape(B.shape[1], K * r).to(dev), persistent=False)
        else:
            self.register_buffer("A", (A * root).to(dev), persistent=False)
            self.register_buffer("B", (B * root).to(dev), persistent=False)
        self.K, self.r = K, r
        self.weights: torch.Tensor | None = None      # (P, K), set by `Composition.set_weights`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        w = self.weights
        if w is None:
            return y
        P = w.shape[0]
        shape = x.shape
        if shape[0] % P:
            raise MethodError(f"batch of {shape[0]} rows is not a multiple of the {P} candidates")
        xs = x.reshape(P, -1, shape[-1]).to(self.A.dtype)           # (P, rows * seq, in)
        if self.mode == "delta":
            coef = w.to(self.A.dtype).repeat_interleave(self.r, dim=1).unsqueeze(1)   # (P, 1, K r)
            update = ((xs @ self.A.T) * coef) @ self.B.T
        else:
            wa = w.to(self.A.dtype)
            A = torch.einsum("pk,kri->pri", wa, self.A)                 # (P, r, in)
            B = torch.einsum("pk,kor->por", wa, self.B)                 # (P, out, r)
            update = (xs @ A.mT) @ B.mT
        return y + update.reshape(*shape[:-1], -1).to(y.dtype)


class Composition:
    """K adapters attached to `model` (see the module docstring); `detach()` restores the model."""

    def __init__(self, model: nn.Module, adapters: list[Adapter], mode: str = "factor"):
        if mode not in MODES:
            raise MethodError(f"unknown composition mode {mode!r}; use one of {list(MODES)}", key="compose")
        if not adapters:
            raise MethodError("a composition needs at least one adapter")
        self.model, self.adapters, self.mode = model, adapters, mode
        self.layers: dict[str, tuple[nn.Module, str, nn.Linear, WeightedLoraLinear]] = {}
        paths = sorted(set().union(*(a.metas for a in adapters)))
        for path in paths:
            self._attach(path)

    @property
    def K(self) -> int:
        return len(self.adapters)

    def _attach(self, path: str) -> None:
        full, base = _find(self.model, path)
        if base is None:
            raise UnsupportedAdapterError(f"module {path} of the adapters is not in the model "
                                          f"({type(self.model).__name__}); is it the right base model?", module=path)
        if not isinstance(base, nn.Linear):
            raise UnsupportedAdapterError(f"module {path} is a {type(base).__name__}; only Linear layers can be "
                                          "composed with weights", module=path)
        ranks = {a.metas[path].rank for a in self.adapters if path in a.metas}
        r = max(ranks)
        if self.mode == "factor" and len({a.metas[path].rank if path in a.metas else r
                                          for a in self.adapters}) > 1:
            raise MethodError(f"module {path}: the factor composition sums A and B matrices and needs equal ranks; "
                              "use compose='delta'", module=path, key="compose")
        As, Bs, scales = [], [], []
        for a in self.adapters:
            w = a.modules.get(path)
            if w is not None and (w.embedding or w.magnitude is not None or w.bias is not None):
                raise UnsupportedAdapterError(f"adapter '{a.name}' module {path}: embedding, DoRA and lora_bias "
                                              "modules cannot be composed with weights", module=path, file=a.source)
            A = torch.zeros(r, base.in_features) if w is None else _pad(w.A.float(), r, 0)
            B = torch.zeros(base.out_features, r) if w is None else _pad(w.B.float(), r, 1)
            if A.shape[1] != base.in_features or B.shape[0] != base.out_features:
                raise UnsupportedAdapterError(
                    f"adapter '{a.name}' module {path}: update of shape {(B.shape[0], A.shape[1])} does not fit the "
                    f"model's {(base.out_features, base.in_features)}; is it the right base model?",
                    module=path, file=a.source)
            As.append(A)
            Bs.append(B)
            scales.append(0.0 if w is None else w.scale)
        scale = torch.tensor(scales, dtype=torch.float32)
        if self.mode == "factor" and (scale < 0).any():
            raise MethodError(f"module {path}: negative scale", module=path)
        layer = WeightedLoraLinear(base, torch.stack(As), torch.stack(Bs), scale, self.mode)
        parent_path, _, name = full.rpartition(".")
        parent = self.model.get_submodule(parent_path) if parent_path else self.model
        setattr(parent, name, layer)
        self.layers[path] = (parent, name, base, layer)

    def set_weights(self, weights) -> None:
        """One weighting (K,) or a population (P, K); rows of the next batches are grouped by candidate."""
        w = torch.as_tensor(weights, dtype=torch.float32)
        if w.dim() == 1:
            w = w.unsqueeze(0)
        if w.shape[1] != self.K:
            raise MethodError(f"expected {self.K} weights per candidate, got {w.shape[1]}")
        for _, _, base, layer in self.layers.values():
            layer.weights = w.to(base.weight.device)

    def detach(self) -> None:
        for parent, name, base, _ in self.layers.values():
            setattr(parent, name, base)
        self.layers.clear()


def answer_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, starts: torch.Tensor,
                  width: int, **model_kwargs) -> torch.Tensor:
    """The logits at positions `starts[s]` ... `starts[s] + width - 1` of each row s (clamped to the sequence's
    last position), shape (S, width, vocab): what scoring an answer that follows a prompt needs.

    The output embedding (`model.get_output_embeddings()`) is applied at those positions only, through a forward
    pre-hook that gathers its input; the model's own forward does everything else (final soft-capping, scaling),
    so the values are those of the full logits. A vocabulary of 49k and prompts of hundreds of tokens make the
    full logits most of a small model's cost. When the output embedding is itself an adapted layer of a
    composition (its input must stay whole) or the model has none, the full logits are computed and gathered.
    `model_kwargs` (e.g. `position_ids`) go to the model's forward.
    """
    S, T = input_ids.shape
    index = (starts.to(input_ids.device).view(-1, 1) + torch.arange(width, device=input_ids.device)).clamp(max=T - 1)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or isinstance(head, WeightedLoraLinear):
        logits = model(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs).logits
        return logits.gather(1, index.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))

    def gather(module, args):
        h = args[0]
        if h.dim() != 3 or h.shape[:2] != (S, T):
            raise MethodError(f"the output embedding of {type(model).__name__} got an input of shape "
                              f"{tuple(h.shape)}, expected ({S}, {T}, hidden)")
        return (h.gather(1, index.unsqueeze(-1).expand(-1, -1, h.shape[-1])), *args[1:])

    handle = head.register_forward_pre_hook(gather)
    try:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs).logits
    finally:
        handle.remove()
    return logits


def _pad(t: torch.Tensor, r: int, dim: int) -> torch.Tensor:
    if t.shape[dim] == r:
        return t
    pad = [0, 0, 0, 0]
    pad[1 if dim == 1 else 3] = r - t.shape[dim]
    return nn.functional.pad(t, pad)


def _find(model: nn.Module, path: str) -> tuple[str, nn.Module | None]:
    """The module at an adapter's module path, in a bare transformers model (or one wrapped as PEFT wraps it)."""
    for full in (path, "base_model.model." + path):
        try:
            return full, model.get_submodule(full)
        except AttributeError:
            continue
    return path, None


__all__ = ["Composition", "WeightedLoraLinear", "MODES", "answer_logits"]
