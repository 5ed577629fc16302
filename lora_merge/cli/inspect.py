"""`lora-merge inspect PATH_OR_REPO`: what an adapter holds, and how much of its rank it really uses."""

from __future__ import annotations

from typing import Annotated

import typer

from ._common import AllowPickle, Json, Quiet, command, emit_json, hub_progress, stdout_console


@command
def inspect_adapter(
    source: Annotated[str, typer.Argument(metavar="PATH_OR_REPO", help="Adapter folder or Hub id "
                                          "org/name[@revision].", show_default=False)],
    as_json: Json = False,
    singular_values: Annotated[bool, typer.Option("--singular-values", help="List every module's singular "
                                                  "values (JSON always has them).")] = False,
    allow_pickle: AllowPickle = False,
    quiet: Quiet = False,
) -> None:
    """Show an adapter's base model, ranks, alphas, targets, per-module norms and singular-value energy profile.

    rank@90% / rank@99% is the smallest rank that holds 90% / 99% of a module's squared singular values: far
    below r means the adapter could be stored at a lower rank with little change (`lora-merge compose NAME
    -a NAME=PATH --rank K -o OUT`).

    \b
    Examples:
      lora-merge inspect examples/adapters/addition
      lora-merge inspect org/some-lora@main --json
    """
    from ..io import load
    from ..summary import describe

    hub_progress(quiet)
    info = describe(load(source, allow_pickle=allow_pickle))
    if as_json:
        emit_json(info)
        return
    from rich.table import Table
    console = stdout_console()
    alpha = info["lora_alpha"]
    console.print(f"{info['name']}  ({info['source']}{'@' + info['revision'] if info['revision'] else ''})",
                  highlight=False)
    console.print(f"base model: {info['base_model']}; r={info['r']}, lora_alpha={alpha}"
                  f"{', rsLoRA' if info['use_rslora'] else ''}{', DoRA' if info['use_dora'] else ''}; "
                  f"dtype {info['dtype']}; {info['n_modules']} modules, {info['parameters']:,} parameters",
                  highlight=False)
    console.print(f"targets: {info['target_modules']}", highlight=False)
    for key in ("rank_pattern", "alpha_pattern"):
        if info[key]:
            console.print(f"{key}: {info[key]}", highlight=False)
    profile = "  ".join(f"top-{k + 1}: {100 * v:.0f}%" for k, v in enumerate(info["energy_profile"]))
    console.print(f"energy profile (mean over modules): {profile}", highlight=False)
    console.print(f"mean rank@90%: {info['mean_rank_90']:.1f}; mean rank@99%: {info['mean_rank_99']:.1f}",
                  highlight=False)
    table = Table("module", "shape", "r", "scale", "|dW|", "sigma_1", "stable rank", "rank@90%", "rank@99%")
    if singular_values:
        table.add_column("singular values")
    for m in info["modules"]:
        row = [m["module"], "x".join(map(str, m["shape"])), str(m["rank"]), f"{m['scale']:.4g}",
               f"{m['norm']:.4g}", f"{m['top_singular_value']:.4g}", f"{m['stable_rank']:.2f}",
               str(m["rank_90"]), str(m["rank_99"])]
        if singular_values:
            row.append(" ".join(f"{s:.3g}" for s in m["singular_values"]))
        table.add_row(*row)
    console.print(table)
