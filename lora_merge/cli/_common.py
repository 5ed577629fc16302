"""What every command shares: error handling and exit codes, option aliases, progress, JSON output."""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import LoraMergeError
from ..runner import Steps


class _State:
    debug = False


state = _State()


def _debug() -> bool:
    return state.debug or os.environ.get("LORA_MERGE_DEBUG", "").strip().lower() in ("1", "true", "yes")


def _scrub(text: str) -> str:
    from ..hub import _scrub as scrub
    return scrub(text)


def command(fn):
    """Run a command: a library error is one line and exit 2; anything else one line and exit 1."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except LoraMergeError as e:
            if _debug():                     # the traceback (no local variables), still exit code 2
                import traceback
                typer.echo(_scrub(traceback.format_exc()).rstrip(), err=True)
            typer.echo("error: " + _scrub("\n  ".join(str(e).splitlines())), err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None
        except Exception as e:  # noqa: BLE001 - the one place that turns any failure into one line
            if _debug():
                raise
            first = (str(e).strip().splitlines() or [""])[0]
            typer.echo(_scrub(f"error: {type(e).__name__}: {first} (run with --debug for the traceback)"),
                       err=True)
            raise typer.Exit(1) from None
    return wrapper


# ---- option aliases, reused across commands ----------------------------------------------------------------
Out = Annotated[Path | None, typer.Option("-o", "--out", metavar="OUT", help="Output folder (PEFT adapter).")]
Force = Annotated[bool, typer.Option("--force", help="Overwrite the output folder if it exists.")]
Device = Annotated[str | None, typer.Option("--device", metavar="DEVICE", help="cpu, cuda or auto (CUDA when "
                                                                                "present).")]
AllowPickle = Annotated[bool, typer.Option("--allow-pickle", help="Read adapter_model.bin (pickle) when there is no "
                                           "safetensors file, with torch.load(weights_only=True).")]
Json = Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout, for scripts.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress display.")]
PushTo = Annotated[str | None, typer.Option("--push-to-hub", metavar="REPO_ID",
                                            help="Push the result to this Hub repo (HF_TOKEN must allow it).")]
Private = Annotated[bool, typer.Option("--private", help="Create the Hub repo as private.")]


def emit_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


def stderr_console():
    from rich.console import Console
    return Console(stderr=True)


def stdout_console():
    """Tables on stdout; as wide as the terminal, or wide enough not to cut paths when piped."""
    from rich.console import Console
    console = Console()
    return console if console.is_terminal else Console(width=240)


def shown(path: str | None) -> str:
    """A path as the user would write it: relative to the working directory when inside it."""
    from ..card import display_path
    return display_path(path) if path else ""


def hub_progress(quiet: bool) -> None:
    """huggingface_hub draws per-file download/upload bars; --quiet, or stderr not being a terminal, turns
    them off."""
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars
    (disable_progress_bars if quiet or not sys.stderr.isatty() else enable_progress_bars)()


def check_dtype(dtype: str | None) -> None:
    if dtype is not None and dtype not in ("float32", "float16", "bfloat16"):
        raise LoraMergeError(f"--dtype must be float32, float16 or bfloat16, got {dtype!r}", key="dtype")


def check_push_target(repo_id: str | None) -> None:
    """Before any work: a --push-to-hub that cannot succeed is an error now, not after the merge."""
    if repo_id:
        from ..hub import check_repo_id
        check_repo_id(repo_id)


class RichSteps(Steps):
    """Per-input and per-module progress bars on stderr; nothing when quiet or when stderr is not a terminal."""

    def __init__(self, quiet: bool):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        console = stderr_console()
        self.enabled = not quiet and console.is_terminal and sys.stderr.isatty()
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("{task.fields[item]}"), console=console,
                                 transient=True, disable=not self.enabled)
        self.tasks: dict[str, Any] = {}

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def start(self, stage: str, total: int) -> None:
        labels = {"load": "loading adapters", "merge": "merging modules", "search": "searching weights"}
        label = labels.get(stage, stage)
        self.tasks[stage] = self.progress.add_task(label, total=total, item="")

    def advance(self, stage: str, item: str) -> None:
        self.progress.update(self.tasks[stage], advance=1, item=item)
