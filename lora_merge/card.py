"""The README.md model card written beside every saved adapter: what went in, with which weights, and how."""

from __future__ import annotations

import json

from . import __version__


def model_card(adapter, config: dict) -> str:
    """A Hub-style model card (YAML front matter + markdown) recording the merge's provenance."""
    prov = adapter.provenance or {}
    base = config.get("base_model_name_or_path")
    method = prov.get("method")
    tags = ["lora", "lora-merge"] + ([method] if method else []) + ([f"base_model:adapter:{base}"] if base else [])
    front = ["---"]
    if base:
        front.append(f"base_model: {base}")
    front.append("library_name: peft")
    front.append("tags:")
    front += [f"- {t}" for t in tags]
    front.append("---")

    lines = [f"# {adapter.name}", ""]
    if method:
        lines += [f"A LoRA adapter made by lora-merge {__version__} with the `{method}` method.", ""]
    inputs = prov.get("inputs") or []
    if inputs:
        lines += ["| input | weight | source | sha256 (adapter_model) |", "|---|---|---|---|"]
        for rec in inputs:
            sha = next((v for k, v in rec.get("files", {}).items() if k.startswith("adapter_model")), "")
            source = (rec.get("source") or "").split("@")[0] + (f"@{rec['revision']}" if rec.get("revision") else "")
            lines.append(f"| {rec['name']} | {rec['weight']:g} | {source} | `{sha[:16]}` |")
        lines.append("")
    params = {k: v for k, v in prov.items() if k not in ("inputs", "method")}
    if params:
        lines += ["Parameters:", "", "```json", json.dumps(params, indent=2, sort_keys=True, default=str), "```", ""]
    ranks = sorted({w.rank for w in adapter.modules.values()})
    lines += [f"Modules: {len(adapter.modules)}; ranks: {ranks}.", ""]
    return "\n".join(front + [""] + lines)
