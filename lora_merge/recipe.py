"""YAML recipes: one file that says which adapters to merge, how, and where the result goes.

A recipe is validated in full before anything is loaded; every problem is reported at once, each with its
line and key. Relative paths in a recipe are relative to the recipe file, so a recipe works from any
directory. The schema (every key but `method` and `inputs` is optional):

    name: detox-math                    # the output adapter's name (title of its model card)
    method: ties                        # any `lora-merge methods` name, or `lorahub`
    parameters: {density: 0.5}          # the method's own parameters
    inputs:                             # adapters: a folder, a glob of folders, or a Hub id org/name[@revision]
      - adapter: adapters/math
        weight: 0.6                     # default 1.0
      - {adapter: org/code-lora@v2, name: code, weight: 0.4}
      - adapters/library/*              # shorthand: `adapter` only; a glob adds every folder it matches
    expression: 0.6*math + 0.4*code     # instead of per-input weights: arithmetic over the inputs' names
    base_model: org/base                # every input must have been trained on it
    rank: 16                            # output rank (or `energy: 0.99`)
    dtype: float16                      # storage dtype of the output (default: the inputs')
    seed: 0                             # for methods that draw random masks (DARE) and for searches
    device: auto                        # cpu | cuda | auto
    allow_base_mismatch: false
    output:
      path: out/detox-math              # the command line's -o wins
      metadata: {license: apache-2.0, tags: [math], description: "...", language: [en], datasets: [...]}

`method: lorahub` takes its parameters (`examples`, `budget`, `optimizer`, `compose`, `penalty`, `bounds`) from
`parameters` and needs `base_model`; its weights are searched, so inputs carry none.
"""

from __future__ import annotations

import difflib
import glob
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ExpressionError, LoraMergeError, MethodError, RecipeError
from .methods import METHODS

TOP_KEYS = ("name", "method", "parameters", "inputs", "expression", "base_model", "rank", "energy", "dtype",
            "seed", "device", "allow_base_mismatch", "output", "estimate")
INPUT_KEYS = ("adapter", "name", "weight", "revision", "fisher", "gram", "data")
# How `method: fisher` / `regmean` estimate an input's statistics from its `data` (see lora_merge.fisher).
ESTIMATE_PARAMS: dict[str, tuple[Any, Any]] = {
    "kind": (("expected", "sampled", "empirical"), "expected"),
    "space": (("factor", "delta"), "factor"),
    "n_examples": ("int", 256),
    "batch_size": ("int", 8),
    "seed": ("int", 0),
}
OUTPUT_KEYS = ("path", "metadata")
METADATA_KEYS = ("license", "tags", "description", "language", "datasets")
DTYPES = ("float32", "float16", "bfloat16")
DEVICES = ("cpu", "cuda", "auto")
# The LoraHub search (Huang et al., 2023): its parameters, defaults as in sail-sg/lorahub.
LORAHUB = "lorahub"
LORAHUB_PARAMS: dict[str, tuple[str, Any]] = {
    "examples": ("path", None),          # JSONL: {"input", "output"} or {"input", "options", "answer"}
    "budget": ("int", 40),
    "optimizer": (("cma", "cobyla"), "cma"),
    "compose": (("factor", "delta"), "factor"),
    "penalty": ("float", 0.05),
    "bounds": ("bounds", [-1.5, 1.5]),
}
_NAME = re.compile(r"^[A-Za-z_]\w*$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


@dataclass
class RecipeInput:
    name: str
    adapter: str                 # as written in the recipe
    source: str                  # a resolved local folder, or a Hub id
    revision: str | None = None
    weight: float | None = None
    line: int | None = None
    fisher: str | None = None    # method fisher: the input's Fisher file
    gram: str | None = None      # method regmean: the input's Gram file
    data: str | None = None      # either: the JSONL to estimate it from (with the recipe's base_model)


@dataclass
class Recipe:
    method: str
    inputs: list[RecipeInput]
    parameters: dict[str, Any] = field(default_factory=dict)
    name: str | None = None
    expression: str | None = None
    base_model: str | None = None
    rank: int | None = None
    energy: float | None = None
    dtype: str | None = None
    seed: int | None = None
    device: str = "cpu"
    allow_base_mismatch: bool = False
    output: Path | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    estimate: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    text: str = ""

    @property
    def weights(self) -> dict[str, float]:
        """Input name -> weight, from the expression or the inputs' `weight` (default 1.0)."""
        if self.expression:
            from .expr import parse
            return parse(self.expression, {i.name for i in self.inputs})
        return {i.name: 1.0 if i.weight is None else i.weight for i in self.inputs}

    @property
    def merge_params(self) -> dict[str, Any]:
        """The keyword arguments of `lora_merge.merge`: the method's parameters, rank, energy and seed."""
        p = dict(self.parameters)
        spec = METHODS.get(self.method)
        for key in ("rank", "energy", "seed"):
            value = getattr(self, key)
            if value is not None and (spec is None or key in spec.params):
                p[key] = value
        return p


# ---- reading ----------------------------------------------------------------------------------------------
def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read and validate a recipe file; a `RecipeError` lists every problem with its line."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"{path}: cannot read the recipe ({e.strerror or e})", file=str(path)) from None
    return parse_recipe(text, path)


def parse_recipe(text: str, path: str | os.PathLike | None = None) -> Recipe:
    """Validate recipe `text`; relative paths resolve against `path`'s folder (else the working directory)."""
    file = str(path) if path is not None else "<recipe>"
    data, lines, problems = _compose(text, file)
    check = _Checker(lines, problems, Path(path).resolve().parent if path is not None else Path.cwd())
    recipe = check.recipe(data)
    if check.problems:
        problems = sorted(check.problems, key=lambda p: (p[0] or 0, p[1]))
        listing = "\n".join(f"line {ln}, {key}: {msg}" if ln else f"{key}: {msg}" for ln, key, msg in problems)
        noun = "problem" if len(problems) == 1 else "problems"
        raise RecipeError(f"{file}: {len(problems)} {noun} in the recipe\n{listing}", file=file,
                          key=problems[0][1], problems=problems)
    recipe.path, recipe.text = (Path(path) if path is not None else None), text
    return recipe


def _compose(text: str, file: str) -> tuple[Any, dict[tuple, int], list]:
    """Parse YAML safely, keeping each value's line (1-based) under its key path; duplicate keys are problems."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        raise RecipeError(f"{file}: {where}not valid YAML ({getattr(e, 'problem', None) or e})", file=file) from None
    finally:
        loader.dispose()
    lines: dict[tuple, int] = {}
    problems: list = []

    def build(n, key: tuple):
        lines[key] = n.start_mark.line + 1
        if isinstance(n, yaml.MappingNode):
            out = {}
            for k_node, v_node in n.value:
                k = loader.construct_object(k_node, deep=True)
                if not isinstance(k, str):
                    problems.append((k_node.start_mark.line + 1, _dotted(key) or "recipe",
                                     f"keys must be strings, got {k!r}"))
                    continue
                if k in out:
                    problems.append((k_node.start_mark.line + 1, _dotted(key + (k,)), "given twice"))
                out[k] = build(v_node, key + (k,))
            return out
        if isinstance(n, yaml.SequenceNode):
            return [build(v, key + (i,)) for i, v in enumerate(n.value)]
        return loader.construct_object(n, deep=True)

    if node is None:
        raise RecipeError(f"{file}: the recipe is empty", file=file)
    try:
        return build(node, ()), lines, problems
    except yaml.YAMLError as e:        # e.g. a !!python tag, which the safe loader refuses to construct
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        raise RecipeError(f"{file}: {where}{getattr(e, 'problem', None) or e}", file=file) from None


def _dotted(key: tuple) -> str:
    out = ""
    for k in key:
        out += f"[{k}]" if isinstance(k, int) else (f".{k}" if out else k)
    return out


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


class _Checker:
    """Collects problems while turning the parsed YAML into a `Recipe`."""

    def __init__(self, lines: dict[tuple, int], problems: list, root: Path):
        self.lines, self.problems, self.root = lines, list(problems), root

    def bad(self, key: tuple, message: str) -> None:
        """A problem at `key`; a missing key is reported by its name, at the line of its nearest parent."""
        where, line = key, self.lines.get(key)
        while line is None and where:
            where = where[:-1]
            line = self.lines.get(where)
        self.problems.append((line, _dotted(key) if key else "recipe", message))

    def mapping(self, value, key: tuple, allowed) -> dict:
        if not isinstance(value, dict):
            self.bad(key, f"expected a mapping of keys to values, got {_kind(value)}")
            return {}
        for k in value:
            if k not in allowed:
                self.bad(key + (k,), f"unknown key{_suggest(k, allowed)}; allowed: {', '.join(allowed)}")
        return value

    def typed(self, data: dict, key: tuple, want: str, check: Callable[[Any], bool] | None = None,
              why: str = ""):
        """data[key[-1]] if present and of the wanted kind ('str', 'int', 'float', 'bool'), else None."""
        if key[-1] not in data or data[key[-1]] is None:
            return None
        value = data[key[-1]]
        ok = {"str": isinstance(value, str),
              "int": isinstance(value, int) and not isinstance(value, bool),
              "float": isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
              "bool": isinstance(value, bool)}[want]
        if not ok:
            self.bad(key, f"expected {'a number' if want == 'float' else want}, got {_kind(value)}")
            return None
        if check is not None and not check(value):
            self.bad(key, why)
            return None
        return float(value) if want == "float" else value

    def recipe(self, data) -> Recipe:
        data = self.mapping(data, (), TOP_KEYS)
        method = self.method(data)
        inputs = self.inputs(data.get("inputs"), method, bool(data.get("base_model")))
        recipe = Recipe(method=method or "", inputs=inputs)
        recipe.name = self.typed(data, ("name",), "str")
        recipe.base_model = self.typed(data, ("base_model",), "str")
        recipe.rank = self.typed(data, ("rank",), "int", lambda v: v >= 1, "must be >= 1")
        recipe.energy = self.typed(data, ("energy",), "float", lambda v: 0 < v <= 1, "must be in (0, 1]")
        recipe.dtype = self.typed(data, ("dtype",), "str", lambda v: v in DTYPES, f"must be one of {list(DTYPES)}")
        recipe.seed = self.typed(data, ("seed",), "int", lambda v: 0 <= v < 2**63, "must be in [0, 2**63)")
        recipe.device = self.typed(data, ("device",), "str", lambda v: v in DEVICES,
                                   f"must be one of {list(DEVICES)}") or "cpu"
        recipe.allow_base_mismatch = bool(self.typed(data, ("allow_base_mismatch",), "bool"))
        recipe.parameters = self.parameters(data, method)
        recipe.expression = self.expression(data, inputs)
        self.output(data, recipe)
        spec = METHODS.get(method or "")
        for key in ("rank", "energy"):
            if getattr(recipe, key) is not None and ((spec is not None and key not in spec.params)
                                                     or method == LORAHUB):
                self.bad((key,), f"method '{method}' takes no {key} (its output is exact)")
        if recipe.output is not None and recipe.output == self.root:
            self.bad(("output", "path"), "is the recipe's own folder; give a new folder for the output")
        if method == LORAHUB and not recipe.base_model:
            self.bad(("method",), "lorahub scores candidates with the base model; give base_model")
        if method == LORAHUB and recipe.expression:
            self.bad(("expression",), "lorahub searches the weights; remove the expression")
        recipe.estimate = self.estimate(data, recipe, spec)
        return recipe

    def estimate(self, data: dict, recipe: Recipe, spec) -> dict:
        """The `estimate` settings of the methods weighted by data (each input's statistics: `inputs`)."""
        needs = getattr(spec, "needs", None)
        given = data.get("estimate")
        if given is None:
            return {k: default for k, (_, default) in ESTIMATE_PARAMS.items()}
        given = self.mapping(given, ("estimate",), ESTIMATE_PARAMS)
        if not needs:
            self.bad(("estimate",), f"method '{recipe.method}' estimates nothing (fisher and regmean do)")
        out = {}
        for k, (kind, default) in ESTIMATE_PARAMS.items():
            if isinstance(kind, tuple):
                out[k] = self.typed(given, ("estimate", k), "str", lambda v, c=kind: v in c,
                                    f"must be one of {list(kind)}")
            else:
                least = 0 if k == "seed" else 1
                out[k] = self.typed(given, ("estimate", k), "int", lambda v, least=least: v >= least,
                                    f"must be >= {least}")
            out[k] = default if out[k] is None else out[k]
        return out

    def method(self, data: dict) -> str | None:
        if "method" not in data:
            self.bad(("method",), f"missing; one of: {', '.join(sorted(METHODS) + [LORAHUB])}")
            return None
        method = self.typed(data, ("method",), "str")
        if method is not None and method not in METHODS and method != LORAHUB:
            self.bad(("method",), f"unknown merge method '{method}'{_suggest(method, [*METHODS, LORAHUB])}; "
                                  "`lora-merge methods` lists them")
            return None
        return method

    def parameters(self, data: dict, method: str | None) -> dict:
        given = data.get("parameters")
        given = {} if given is None else given
        if not isinstance(given, dict):
            self.bad(("parameters",), f"expected a mapping of parameter names to values, got {_kind(given)}")
            return {}
        if method is None:
            return dict(given)
        if method == LORAHUB:
            return self.lorahub_parameters(given)
        spec = METHODS[method]
        out = {}
        for k, v in given.items():
            key = ("parameters", k)
            if k in ("rank", "energy", "seed"):
                self.bad(key, f"{k} is a top-level key of the recipe; move it there")
            elif k not in spec.params:
                self.bad(key, f"method '{method}' has no parameter '{k}'{_suggest(k, spec.params)}; "
                              f"its parameters: {', '.join(p for p in spec.params if p not in ('rank', 'energy'))}")
            else:
                try:
                    out[k] = spec.check(k, v)
                except MethodError as e:
                    self.bad(key, str(e).removeprefix(f"method '{method}': "))
        for name, p in spec.params.items():
            if p.required and name not in given:
                self.bad(("method",), f"method '{method}' needs the parameter '{name}' ({p.help}) under parameters")
        return out

    def lorahub_parameters(self, given: dict) -> dict:
        out = {}
        for k, v in given.items():
            key = ("parameters", k)
            if k not in LORAHUB_PARAMS:
                self.bad(key, f"lorahub has no parameter '{k}'{_suggest(k, LORAHUB_PARAMS)}; "
                              f"its parameters: {', '.join(LORAHUB_PARAMS)}")
                continue
            kind = LORAHUB_PARAMS[k][0]
            if isinstance(kind, tuple):
                if v not in kind:
                    self.bad(key, f"must be one of {list(kind)}, got {v!r}")
                    continue
            elif kind == "bounds":
                if not (isinstance(v, list) and len(v) == 2 and all(_number(x) for x in v) and v[0] < v[1]):
                    self.bad(key, f"expected [low, high] with low < high, got {v!r}")
                    continue
            elif kind == "path":
                if not isinstance(v, str):
                    self.bad(key, f"expected a path to a JSONL file, got {_kind(v)}")
                    continue
                v = os.path.normpath(self.root / Path(v).expanduser())
                if not Path(v).is_file():
                    self.bad(key, f"{v}: no such file")
                    continue
            elif kind == "int" and not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                self.bad(key, f"expected a positive integer, got {v!r}")
                continue
            elif kind == "float" and not (_number(v) and v >= 0):
                self.bad(key, f"expected a number >= 0, got {v!r}")
                continue
            out[k] = v
        if "examples" not in given:
            self.bad(("parameters",), "lorahub needs `examples`, a JSONL file of a few examples of the new task")
        return {k: out.get(k, default) for k, (_, default) in LORAHUB_PARAMS.items()}

    def inputs(self, given, method: str | None, has_base: bool = False) -> list[RecipeInput]:
        if given is None:
            self.bad(("inputs",), "missing; list the adapters to merge")
            return []
        if not isinstance(given, list) or not given:
            self.bad(("inputs",), f"expected a non-empty list of adapters, got {_kind(given)}")
            return []
        out: list[RecipeInput] = []
        for i, item in enumerate(given):
            key = ("inputs", i)
            if isinstance(item, str):
                item = {"adapter": item}
            item = self.mapping(item, key, INPUT_KEYS)
            adapter = self.typed(item, key + ("adapter",), "str")
            if "adapter" not in item:
                self.bad(key, "missing `adapter` (a folder, a glob of folders, or a Hub id org/name[@revision])")
            name = self.typed(item, key + ("name",), "str", lambda v: bool(_NAME.match(v)),
                              "must be a name usable in an expression (letters, digits, _)")
            weight = self.typed(item, key + ("weight",), "float")
            revision = self.typed(item, key + ("revision",), "str")
            files = {k: self.file(item, key + (k,)) for k in ("fisher", "gram", "data")}
            self.input_statistics(files, method, has_base, key)
            if weight is not None and method == LORAHUB:
                self.bad(key + ("weight",), "lorahub searches the weights; remove it")
            if adapter is None:
                continue
            if name is not None and is_glob(adapter):
                self.bad(key + ("name",), "a glob adds several inputs, each named after its folder; remove `name`")
                name = None
            if any(files.values()) and is_glob(adapter):
                self.bad(key, "a glob adds several inputs; give each its own statistics, not one for all")
            for source, rev in self.sources(adapter, revision, key + ("adapter",)):
                default = _input_name(source if not _is_hub(source) else adapter)
                out.append(RecipeInput(name=name or default, adapter=adapter, source=source,
                                       revision=rev, weight=weight, line=self.lines.get(key), **files))
        seen: dict[str, int] = {}
        for i, inp in enumerate(out):
            if inp.name in seen:
                self.bad(("inputs",), f"two inputs are named '{inp.name}' (lines {out[seen[inp.name]].line} and "
                                      f"{inp.line}); give them distinct `name`s")
            seen.setdefault(inp.name, i)
        return out

    def input_statistics(self, files: dict, method: str | None, has_base: bool, key: tuple) -> None:
        """An input's `fisher` / `gram` file or `data` suit its method (fisher / regmean), and `data` has a base."""
        needs = getattr(METHODS.get(method or ""), "needs", None)
        for field_, value in files.items():
            if value is None:
                continue
            if needs is None or field_ not in (needs, "data"):
                uses = "method fisher uses `fisher`" if field_ == "fisher" else (
                    "method regmean uses `gram`" if field_ == "gram" else "methods fisher and regmean use `data`")
                self.bad(key + (field_,), f"method '{method}' takes no statistics ({uses})")
            elif field_ == "data" and not has_base:
                self.bad(key + ("data",), "estimating from data needs the base model; give base_model")

    def file(self, item: dict, key: tuple) -> str | None:
        """An existing file named by `item[key[-1]]`, relative to the recipe's folder."""
        given = self.typed(item, key, "str")
        if given is None:
            return None
        local = Path(os.path.normpath(self.root / Path(given).expanduser()))
        if not local.is_file():
            self.bad(key, f"{local}: no such file")
        return str(local)

    def sources(self, adapter: str, revision: str | None, key: tuple) -> list[tuple[str, str | None]]:
        """The folders (or the Hub id) an `adapter` entry stands for."""
        local = Path(os.path.normpath(self.root / Path(adapter).expanduser()))
        if is_glob(adapter):
            found = sorted(p for p in glob.glob(str(local)) if Path(p).is_dir())
            if not found:
                self.bad(key, f"{local}: the pattern matches no folder")
            if revision is not None:
                self.bad(key, "a revision applies to Hub ids only, and this is a pattern of local folders")
            return [(p, None) for p in found]
        if local.exists():
            if not local.is_dir():
                self.bad(key, f"{local}: expected a PEFT adapter folder, found a file")
            if revision is not None:
                self.bad(key, "a revision applies to Hub ids only, and this is a local folder")
            return [(str(local), None)]
        if _is_hub(adapter) and not adapter.startswith((".", "/", "~")):
            repo, _, rev = adapter.partition("@")
            if rev and revision and rev != revision:
                self.bad(key, f"revision given twice: @{rev} and revision: {revision}")
            return [(repo, rev or revision)]
        self.bad(key, f"{local}: no such adapter folder (nor a Hub id org/name[@revision])")
        return []

    def expression(self, data: dict, inputs: list[RecipeInput]) -> str | None:
        expression = self.typed(data, ("expression",), "str")
        if expression is None:
            return None
        weighted = [i for i in inputs if i.weight is not None]
        if weighted:
            self.bad(("expression",), f"give weights either by expression or per input, not both "
                                      f"(input '{weighted[0].name}' has a weight)")
        try:
            from .expr import parse
            used = parse(expression, {i.name for i in inputs})
        except ExpressionError as e:
            self.bad(("expression",), str(e).split("\n")[0])
            return expression
        unused = [i.name for i in inputs if i.name not in used]
        if unused:
            self.bad(("expression",), f"does not use the input(s) {', '.join(unused)}; use them or remove them")
        return expression

    def output(self, data: dict, recipe: Recipe) -> None:
        if data.get("output") is None:
            return
        out = self.mapping(data["output"], ("output",), OUTPUT_KEYS)
        path = self.typed(out, ("output", "path"), "str", lambda v: bool(v.strip()), "must not be empty")
        if path is not None:
            recipe.output = Path(os.path.normpath(self.root / Path(path).expanduser()))
        meta = out.get("metadata")
        if meta is None:
            return
        meta = self.mapping(meta, ("output", "metadata"), METADATA_KEYS)
        for k, v in meta.items():
            if k not in METADATA_KEYS:
                continue
            key = ("output", "metadata", k)
            if k in ("license", "description"):
                if self.typed(meta, key, "str") is not None:
                    recipe.metadata[k] = v
            elif isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v)):
                recipe.metadata[k] = [v] if isinstance(v, str) else list(v)
            else:
                self.bad(key, f"expected a string or a list of strings, got {_kind(v)}")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _kind(value) -> str:
    if value is None:
        return "nothing"
    return {dict: "a mapping", list: "a list", str: f"the text {value!r}", bool: f"{value}"}.get(
        type(value), f"{type(value).__name__} {value!r}")


def is_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def _is_hub(text: str) -> bool:
    return bool(_HUB_ID.match(text))


def _input_name(source: str) -> str:
    """A default input name usable in expressions: the folder (or repo) name with other characters as '_'."""
    stem = Path(source.split("@")[0].rstrip("/")).name
    name = re.sub(r"\W", "_", stem)
    return name if _NAME.match(name) else f"_{name}"


__all__ = ["Recipe", "RecipeInput", "load_recipe", "parse_recipe", "LoraMergeError"]
