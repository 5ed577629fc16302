"""The `lora-merge` command line: a thin typer layer over the Python API, one module per command group.

Exit codes: 0 on success, 2 on bad input (one line on stderr, from the library's typed errors or from typer's
own usage checks), 1 on any other failure (one line too). `--debug` or LORA_MERGE_DEBUG=1 shows the traceback,
never with local variables, so a token cannot leak into it.
"""

from __future__ import annotations

from typing import Annotated

import typer

from .. import __version__
from ._common import state
from .fisher import fisher
from .hub import push
from .inspect import inspect_adapter
from .lorahub import hub
from .merging import compose, merge, methods

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                  rich_markup_mode=None, help="Load LoRA adapters and combine them into new adapters.\n\n"
                  "Examples:\n\n"
                  "  lora-merge merge recipes/task_arithmetic.yaml -o out/task_arithmetic\n\n"
                  "  lora-merge compose '0.6*math + 0.4*code - 0.3*toxic' -a math=PATH -a code=PATH "
                  "-a toxic=org/toxic-lora -o out/detox\n\n"
                  "  lora-merge inspect org/some-lora --json")

app.command("merge", no_args_is_help=True)(merge)
app.command("compose", no_args_is_help=True)(compose)
app.command("inspect", no_args_is_help=True)(inspect_adapter)
app.command("push", no_args_is_help=True)(push)
app.command("hub", no_args_is_help=True)(hub)
app.command("fisher", no_args_is_help=True)(fisher)
app.command("methods")(methods)


@app.callback(invoke_without_command=True)
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks (also LORA_MERGE_DEBUG=1).")] = False,
) -> None:
    if version:
        typer.echo(__version__)
        raise typer.Exit()
    state.debug = state.debug or debug


def main() -> None:
    app()


__all__ = ["app", "main"]
