"""`lora-merge fisher ADAPTER`: estimate an adapter's diagonal Fisher (and its Gram matrices) from data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._common import Device, Force, Json, Quiet, command, emit_json, hub_progress, stderr_console


@command
def fisher(
    adapter: Annotated[str, typer.Argument(metavar="ADAPTER", help="The adapter: a folder or a Hub id.",
                                           show_default=False)],
    base_model: Annotated[str, typer.Option("--base-model", help="The base model: a folder or a Hub id.",
                                            show_default=False)],
    data: Annotated[Path, typer.Option("--data", help='JSONL of the adapter\'s task: {"input", "output"} or '
                                       '{"input", "options", "answer"} rows.', show_default=False)],
    n_examples: Annotated[int, typer.Option("-n", "--n-examples", help="Use the first N rows.")] = 256,
    kind: Annotated[str, typer.Option(help="expected (the paper's: over the model's own labels), sampled (one "
                                      "label drawn from the model) or empirical (the data's answer).")] = "expected",
    space: Annotated[str, typer.Option(help="factor (of A and B: cheap, the adapter's own keys) or delta (of "
                                       "each module's dense update: what merges of unrelated adapters need).")
                     ] = "factor",
    gram: Annotated[bool, typer.Option("--gram", help="Also write the modules' input Gram matrices (for "
                                       "--method regmean) to <OUT>.gram.safetensors.")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Examples per forward/backward pass.")] = 8,
    seed: Annotated[int, typer.Option(help="Seed of the sampled labels.")] = 0,
    out: Annotated[Path | None, typer.Option("-o", "--out", metavar="PATH", help="Output file (default: "
                                             "fisher.safetensors beside the adapter, where `--method fisher` "
                                             "finds it).")] = None,
    device: Device = None,
    force: Force = False,
    as_json: Json = False,
    quiet: Quiet = False,
) -> None:
    """Estimate an adapter's diagonal Fisher from data, for `--method fisher` (and, with --gram, `regmean`).

    \b
    Examples:
      lora-merge fisher adapters/math --base-model HuggingFaceTB/SmolLM2-135M-Instruct --data math.jsonl \\
          -n 256 --kind expected
      lora-merge fisher adapters/code --base-model ./smollm2 --data code.jsonl --space delta --gram \\
          -o stats/code.fisher.safetensors
    """
    import time

    from ..errors import LoraMergeError, OutputExistsError
    from ..fisher import estimate
    from ..io import load

    hub_progress(quiet)
    lora = load(adapter)
    if out is None:
        if not (lora.source and Path(lora.source).is_dir()):
            raise LoraMergeError(f"{adapter}: not a local folder; pass -o PATH for the Fisher file", key="out")
        out = Path(lora.source) / "fisher.safetensors"
    gram_out = out.with_name(out.name.removesuffix(".safetensors") + ".gram.safetensors")
    for p in (out, gram_out) if gram else (out,):
        if p.exists() and not force:                 # before the (long) estimate
            raise OutputExistsError(f"{p}: already exists; pass --force to overwrite it", file=str(p))
    console = stderr_console()
    show = not quiet and console.is_terminal

    def progress(done: int, total: int) -> None:
        if show:
            console.print(f"examples {done}/{total}", end="\r", highlight=False)

    start = time.perf_counter()
    F = estimate(base_model, lora, data, n_examples=n_examples, kind=kind, space=space, batch_size=batch_size,
                 seed=seed, device=device or "auto", progress=progress, gram=gram)
    F.save(out, force=force, gram_path=gram_out if gram else None)
    seconds = time.perf_counter() - start
    summary = {"output": str(out), "gram": str(gram_out) if gram else None, "space": F.space,
               "kind": F.meta.get("kind"), "examples": int(F.meta["n_examples"]), "modules": len(F.tensors),
               "seconds": seconds}
    if as_json:
        emit_json(summary)
        return
    typer.echo(f"saved {out} ({F.space} space, {summary['kind']}, {summary['examples']} examples, "
               f"{len(F.tensors)} modules, {seconds:.1f} s)" + (f"; Gram matrices in {gram_out}" if gram else ""))
