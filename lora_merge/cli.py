"""The `lora-merge` command line: a thin layer over the Python API.

Errors from the library (`LoraMergeError`) become one line on stderr and exit code 2; a traceback is shown
only with LORA_MERGE_DEBUG=1.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Annotated

import typer

from . import __version__
from .errors import LoraMergeError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                  help="Load LoRA adapters and combine them into new adapters.")


def one_line_errors(command):
    """Turn a library error into one line on stderr and exit code 2 (a traceback with LORA_MERGE_DEBUG=1)."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except LoraMergeError as e:
            if os.environ.get("LORA_MERGE_DEBUG") == "1":
                raise
            typer.echo("error: " + "\n  ".join(str(e).splitlines()), err=True)
            raise typer.Exit(2) from None
    return wrapper


@app.command("methods")
@one_line_errors
def methods(as_json: Annotated[bool, typer.Option("--json", help="print JSON for scripts")] = False) -> None:
    """List every registered merge method with its parameters and defaults.

    Example: lora-merge methods --json
    """
    from .methods import METHODS
    rows = {n: {"family": m.family, "summary": m.summary, "url": m.url,
                "params": {p.name: {"default": p.default, "required": p.required, "help": p.help}
                           for p in m.params.values()}} for n, m in METHODS.items()}
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for n, row in rows.items():
        params = ", ".join(k + ("" if v["required"] else f"={v['default']}") for k, v in row["params"].items())
        typer.echo(f"{n:<20} {row['family']:<7} {params}\n{'':<29}{row['summary']}")


@app.command("compose")
@one_line_errors
def compose(
    expression: Annotated[str, typer.Argument(help="e.g. '0.6*math + 0.4*code - 0.3*toxic'")],
    adapter: Annotated[list[str], typer.Option("-a", "--adapter", help="NAME=PATH_OR_REPO, once per name")],
    out: Annotated[Path, typer.Option("-o", "--out", help="output folder")],
    method: Annotated[str, typer.Option(help="merge method applied with the expression's weights")] = "sum",
    rank: Annotated[int | None, typer.Option(help="output rank (factored SVD)")] = None,
    energy: Annotated[float | None, typer.Option(help="keep this share of squared singular values")] = None,
    density: Annotated[float | None, typer.Option(help="for ties / dare / magnitude_prune")] = None,
    force: Annotated[bool, typer.Option(help="overwrite OUT if it exists")] = False,
) -> None:
    """Evaluate an arithmetic expression over named adapters and save the result as a PEFT folder.

    Example: lora-merge compose "addition + subtraction - 0.5*intent" -a addition=examples/adapters/addition
    -a subtraction=examples/adapters/subtraction -a intent=examples/adapters/intent --rank 8 -o out/combo
    """
    from .errors import OutputExistsError
    from .expr import compose as compose_expr
    from .io import load
    if out.exists() and not force:
        raise OutputExistsError(f"{out}: already exists; pass --force to overwrite it", file=str(out))
    pool = {}
    for spec in adapter:
        name, sep, source = spec.partition("=")
        if not sep or not name or not source:
            raise LoraMergeError(f"--adapter expects NAME=PATH_OR_REPO, got {spec!r}", key="adapter")
        pool[name] = load(source, name=name)
    params = {"density": density} if density is not None else None
    result = compose_expr(expression, pool, method=method, rank=rank, energy=energy, params=params)
    result.save(out, force=force)
    ranks = sorted({w.rank for w in result.modules.values()})
    typer.echo(f"saved {out} ({len(result.modules)} modules, ranks {ranks[0]}..{ranks[-1]})")


@app.callback(invoke_without_command=True)
def _root(version: Annotated[bool, typer.Option("--version", help="print the version")] = False) -> None:
    if version:
        typer.echo(__version__)
        raise typer.Exit()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
