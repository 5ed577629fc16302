"""Running a recipe: load its inputs, merge, save; or describe what a run would do (`plan`, for --dry-run)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from .adapter import Adapter, check_compatible, module_table
from .errors import BaseModelMismatchError, LoraMergeError, OutputExistsError
from .io import load
from .merge import check_equal_ranks, merge, resolve_device
from .methods import get_method
from .recipe import LORAHUB, Recipe, is_glob


class Steps:
    """Progress hooks; the CLI draws them with rich. `start` a stage of `total` items, `advance` one."""

    def start(self, stage: str, total: int) -> None:
        pass

    def advance(self, stage: str, item: str) -> None:
        pass


def load_inputs(recipe: Recipe, steps: Steps | None = None) -> list[Adapter]:
    """Load every input of the recipe, and check them against its `base_model`."""
    steps = steps or Steps()
    steps.start("load", len(recipe.inputs))
    adapters = []
    for inp in recipe.inputs:
        try:
            adapter = load(inp.source, name=inp.name, revision=inp.revision)
        except LoraMergeError as e:
            raise type(e)(f"{_where(recipe, inp.line)}: input '{inp.name}': {e}", file=e.file, module=e.module,
                          key=e.key) from None
        if (recipe.base_model and adapter.base_model and not _same_base(adapter.base_model, recipe.base_model)
                and not recipe.allow_base_mismatch):
            raise BaseModelMismatchError(
                f"{_where(recipe, inp.line)}: input '{inp.name}' ({inp.source}) was trained on {adapter.base_model}, "
                f"but the recipe's base_model is {recipe.base_model}; set allow_base_mismatch: true if you mean it",
                file=inp.source, key="base_model")
        adapters.append(adapter)
        steps.advance("load", inp.name)
    check_compatible(adapters, recipe.allow_base_mismatch)
    return adapters


def _same_base(recorded: str, given: str) -> bool:
    """The adapter's recorded base model is the recipe's: the same id, or a local copy named like the repo
    (`/models/SmolLM2-135M-Instruct` for `HuggingFaceTB/SmolLM2-135M-Instruct`)."""
    return recorded == given or Path(given.rstrip("/")).name == recorded.rstrip("/").split("/")[-1]


def _where(recipe: Recipe, line: int | None) -> str:
    return f"{recipe.path or '<recipe>'}" + (f", line {line}" if line else "")


def _without_output(recipe: Recipe, target: Path | None) -> Recipe:
    """A glob must not take in the output of an earlier run of the same recipe."""
    if target is None:
        return recipe
    keep = [i for i in recipe.inputs if not (is_glob(i.adapter) and Path(i.source).resolve() == target.resolve())]
    return recipe if len(keep) == len(recipe.inputs) else dataclasses.replace(recipe, inputs=keep)


def output_path(recipe: Recipe, out: str | os.PathLike | None) -> Path:
    if out is not None:
        return Path(out)
    if recipe.output is not None:
        return recipe.output
    raise LoraMergeError(f"{recipe.path or '<recipe>'}: no output folder; pass -o OUT or set output.path",
                         file=str(recipe.path) if recipe.path else None, key="output")


def plan(recipe: Recipe, out: str | os.PathLike | None = None, *, device: str | None = None) -> dict:
    """What `run` would do, without computing: inputs, modules, ranks, method and output. Loads the inputs."""
    target = None
    try:
        target = output_path(recipe, out)
    except LoraMergeError:
        pass
    recipe = _without_output(recipe, target)
    adapters = load_inputs(recipe)
    weights = recipe.weights
    w = [weights.get(i.name, 0.0) for i in recipe.inputs] if recipe.method != LORAHUB else [None] * len(adapters)
    table = module_table(adapters, [1.0] * len(adapters))
    shapes: dict[str, int] = {}
    for entries in table.values():
        key = "x".join(map(str, entries[0][1].shape))
        shapes[key] = shapes.get(key, 0) + 1
    if recipe.method == LORAHUB:      # LoraHub's factor composition keeps the rank; the exact delta adds them
        params = dict(recipe.parameters)
        ranks = [x.rank for entries in table.values() for _, x, _ in entries]
        rank = recipe.rank or (max(ranks) if params.get("compose") == "factor" else None)
    else:
        spec = get_method(recipe.method)
        params = spec.resolve(recipe.merge_params)
        rank = params.get("rank")
        if spec.family == "factor":       # element-wise on the factors: equal ranks in, the same rank out
            for path, entries in table.items():
                check_equal_ranks(spec.name, path, entries)
            if rank is None and params.get("energy") is None:
                rank = max(x.rank for entries in table.values() for _, x, _ in entries)
        if rank is None and spec.default_rank == "max" and params.get("energy") is None:
            rank = max(x.rank for entries in table.values() for _, x, _ in entries)
    return {
        "recipe": str(recipe.path) if recipe.path else None,
        "name": recipe.name,
        "method": recipe.method,
        "parameters": params,
        "base_model": recipe.base_model or next((a.base_model for a in adapters if a.base_model), None),
        "device": str(resolve_device(device or recipe.device)),
        "inputs": [{"name": i.name, "source": i.source, "revision": i.revision, "weight": wi,
                    "base_model": a.base_model, "modules": len(a.metas),
                    "ranks": sorted({x.rank for x in a.metas.values()}), "dtype": str(a.dtype).removeprefix("torch.")}
                   for i, a, wi in zip(recipe.inputs, adapters, w)],
        "modules": len(table),
        "shapes": shapes,
        "output": {"path": str(target) if target else None, "exists": bool(target and target.exists()),
                   "rank": rank if rank is not None else ("per module, by energy" if params.get("energy")
                                                           else "sum of the input ranks"),
                   "dtype": recipe.dtype or str(adapters[0].dtype if len({a.dtype for a in adapters}) == 1
                                                else "float32").removeprefix("torch.")},
    }


def run(recipe: Recipe, out: str | os.PathLike | None = None, *, force: bool = False, device: str | None = None,
        steps: Steps | None = None) -> tuple[Adapter, Path]:
    """Run the recipe: merge its inputs and save the result as a PEFT folder. Returns (adapter, folder)."""
    steps = steps or Steps()
    target = output_path(recipe, out)
    if target.exists() and not force:                 # before any loading: fail fast
        raise OutputExistsError(f"{target}: already exists; pass --force to overwrite it", file=str(target))
    dev = resolve_device(device or recipe.device)
    recipe = _without_output(recipe, target)
    adapters = load_inputs(recipe, steps)
    if recipe.method == LORAHUB:
        return _search(recipe, adapters, target, force, dev, steps)
    weights = recipe.weights
    stats = statistics(recipe, adapters, dev, steps)
    n_modules = len(set().union(*(a.modules for a in adapters)))
    steps.start("merge", n_modules)
    merged = merge(adapters, [weights.get(i.name, 0.0) for i in recipe.inputs], recipe.method, **stats,
                   name=recipe.name or (recipe.path.stem if recipe.path else None),
                   allow_base_mismatch=recipe.allow_base_mismatch, device=dev,
                   progress=lambda m: steps.advance("merge", m), **recipe.merge_params)
    merged.provenance["recipe"] = recipe.text or None
    merged.provenance["metadata"] = dict(recipe.metadata)
    merged.save(target, force=force, dtype=recipe.dtype)
    return merged, target


def statistics(recipe: Recipe, adapters: list[Adapter], device, steps: Steps) -> dict:
    """`fishers=` / `grams=` for `merge`, for a method weighted by data: each input's file as the recipe names
    it, or estimated from its `data` (the base model loaded once for all), or left to `merge` (the file beside
    the adapter)."""
    spec = get_method(recipe.method)
    if not spec.needs:
        return {}
    given = {i.name: getattr(i, spec.needs) for i in recipe.inputs if getattr(i, spec.needs)}
    todo = [(i, a) for i, a in zip(recipe.inputs, adapters) if i.name not in given and i.data]
    if todo:
        from .fisher import estimate_many
        e = recipe.estimate
        steps.start("estimate", len(todo))
        found = estimate_many(recipe.base_model, [a for _, a in todo], [i.data for i, _ in todo],
                              n_examples=e["n_examples"], kind=e["kind"], space=e["space"],
                              batch_size=e["batch_size"], seed=e["seed"], device=device, gram=spec.needs == "gram")
        for (i, _), F in zip(todo, found):
            given[i.name] = F
            steps.advance("estimate", i.name)
    return {spec.needs + "s": given} if given else {}


def _search(recipe: Recipe, adapters: list[Adapter], target: Path, force: bool, device, steps: Steps
            ) -> tuple[Adapter, Path]:
    """`method: lorahub`: search the weights on the recipe's examples, then save the composition."""
    from .lorahub import search
    p = recipe.parameters
    steps.start("search", p["budget"])
    done = [0]

    def progress(n: int, total: int, best: float) -> None:
        for _ in range(n - done[0]):
            steps.advance("search", f"best {best:.4f}")
        done[0] = n

    result = search(recipe.base_model, adapters, p["examples"], budget=p["budget"], seed=recipe.seed or 0,
                    optimizer=p["optimizer"], compose=p["compose"], penalty=p["penalty"], bounds=tuple(p["bounds"]),
                    device=device, name=recipe.name or (recipe.path.stem if recipe.path else None), progress=progress)
    result.adapter.provenance["recipe"] = recipe.text or None
    result.adapter.provenance["metadata"] = dict(recipe.metadata)
    return result.adapter, result.save(target, force=force, dtype=recipe.dtype)


__all__ = ["plan", "run", "load_inputs", "output_path", "Steps"]
