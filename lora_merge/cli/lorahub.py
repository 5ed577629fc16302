"""`lora-merge hub`: LoraHub's few-shot weight search over a set of adapters."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._common import (
    Device,
    Force,
    Json,
    Private,
    PushTo,
    Quiet,
    check_push_target,
    command,
    emit_json,
    hub_progress,
    stderr_console,
)


@command
def hub(
    adapters: Annotated[str, typer.Option("--adapters", help="Comma-separated adapter folders or Hub ids.",
                                          show_default=False)],
    base_model: Annotated[str, typer.Option("--base-model", help="The base model: a folder or a Hub id.",
                                            show_default=False)],
    examples: Annotated[Path, typer.Option("--examples", help='JSONL: {"input", "output"} or {"input", "options", '
                                           '"answer"} rows, a few examples of the new task.', show_default=False)],
    out: Annotated[Path, typer.Option("-o", "--out", help="Output folder (PEFT adapter).", show_default=False)],
    budget: Annotated[int, typer.Option(help="Evaluations of the objective (LoraHub: 40).")] = 40,
    seed: Annotated[int, typer.Option(help="Seed of the search; the same seed gives the same weights.")] = 0,
    optimizer: Annotated[str, typer.Option(help="cma (CMA-ES) or cobyla (what the original code runs).")] = "cma",
    compose: Annotated[str, typer.Option(help="factor (LoraHub's: A and B summed separately) or delta (the "
                                         "exact weighted sum of the updates).")] = "factor",
    penalty: Annotated[float, typer.Option(help="Weight of the L1 term: penalty * mean |w_i|.")] = 0.05,
    n_examples: Annotated[int | None, typer.Option("--n-examples", help="Use only the first N rows.")] = None,
    device: Device = None,
    force: Force = False,
    push_to_hub: PushTo = None,
    private: Private = False,
    as_json: Json = False,
    quiet: Quiet = False,
) -> None:
    """Find weights for a composition of adapters from a few examples of a new task (LoraHub), and save it.

    The objective is the few-shot cross-entropy plus penalty * mean |w_i|, with weights in [-1.5, 1.5],
    starting from w = 0 (the base model). The folder gets the adapter, its model card and lorahub.json (the
    weights and the loss of every evaluation).

    \b
    Example:
      lora-merge hub --adapters adapters/a,adapters/b,org/c-lora \\
          --base-model HuggingFaceTB/SmolLM2-135M-Instruct --examples few.jsonl --budget 40 --seed 0 -o out/hub
    """
    from ..errors import OutputExistsError
    from ..io import load
    from ..lorahub import read_examples, search
    from .merging import _push

    if out.exists() and not force:
        raise OutputExistsError(f"{out}: already exists; pass --force to overwrite it", file=str(out))
    check_push_target(push_to_hub)
    rows = read_examples(examples, limit=n_examples)
    hub_progress(quiet)
    inputs = [load(s.strip()) for s in adapters.split(",") if s.strip()]
    console = stderr_console()
    show = not quiet and console.is_terminal

    def progress(done: int, total: int, best: float) -> None:
        if show:
            console.print(f"evaluations {done}/{total}, best objective {best:.4f}", end="\r", highlight=False)

    result = search(base_model, inputs, rows, budget=budget, seed=seed, optimizer=optimizer, compose=compose,
                    penalty=penalty, device=device or "auto", progress=progress, name=out.name)
    result.save(out, force=force)
    pushed = _push(out, push_to_hub, private, quiet)
    summary = {"output": str(out), "weights": {a.name: w for a, w in zip(inputs, result.weights)},
               "loss": result.loss, "base_loss": result.base_loss, "objective": result.objective,
               "evaluations": len(result.history), "seconds": result.settings["seconds"], "pushed": pushed}
    if as_json:
        emit_json(summary)
        return
    weights = ", ".join(f"{k}={v:+.3f}" for k, v in summary["weights"].items())
    typer.echo(f"saved {out}: weights {weights}; few-shot loss {result.loss:.4f} (base model "
               f"{result.base_loss:.4f}) after {len(result.history)} evaluations in {result.settings['seconds']:.1f} s")
    if pushed:
        typer.echo(f"pushed {pushed}")
