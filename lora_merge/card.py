"""The model card (README.md) written beside every saved adapter: what went in, with which weights, how, and
the recipe that makes it again. Built with huggingface_hub's `ModelCard` / `ModelCardData`, so the Hub reads
its metadata (`base_model`, `library_name: peft`, tags)."""

from __future__ import annotations

import json
import os
import re

import yaml

from . import __version__

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_TORCH_DTYPES = {"torch.float32": "float32", "torch.float16": "float16", "torch.bfloat16": "bfloat16"}


def model_card(adapter, config: dict) -> str:
    """The card's text: YAML metadata, then a markdown body that records the merge's provenance."""
    from huggingface_hub import ModelCard, ModelCardData

    from .methods import METHODS

    prov = adapter.provenance or {}
    meta = prov.get("metadata") or {}
    base = config.get("base_model_name_or_path")
    if base and not _HUB_ID.match(base):
        base = None                      # a local path: not Hub metadata, and not the user's file system
    method = prov.get("method")
    tags = ["lora", "lora-merge"] + ([method] if method else []) + list(meta.get("tags") or [])
    if base:
        tags.append(f"base_model:adapter:{base}")
    data = ModelCardData(base_model=base, library_name="peft", tags=list(dict.fromkeys(tags)),
                         license=meta.get("license"), language=meta.get("language"), datasets=meta.get("datasets"))

    spec = METHODS.get(method or "")
    paper = f" ([paper]({spec.url}))" if spec is not None and spec.url else ""
    lines = [f"# {adapter.name}", ""]
    on = f" for `{base}`" if base else ""
    lines += [f"A LoRA adapter{on} made by lora-merge {__version__}"
              + (f" with the `{method}` method{paper}." if method else "."), ""]
    if meta.get("description"):
        lines += [meta["description"], ""]

    inputs = prov.get("inputs") or []
    if inputs:
        lines += ["## Inputs", "",
                  "| input | weight | source | revision | sha256 adapter_model | sha256 adapter_config |",
                  "|---|---|---|---|---|---|"]
        for rec in inputs:
            files = rec.get("files", {})
            model_sha = next((v for k, v in files.items() if k.startswith("adapter_model")), "")
            config_sha = files.get("adapter_config.json", "")
            rev = " ".join(x for x in (rec.get("revision"), f"(commit {rec['commit']})" if rec.get("commit")
                                       else None) if x)
            lines.append(f"| {rec['name']} | {rec['weight']:g} | {_source(rec)} | {rev} | "
                         f"`{model_sha}` | `{config_sha}` |")
        lines.append("")

    params = {k: v for k, v in (prov.get("params") or {}).items() if v is not None}
    extra = {k: v for k, v in prov.items() if k not in ("inputs", "method", "params", "recipe", "metadata",
                                                          "lora_merge_version", "lorahub", "statistics")}
    lines += ["## Method", "", f"`{method or 'none'}`" + (" with parameters:" if params else " (no parameters)."), ""]
    if params:
        lines += ["```json", json.dumps(params, indent=2, sort_keys=True, default=str), "```", ""]
    if extra:
        lines += ["Then:", "", "```json", json.dumps(extra, indent=2, sort_keys=True, default=str), "```", ""]
    if prov.get("lorahub"):
        lines += _lorahub_section(prov["lorahub"])
    if prov.get("statistics"):
        lines += _statistics_section(prov["statistics"])
    ranks = sorted({w.rank for w in adapter.metas.values()})
    lines += [f"Modules: {len(adapter.modules)}; ranks: {ranks[0]}..{ranks[-1]}; "
              f"lora-merge version: {prov.get('lora_merge_version') or __version__}.", ""]

    if base:
        lines += ["## Use", "", "```python", "from peft import PeftModel",
                  "from transformers import AutoModelForCausalLM", "",
                  f'base = AutoModelForCausalLM.from_pretrained("{base}")',
                  'model = PeftModel.from_pretrained(base, "path/or/repo-of-this-adapter")', "```", ""]

    recipe = prov.get("recipe") or recipe_of(adapter)
    if recipe:
        lines += ["## Reproduce", "", "Save this recipe as `recipe.yaml` and run "
                  "`lora-merge merge recipe.yaml -o out`. Local paths are as they were given to lora-merge; a recipe "
                  "reads relative paths from its own folder.", "",
                  "```yaml", recipe.rstrip("\n"), "```", ""]
    body = "\n".join(lines)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}").content


def _lorahub_section(rec: dict) -> list[str]:
    """The LoraHub search that found the weights: settings, losses, and the objective at every evaluation."""
    s = rec.get("settings", {})
    lines = ["## LoraHub search", "",
             f"The weights above were found by LoraHub's gradient-free search ({s.get('optimizer')}, "
             f"{s.get('budget')} evaluations, seed {s.get('seed')}, `{s.get('compose')}` composition, penalty "
             f"{s.get('penalty')} * mean |w|, bounds {s.get('bounds')}) on {s.get('examples')} examples with "
             f"`{s.get('base_model')}`. Few-shot loss: {rec['loss']:.4f} (base model: {rec['base_loss']:.4f}).", "",
             "| evaluation | loss | objective |", "|---|---|---|"]
    lines += [f"| {h['evaluation']} | {h['loss']:.4f} | {h['objective']:.4f} |" for h in rec.get("history", [])]
    return lines + ["", "Every evaluated weighting is in `lorahub.json`.", ""]


STAT_FIELDS = ("kind", "space", "n_examples", "data_sha256", "base_model", "prompt_template", "file")


def _statistics_section(stats: dict) -> list[str]:
    """Where each input's Fisher (or Gram matrices) came from: how it was estimated, on which data."""
    lines = ["## Statistics", "", "Each input's statistics (`lora-merge fisher`), as recorded in their files:",
             "", "| input | " + " | ".join(STAT_FIELDS) + " |", "|---|" + "---|" * len(STAT_FIELDS)]
    for name, meta in stats.items():
        shown = {k: display_path(v) if k in ("base_model", "file") and v else v for k, v in meta.items()}
        cells = [str(shown.get(k, "")).replace("|", "\\|").replace("\n", "\\n") for k in STAT_FIELDS]
        lines.append(f"| {name} | " + " | ".join(f"`{c}`" if c else "" for c in cells) + " |")
    return lines + [""]


def _source(rec: dict) -> str:
    """Where an input came from: a Hub id, or a local path (relative to the working directory when inside it,
    so that a card pushed to the Hub does not carry the user's home directory)."""
    return display_path((rec.get("source") or "(in memory)").split("@")[0])


def display_path(path: str) -> str:
    if not os.path.isabs(path):
        return path
    try:
        rel = os.path.relpath(path)
    except ValueError:           # another drive (Windows)
        return path
    return path if rel.startswith("..") else rel


def recipe_of(adapter) -> str | None:
    """A recipe that remakes `adapter` from its inputs, when its provenance says enough to."""
    prov = adapter.provenance or {}
    method, inputs = prov.get("method"), prov.get("inputs") or []
    if not method or not inputs or any(not rec.get("source") for rec in inputs):
        return None
    params = dict(prov.get("params") or {})
    compress = prov.get("compress")
    if compress:
        if method != "sum":
            return None                    # a compression after another method is not one recipe step
        method = "svd"
        params.update({k: v for k, v in compress.items() if v is not None})
    recipe: dict = {"name": adapter.name, "method": method}
    own = {k: v for k, v in params.items() if k not in ("rank", "energy", "seed") and v is not None}
    if own:
        recipe["parameters"] = own
    stats = prov.get("statistics")
    needs = None
    if stats is not None:
        from .methods import METHODS
        needs = getattr(METHODS.get(method), "needs", None)
        if needs is None or any(not (stats.get(rec.get("name")) or {}).get("file") for rec in inputs):
            return None                    # statistics given in memory: no recipe can name them
    recipe["inputs"] = []
    for rec in inputs:
        pin = rec.get("commit") or rec.get("revision")     # the commit, so the recipe remakes this exact merge
        source = rec["source"].split("@")[0] + (f"@{pin}" if pin else "")
        item = {"adapter": source}
        if rec.get("name", "").isidentifier():
            item["name"] = rec["name"]
        item["weight"] = rec["weight"]
        if needs is not None:
            item[needs] = stats[rec["name"]]["file"]
        recipe["inputs"].append(item)
    for key in ("rank", "energy", "seed"):
        if params.get(key) is not None:
            recipe[key] = params[key]
    dtype = _TORCH_DTYPES.get(str(adapter.dtype))
    if dtype:
        recipe["dtype"] = dtype
    return yaml.safe_dump(recipe, sort_keys=False)
