"""The data model: an adapter is a map from module path to a low-rank update `scale * B @ A`.

`Adapter` objects support exact, lazy arithmetic in delta space:

    detox = 0.6 * math + 0.4 * code - 0.3 * toxic     # nothing is computed yet
    detox.delta("model.layers.0.self_attn.q_proj")    # == 0.6 dW_math + 0.4 dW_code - 0.3 dW_toxic, exactly
    detox.compress(rank=16)                           # best rank-16 approximation, module by module

A combination keeps a list of (coefficient, adapter) terms; its modules are built on first use by
concatenating factors (`[c_1 s_1 B_1 ... c_k s_k B_k] @ [A_1; ...; A_k]`), which is exact and costs no dense
matrix. The same adapter object appearing twice has its coefficients added, so `(a + b) - b` is `a`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .errors import BaseModelMismatchError, ShapeMismatchError, UnsupportedAdapterError
from .linalg import lowrank

if TYPE_CHECKING:
    from os import PathLike


@dataclass(frozen=True, eq=False)
class LoraWeight:
    """One module's update `scale * B @ A`, with `A: (r, in)` and `B: (out, r)`.

    For an embedding LoRA, PEFT's `lora_embedding_A` is (r, num_embeddings) and `lora_embedding_B` is
    (dim, r): B @ A is then the transpose of the weight's update, which does not matter for merging.
    """

    A: torch.Tensor
    B: torch.Tensor
    scale: float
    embedding: bool = False
    magnitude: torch.Tensor | None = None   # DoRA's lora_magnitude_vector
    bias: torch.Tensor | None = None        # lora_bias: lora_B.bias, scaled like B @ A

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in) of `B @ A`."""
        return self.B.shape[0], self.A.shape[1]

    def to(self, device: torch.device | str) -> LoraWeight:
        """The same update with its tensors on `device`."""
        def move(t):
            return None if t is None else t.to(device)
        return LoraWeight(A=move(self.A), B=move(self.B), scale=self.scale, embedding=self.embedding,
                          magnitude=move(self.magnitude), bias=move(self.bias))

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense update `scale * B @ A` (out x in). Builds an m x n matrix: use for one module at a time."""
        return self.scale * (self.B.to(dtype) @ self.A.to(dtype))


@dataclass(eq=False)
class Adapter:
    """A LoRA adapter: modules keyed by path (`model.layers.3.self_attn.q_proj`), config and provenance.

    Build one with `lora_merge.load`, `lora_merge.merge`, or arithmetic on other adapters.
    """

    _modules: Mapping[str, LoraWeight] | None    # a dict, or LazyModules read on demand
    config: dict
    name: str = "adapter"
    source: str | None = None
    files: dict[str, str] = field(default_factory=dict)        # file name -> sha256, for provenance
    provenance: dict = field(default_factory=dict)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # tensors that are not LoRA factors
    storage_dtype: torch.dtype | None = None   # dtype to save in; None: that of the tensors (or of the inputs)
    revision: str | None = None                # Hub revision the adapter was loaded at, as given
    commit: str | None = None                  # the Hub commit that revision resolved to
    _terms: tuple[tuple[float, Adapter], ...] | None = None

    # ---- construction -------------------------------------------------------------------------------------
    @classmethod
    def combination(cls, terms: list[tuple[float, Adapter]]) -> Adapter:
        """The exact weighted sum of adapters, computed lazily. Equal adapters' coefficients are added."""
        coefs: dict[int, float] = {}
        leaves: dict[int, Adapter] = {}
        for c, adapter in terms:
            for c2, leaf in adapter.terms:
                coefs[id(leaf)] = coefs.get(id(leaf), 0.0) + float(c) * c2
                leaves[id(leaf)] = leaf
        flat = tuple((coefs[k], leaves[k]) for k in coefs if coefs[k] != 0.0)
        if len(flat) == 1 and flat[0][0] == 1.0:
            return flat[0][1]
        check_compatible([leaf for _, leaf in flat])
        name = " + ".join(f"{c:g}*{leaf.name}" for c, leaf in flat).replace("+ -", "- ") or "empty"
        return cls(None, combined_config([leaf for _, leaf in flat] or list(leaves.values())), name=name, _terms=flat,
                   extra=shared_extras([leaf for _, leaf in flat]),
                   provenance={"method": "sum", "inputs": [_input_record(leaf, c) for c, leaf in flat]})

    @property
    def terms(self) -> tuple[tuple[float, Adapter], ...]:
        return self._terms if self._terms is not None else ((1.0, self),)

    @property
    def modules(self) -> Mapping[str, LoraWeight]:
        """Module path -> LoraWeight. A loaded adapter reads each module from its file when asked for it; a
        combination builds a module's (exact, concatenated) factors when asked for it (`lora_merge.lazy`)."""
        if self._modules is None:
            self._modules = combination_modules(list(self.terms))
        return self._modules

    @property
    def metas(self) -> Mapping[str, LoraWeight]:
        """Module path -> LoraWeight whose tensors may be on the meta device: shapes, dtypes, ranks and scales,
        known without reading any values."""
        modules = self.modules
        return getattr(modules, "metas", modules)

    # ---- arithmetic ---------------------------------------------------------------------------------------
    def __add__(self, other: Adapter) -> Adapter:
        if not isinstance(other, Adapter):
            return NotImplemented
        return Adapter.combination([(1.0, self), (1.0, other)])

    def __radd__(self, other):          # so that sum([a, b, c]) works
        if isinstance(other, (int, float)) and other == 0:
            return self
        return NotImplemented

    def __sub__(self, other: Adapter) -> Adapter:
        if not isinstance(other, Adapter):
            return NotImplemented
        return Adapter.combination([(1.0, self), (-1.0, other)])

    def __neg__(self) -> Adapter:
        return Adapter.combination([(-1.0, self)])

    def __mul__(self, k: float) -> Adapter:
        if isinstance(k, bool) or not isinstance(k, (int, float)):
            return NotImplemented
        return Adapter.combination([(float(k), self)])

    __rmul__ = __mul__

    def __truediv__(self, k: float) -> Adapter:
        if isinstance(k, bool) or not isinstance(k, (int, float)):
            return NotImplemented
        if k == 0:
            from .errors import MethodError
            raise MethodError(f"cannot divide adapter '{self.name}' by zero")
        return Adapter.combination([(1.0 / k, self)])

    # ---- queries ------------------------------------------------------------------------------------------
    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    @property
    def dtype(self) -> torch.dtype:
        """The dtype `save` writes by default: that of the inputs (float32 when they differ)."""
        if self.storage_dtype is not None:
            return self.storage_dtype
        if self._terms is not None:
            return common_dtype([leaf for _, leaf in self._terms])
        return _single_dtype({w.A.dtype for w in self.metas.values()})

    def delta(self, module: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense update of one module, in `dtype`."""
        return self.modules[module].delta(dtype)

    def __repr__(self) -> str:
        ranks = sorted({w.rank for w in self.metas.values()}) if self._modules is not None else "lazy"
        return f"Adapter({self.name!r}, modules={len(self._modules or {}) or '?'}, ranks={ranks})"

    # ---- transformations ----------------------------------------------------------------------------------
    def compress(self, rank: int | None = None, energy: float | None = None) -> Adapter:
        """Re-factor every module to its best approximation of rank `rank` (or keeping `energy` of the squared
        singular values), through a factored SVD. Without arguments the result is exact (full rank)."""
        modules = {}
        for path, w in self.modules.items():
            _check_plain(self, path, w, "compress")
            B, A = lowrank(w.B.float() * w.scale, w.A.float(), rank, energy)
            modules[path] = LoraWeight(A=A, B=B, scale=1.0, embedding=w.embedding, bias=_scaled_bias(w))
        prov = dict(self.provenance) or {"inputs": [_input_record(self, 1.0)]}
        prov["compress"] = {"rank": rank, "energy": energy}
        return Adapter(modules, dict(self.config), name=self.name, provenance=prov, extra=dict(self.extra),
                       storage_dtype=self.dtype)

    def save(self, path: str | PathLike, *, force: bool = False, dtype: torch.dtype | str | None = None,
             extra_files: dict[str, str] | None = None) -> None:
        """Write a PEFT folder (see `lora_merge.save`)."""
        from .io import save
        save(self, path, force=force, dtype=dtype, extra_files=extra_files)


# ---- helpers shared with the merge methods ----------------------------------------------------------------
def _single_dtype(dtypes: set[torch.dtype]) -> torch.dtype:
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def common_dtype(adapters: list[Adapter]) -> torch.dtype:
    """The storage dtype shared by the adapters, or float32 when they differ."""
    return _single_dtype({a.dtype for a in adapters})


def split_weight(weight: float) -> tuple[float, float]:
    """PEFT's split of a term's weight (times its scale) over the factors: sqrt|w| on each, the sign on A."""
    root = math.sqrt(abs(weight))
    return math.copysign(root, weight), root


def _input_record(adapter: Adapter, weight: float) -> dict:
    return {"name": adapter.name, "source": adapter.source, "revision": adapter.revision, "commit": adapter.commit,
            "weight": weight, "files": dict(adapter.files)}


def _check_plain(adapter: Adapter, module: str, w: LoraWeight, what: str) -> None:
    if w.magnitude is not None:
        raise UnsupportedAdapterError(
            f"{what}: adapter '{adapter.name}' ({_where(adapter)}) is a DoRA adapter (module {module} has a "
            "magnitude vector); its update is not B @ A, so it cannot be merged correctly yet",
            file=adapter.source, module=module)


def _scaled_bias(w: LoraWeight) -> torch.Tensor | None:
    return None if w.bias is None else w.scale * w.bias.float()


def combined_config(adapters: list[Adapter]) -> dict:
    """The config of a combination of these adapters (see `config.merged_config`)."""
    from .config import merged_config
    return merged_config([a.config for a in adapters], [set(a.modules) for a in adapters])


# init_lora_weights values with which PEFT changes the base weights: the adapter's update is then not s * B @ A
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "lora-ga")


def check_compatible(adapters: list[Adapter], allow_base_mismatch: bool = False) -> None:
    """Raise if an adapter's update is not s * B @ A of the base model, or if the adapters were trained on
    different base models (unless allowed)."""
    for a in adapters:
        init = a.config.get("init_lora_weights")
        if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
            raise UnsupportedAdapterError(
                f"adapter '{a.name}' ({_where(a)}) was initialised with init_lora_weights={init!r}, which changes "
                "the base weights; convert it to a plain LoRA first (PEFT's "
                "path_initial_model_for_weight_conversion)", file=a.source, key="init_lora_weights")
    if allow_base_mismatch:
        return
    named = [a for a in adapters if a.base_model]
    if len({a.base_model for a in named}) > 1:
        listing = ", ".join(f"{_where(a)} (base {a.base_model})" for a in named)
        odd = next(a for a in named if a.base_model != named[0].base_model)
        raise BaseModelMismatchError(
            f"adapters were trained on different base models: {listing}; if the models share their "
            "architecture and you mean it, pass allow_base_mismatch=True (--allow-base-mismatch; in a recipe, "
            "allow_base_mismatch: true)", file=odd.source, key="base_model_name_or_path")


def module_table(adapters: list[Adapter], weights: list[float]) -> dict[str, list[tuple[float, LoraWeight, Adapter]]]:
    """For every module in the union of the adapters: the (weight, LoraWeight, adapter) of those that have it,
    the LoraWeight being the module's meta (shapes, ranks, scales: read `adapter.modules[path]` for values).

    A module an adapter lacks contributes zero. Shapes and kinds are checked here, naming both files.
    """
    table: dict[str, list[tuple[float, LoraWeight, Adapter]]] = {}
    for adapter, weight in zip(adapters, weights):
        for path, w in adapter.metas.items():
            entries = table.setdefault(path, [])
            if entries:
                _, w0, a0 = entries[0]
                if w0.shape != w.shape or w0.embedding != w.embedding:
                    kind = {True: "embedding", False: "linear"}
                    raise ShapeMismatchError(
                        f"module {path}: {_where(a0)} has a {kind[w0.embedding]} update of shape "
                        f"{tuple(w0.shape)} but {_where(adapter)} has a {kind[w.embedding]} update of shape "
                        f"{tuple(w.shape)}", file=_where(adapter), module=path)
            entries.append((weight, w, adapter))
    return dict(sorted(table.items()))


def shared_extras(adapters: list[Adapter]) -> dict[str, torch.Tensor]:
    """Non-LoRA tensors that can go into a merge unchanged.

    PEFT saves copies of base weights (`...base_layer.weight`, e.g. the embedding when it is targeted): those
    are carried over when every adapter holding them holds the same values. Anything else (modules_to_save,
    trainable tokens) is a trained tensor that a weighted sum of LoRA updates cannot represent: refused.
    """
    out: dict[str, torch.Tensor] = {}
    for key in dict.fromkeys(k for a in adapters for k in a.extra):
        holders = [a for a in adapters if key in a.extra]
        first = holders[0].extra[key]
        same = all(a.extra[key].shape == first.shape and torch.equal(a.extra[key], first) for a in holders)
        if same and ".base_layer." in key:
            out[key] = first
            continue
        raise UnsupportedAdapterError(
            f"adapter '{holders[0].name}' ({_where(holders[0])}) holds {key}, a trained tensor that is not a LoRA "
            "factor (modules_to_save, trainable tokens or similar); a weighted sum of LoRA updates cannot carry it",
            file=holders[0].source, key=key)
    return out


def _where(adapter: Adapter) -> str:
    return adapter.source or adapter.name


Entries = list[tuple[float, "LoraWeight", "Adapter"]]


def read_entries(path: str, entries: Entries) -> Entries:
    """A `module_table` row with the module's values read (one module of each input in memory)."""
    return [(c, a.modules[path], a) for c, _, a in entries]


def combination_modules(terms: list[tuple[float, Adapter]]) -> Mapping[str, LoraWeight]:
    """The exact weighted sum of the terms, per module, built when a module is asked for:
    `[B_1 ... B_k] @ [c_1 s_1 A_1; ...; c_k s_k A_k]`."""
    from .lazy import LazyModules, meta_weight
    table = module_table([a for _, a in terms], [c for c, _ in terms])
    metas = {path: concat(path, [(c, meta_weight(x), a) for c, x, a in entries])    # meta tensors: no values
             for path, entries in table.items()}
    return LazyModules(metas, lambda path: concat(path, read_entries(path, table[path])))


def concat(path: str, entries: list[tuple[float, LoraWeight, Adapter]]) -> LoraWeight:
    """One module's exact weighted sum by concatenation, as PEFT's `cat`; each term's weight times scale is
    split as sqrt(|c s|) on both factors (sign on A), which keeps both in range when stored in float16."""
    for _, w, a in entries:
        _check_plain(a, path, w, "sum")
    splits = [split_weight(c * w.scale) for c, w, _ in entries]
    A = torch.cat([wa * w.A.float() for (wa, _), (_, w, _) in zip(splits, entries)], 0)
    B = torch.cat([wb * w.B.float() for (_, wb), (_, w, _) in zip(splits, entries)], 1)
    biases = [c * w.scale * w.bias.float() for c, w, _ in entries if w.bias is not None]
    return LoraWeight(A=A, B=B, scale=1.0, embedding=entries[0][1].embedding,
                      bias=torch.stack(biases).sum(0) if biases else None)


def as_weights(adapters: list[Adapter], weights: list[float] | Mapping[str, float] | None) -> list[float]:
    """Normalise the weights argument: None means 1.0 each; a mapping is keyed by adapter name."""
    from .errors import MethodError
    if weights is None:
        return [1.0] * len(adapters)
    try:
        if isinstance(weights, Mapping):
            unknown = set(weights) - {a.name for a in adapters}
            if unknown:
                raise MethodError(f"weights name unknown adapters: {sorted(unknown)}", key="weights")
            weights = [weights.get(a.name, 1.0) for a in adapters]
        weights = [float(w) for w in weights]
    except (TypeError, ValueError):
        raise MethodError(f"weights must be a list of numbers or a mapping of adapter name to number, got "
                          f"{weights!r}", key="weights") from None
    if len(weights) != len(adapters):
        raise MethodError(f"got {len(weights)} weights for {len(adapters)} adapters", key="weights")
    if not all(math.isfinite(w) for w in weights):
        raise MethodError(f"weights must be finite numbers, got {weights}", key="weights")
    return weights
