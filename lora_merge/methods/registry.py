"""The registry of merge methods: name -> family, tensor operation and declared parameters.

A method belongs to one of three families, which say where it works:

- `exact`:  on the factors, exactly (concatenation); optional factored SVD to a rank or energy.
- `factor`: PEFT's element-wise methods: the operation runs on the stacked A matrices and, separately, on the
            stacked B matrices (so the result has cross terms B_i A_j by design).
- `dense`:  the operation runs on the stacked dense deltas `s_i B_i A_i` of one module, and the result is
            re-factored by SVD.
- `data`:   weighted by statistics of each input's data (`needs`: "fisher" or "gram", see `lora_merge.fisher`);
            the operation takes one module's inputs and their statistics and returns factors, or a dense delta
            that is re-factored by SVD.

The tensor operations (`op`) take a stack `(K, ...)` and weights `(K,)`; their keyword-only parameters are
the method's parameters, read from the signature, so the CLI, recipes and docs list them from one place.
"""

from __future__ import annotations

import inspect
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import MethodError

FAMILIES = ("exact", "factor", "dense", "data")
HELP = {
    "rank": "output rank (re-factor by SVD); default: the method's own",
    "energy": "keep the smallest rank holding this share of the squared singular values, per module",
    "density": "share of entries kept by pruning, in [0, 1]",
    "majority_sign_method": "how TIES elects each entry's sign: 'total' (sign of the sum) or 'frequency'",
    "seed": "seed of DARE's random masks",
    "normalize": "fisher: divide each input's Fisher by its global L2 norm, as the original does",
    "floor": "fisher: Fisher values below this are raised to it (no zero weights)",
    "favor_target": "fisher: floor only the first ('target') input's Fisher, as the original's default",
    "alpha": "regmean: the share of the Gram matrices' off-diagonal entries kept (1: plain RegMean)",
    "svd": "re-factoring of the dense deltas: 'exact' (thin SVD), 'randomized' (top rank only, much faster on "
           "large matrices), or 'auto' (randomized where only the top rank of a large matrix is needed)",
}


@dataclass(frozen=True)
class Param:
    name: str
    type: Any
    default: Any = None
    required: bool = False
    help: str = ""

    @property
    def choices(self) -> tuple | None:
        return typing.get_args(self.type) if typing.get_origin(self.type) is Literal else None


@dataclass(frozen=True)
class MergeMethod:
    name: str
    family: str
    summary: str
    op: Callable | None = None
    split: str = "peft"              # factor family: how weight and scale are shared between A and B
    default_rank: str | None = None  # "max": the largest input rank, as PEFT's svd types
    url: str | None = None
    params: dict[str, Param] = field(default_factory=dict)
    needs: str | None = None         # data family: the statistic each input brings ("fisher" or "gram")

    @property
    def uses_rng(self) -> bool:
        return self.op is not None and "rng" in inspect.signature(self.op).parameters

    def resolve(self, given: dict[str, Any]) -> dict[str, Any]:
        """Check `given` against the declared parameters; return every parameter with its value."""
        unknown = sorted(set(given) - set(self.params))
        if unknown:
            raise MethodError(f"method '{self.name}' has no parameter {', '.join(map(repr, unknown))}; "
                              f"its parameters are: {', '.join(self.params) or 'none'}", key=unknown[0])
        out = {}
        for p in self.params.values():
            value = given.get(p.name, p.default)
            if value is None:
                if p.required:
                    raise MethodError(f"method '{self.name}' needs the parameter '{p.name}' ({p.help})",
                                      key=p.name)
                out[p.name] = None
                continue
            out[p.name] = _check(self.name, p, value)
        return out

    def check(self, name: str, value: Any) -> Any:
        """One parameter's value, checked and converted (MethodError if it is not valid)."""
        return _check(self.name, self.params[name], value)


def _check(method: str, p: Param, value: Any) -> Any:
    choices = p.choices
    if choices is not None:
        if value not in choices:
            raise MethodError(f"method '{method}': {p.name} must be one of {list(choices)}, got {value!r}", key=p.name)
        return value
    base = [t for t in typing.get_args(p.type) if t is not type(None)] or [p.type]
    kind = base[0]
    try:
        if kind is bool:
            value = _boolean(value)
        elif kind is int:
            if isinstance(value, bool) or float(value) != int(value):
                raise ValueError
            value = int(value)
        elif kind is float:
            if isinstance(value, bool):
                raise ValueError
            value = float(value)
    except (TypeError, ValueError, OverflowError):
        raise MethodError(f"method '{method}': {p.name} must be {kind.__name__}, got {value!r}", key=p.name) from None
    if isinstance(value, float) and not math.isfinite(value):
        raise MethodError(f"method '{method}': {p.name} must be finite, got {value!r}", key=p.name)
    if p.name == "seed" and not 0 <= value < 2**63:
        raise MethodError(f"method '{method}': seed must be in [0, 2**63), got {value}", key=p.name)
    if p.name == "density" and not 0.0 <= value <= 1.0:
        raise MethodError(f"method '{method}': density must be in [0, 1], got {value}", key=p.name)
    if p.name == "rank" and value < 1:
        raise MethodError(f"method '{method}': rank must be >= 1, got {value}", key=p.name)
    if p.name == "energy" and not 0.0 < value <= 1.0:
        raise MethodError(f"method '{method}': energy must be in (0, 1], got {value}", key=p.name)
    return value


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    raise ValueError


METHODS: dict[str, MergeMethod] = {}


def register(name: str, *, family: str, summary: str, op: Callable | None = None, split: str = "peft",
             default_rank: str | None = None, url: str | None = None, needs: str | None = None) -> MergeMethod:
    """Declare a method. Its parameters: those of `op` (keyword-only), `seed` if `op` takes `rng`, and the
    output `rank` / `energy` that every method but `cat` accepts."""
    assert family in FAMILIES, family
    assert (family == "data") == (needs in ("fisher", "gram")), (family, needs)
    params: dict[str, Param] = {}
    if op is not None:
        hints = typing.get_type_hints(op)
        for p in inspect.signature(op).parameters.values():
            if p.kind is not inspect.Parameter.KEYWORD_ONLY or p.name == "rng":
                continue
            required = p.default is inspect.Parameter.empty
            params[p.name] = Param(p.name, hints.get(p.name, Any), None if required else p.default, required,
                                   HELP.get(p.name, ""))
        if "rng" in inspect.signature(op).parameters:
            params["seed"] = Param("seed", int, 0, False, HELP["seed"])
    if name != "cat":
        params["rank"] = Param("rank", int | None, None, False, HELP["rank"])
        params["energy"] = Param("energy", float | None, None, False, HELP["energy"])
    if family == "dense" or needs == "fisher":       # a Fisher in delta space gives a dense delta
        params["svd"] = Param("svd", Literal["auto", "exact", "randomized"], "auto", False, HELP["svd"])
    method = MergeMethod(name, family, summary, op, split, default_rank, url, params, needs)
    METHODS[name] = method
    return method


def get_method(name: str) -> MergeMethod:
    if name not in METHODS:
        import difflib
        close = difflib.get_close_matches(name, METHODS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise MethodError(f"unknown merge method '{name}'{hint}; known methods: {', '.join(sorted(METHODS))}",
                          key="method")
    return METHODS[name]
