"""`lora-merge merge RECIPE`, `lora-merge compose EXPR`, `lora-merge methods`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._common import (
    AllowPickle,
    Device,
    Force,
    Json,
    Out,
    Private,
    PushTo,
    Quiet,
    RichSteps,
    check_dtype,
    check_push_target,
    command,
    emit_json,
    hub_progress,
    shown,
    stdout_console,
)


def _summary(adapter, out: Path, pushed: str | None) -> dict:
    ranks = sorted({w.rank for w in adapter.metas.values()})
    prov = adapter.provenance or {}
    return {"output": str(out), "name": adapter.name, "method": prov.get("method"),
            "parameters": prov.get("params"), "modules": len(adapter.modules), "ranks": ranks,
            "inputs": [{k: rec.get(k) for k in ("name", "source", "revision", "weight")}
                       for rec in prov.get("inputs") or []],
            "pushed": pushed}


def _report(summary: dict, as_json: bool) -> None:
    if as_json:
        emit_json(summary)
        return
    ranks = summary["ranks"]
    rank = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}..{ranks[-1]}"
    typer.echo(f"saved {summary['output']} ({summary['method']}, {summary['modules']} modules, {rank})")
    if summary["pushed"]:
        typer.echo(f"pushed {summary['pushed']}")


def _push(out: Path, repo_id: str | None, private: bool, quiet: bool) -> str | None:
    if not repo_id:
        return None
    from ..hub import push
    hub_progress(quiet)
    return push(out, repo_id, private=private or None)


@command
def merge(
    recipe: Annotated[Path, typer.Argument(metavar="RECIPE", help="A YAML recipe (see recipes/ for examples to "
                                           "copy).", show_default=False)],
    out: Out = None,
    device: Device = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the resolved plan; compute nothing.")] = False,
    force: Force = False,
    push_to_hub: PushTo = None,
    private: Private = False,
    as_json: Json = False,
    quiet: Quiet = False,
) -> None:
    """Run a merge recipe and save the result as a PEFT adapter folder.

    \b
    Examples:
      lora-merge merge recipes/task_arithmetic.yaml -o out/task_arithmetic
      lora-merge merge recipes/ties.yaml --dry-run
      lora-merge merge my_recipe.yaml -o out/merged --push-to-hub me/merged-lora --private
    """
    from ..recipe import load_recipe
    from ..runner import plan, run

    check_push_target(push_to_hub)
    parsed = load_recipe(recipe)
    if dry_run:
        hub_progress(quiet)
        _show_plan(plan(parsed, out, device=device), as_json)
        return
    hub_progress(quiet)
    with RichSteps(quiet) as steps:
        adapter, target = run(parsed, out, force=force, device=device, steps=steps)
    _report(_summary(adapter, target, _push(target, push_to_hub, private, quiet)), as_json)


def _show_plan(p: dict, as_json: bool) -> None:
    if as_json:
        emit_json(p)
        return
    from rich.table import Table
    console = stdout_console()
    params = ", ".join(f"{k}={shown(v) if k == 'examples' else v}" for k, v in p["parameters"].items()
                       if v is not None)
    console.print(f"plan for {p['recipe']} (dry run: nothing is computed or written)", highlight=False)
    console.print(f"method: {p['method']}{f' ({params})' if params else ''}; device: {p['device']}; "
                  f"base model: {p['base_model']}", highlight=False)
    table = Table("input", "weight", "source", "revision", "modules", "ranks", "dtype")
    for i in p["inputs"]:
        weight = "searched" if i["weight"] is None else f"{i['weight']:g}"
        table.add_row(i["name"], weight, shown(i["source"]), i["revision"] or "", str(i["modules"]),
                      ",".join(map(str, i["ranks"])), i["dtype"])
    console.print(table)
    shapes = ", ".join(f"{n} x {s}" for s, n in p["shapes"].items())
    console.print(f"modules: {p['modules']} ({shapes})", highlight=False)
    o = p["output"]
    note = " (exists: needs --force)" if o["exists"] else ""
    console.print(f"output: {shown(o['path']) or '(give -o OUT)'}{note}; rank: {o['rank']}; dtype: {o['dtype']}",
                  highlight=False)


@command
def compose(
    expression: Annotated[str, typer.Argument(metavar="EXPRESSION", help="e.g. '0.6*math + 0.4*code - 0.3*toxic'",
                                              show_default=False)],
    adapter: Annotated[list[str], typer.Option("-a", "--adapter", metavar="NAME=PATH_OR_REPO",
                                               help="An adapter and its name in the expression; repeat it.",
                                               show_default=False)],
    out: Annotated[Path, typer.Option("-o", "--out", metavar="OUT", help="Output folder (PEFT adapter).",
                                      show_default=False)],
    method: Annotated[str, typer.Option(help="Merge method applied with the expression's weights.")] = "sum",
    rank: Annotated[int | None, typer.Option(help="Output rank (factored SVD).")] = None,
    energy: Annotated[float | None, typer.Option(help="Keep this share of squared singular values.")] = None,
    density: Annotated[float | None, typer.Option(help="For ties / dare / magnitude_prune.")] = None,
    param: Annotated[list[str] | None, typer.Option("-p", "--param", metavar="KEY=VALUE",
                                                    help="Any parameter of the method; repeat it.")] = None,
    dtype: Annotated[str | None, typer.Option(metavar="DTYPE", help="Storage dtype: float32, float16 or "
                                              "bfloat16 (default: the inputs').")] = None,
    fisher: Annotated[list[str] | None, typer.Option("--fisher", metavar="NAME=FILE", help="--method fisher: an "
                                                     "adapter's Fisher file (default: fisher.safetensors beside "
                                                     "it); repeat it.", show_default=False)] = None,
    gram: Annotated[list[str] | None, typer.Option("--gram", metavar="NAME=FILE", help="--method regmean: an "
                                                   "adapter's Gram file (default: fisher.gram.safetensors beside "
                                                   "it); repeat it.", show_default=False)] = None,
    allow_pickle: AllowPickle = False,
    device: Device = None,
    allow_base_mismatch: Annotated[bool, typer.Option("--allow-base-mismatch", help="Merge adapters trained on "
                                                      "different base models (same architecture).")] = False,
    force: Force = False,
    push_to_hub: PushTo = None,
    private: Private = False,
    as_json: Json = False,
    quiet: Quiet = False,
) -> None:
    """Evaluate an arithmetic expression over named adapters and save the result as a PEFT folder.

    \b
    Examples:
      lora-merge compose "addition + subtraction - 0.5*intent" \\
          -a addition=examples/adapters/addition -a subtraction=examples/adapters/subtraction \\
          -a intent=examples/adapters/intent --rank 8 -o out/combo
      lora-merge compose "0.5*math + 0.5*code" -a math=org/math-lora@v1 -a code=org/code-lora \\
          --method ties --density 0.5 -o out/ties
      lora-merge compose "0.5*math + 0.5*code" -a math=adapters/math -a code=adapters/code \\
          --method fisher -o out/fisher      # each adapter's fisher.safetensors (lora-merge fisher)
    """
    import yaml

    from ..errors import LoraMergeError, MethodError, OutputExistsError
    from ..expr import compose as compose_expr
    from ..io import load
    from ..merge import resolve_device
    from ..methods import get_method

    if out.exists() and not force:
        raise OutputExistsError(f"{out}: already exists; pass --force to overwrite it", file=str(out))
    check_dtype(dtype)
    check_push_target(push_to_hub)
    spec = get_method(method)
    params = {}
    for item in param or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise LoraMergeError(f"--param expects KEY=VALUE, got {item!r}", key="param")
        if key not in spec.params or key in ("rank", "energy"):
            own = [p for p in spec.params if p not in ("rank", "energy")]
            raise MethodError(f"method '{method}' has no parameter '{key}' to set with --param; its parameters: "
                              f"{', '.join(own) or 'none'} (and --rank / --energy)", key=key)
        params[key] = yaml.safe_load(value)
    if density is not None:
        params["density"] = density
    for option, given in (("fisher", fisher), ("gram", gram)):
        if given:
            if spec.needs != option:
                raise MethodError(f"--{option} is for --method {'fisher' if option == 'fisher' else 'regmean'}, "
                                  f"not '{method}'", key=option)
            params[option + "s"] = _named_files(option, given)
    hub_progress(quiet)
    pool = {name: load(source, name=name, allow_pickle=allow_pickle)
            for name, source in _named("adapter", adapter, "PATH_OR_REPO").items()}
    dev = resolve_device(device or "cpu")
    if dev.type != "cpu":
        params["device"] = dev
    if allow_base_mismatch:
        params["allow_base_mismatch"] = True
    with RichSteps(quiet) as steps:
        if params or method != "sum" or rank is not None or energy is not None:
            steps.start("merge", len(set().union(*(a.modules for a in pool.values()))))
            params["progress"] = lambda m: steps.advance("merge", m)
        result = compose_expr(expression, pool, method=method, rank=rank, energy=energy, params=params or None)
        result.save(out, force=force, dtype=dtype)
    _report(_summary(result, out, _push(out, push_to_hub, private, quiet)), as_json)


def _named(option: str, items: list[str], value: str) -> dict[str, str]:
    """`--option NAME=VALUE`, repeated: NAME -> VALUE, each name once."""
    from ..errors import LoraMergeError
    out: dict[str, str] = {}
    for item in items:
        name, sep, given = item.partition("=")
        if not sep or not name or not given:
            raise LoraMergeError(f"--{option} expects NAME={value}, got {item!r}", key=option)
        if name in out:
            raise LoraMergeError(f"--{option}: the name '{name}' is given twice", key=option)
        out[name] = given
    return out


def _named_files(option: str, items: list[str]) -> dict[str, Path]:
    from ..errors import LoraMergeError
    out = {name: Path(file) for name, file in _named(option, items, "FILE").items()}
    for name, file in out.items():
        if not file.is_file():
            raise LoraMergeError(f"--{option} {name}: {file}: no such file", file=str(file), key=option)
    return out


@command
def methods(as_json: Json = False) -> None:
    """List every registered merge method with its parameters and defaults.

    Example: lora-merge methods --json
    """
    from ..methods import METHODS
    rows = {n: {"family": m.family, "summary": m.summary, "url": m.url,
                "params": {p.name: {"default": p.default, "required": p.required, "help": p.help,
                                    "choices": list(p.choices) if p.choices else None}
                           for p in m.params.values()}} for n, m in METHODS.items()}
    if as_json:
        emit_json(rows)
        return
    for n, row in rows.items():
        params = ", ".join(k + ("" if v["required"] else f"={v['default']}") for k, v in row["params"].items())
        typer.echo(f"{n:<20} {row['family']:<7} {params}\n{'':<29}{row['summary']}")
