"""PEFT `adapter_config.json` semantics: per-module rank and alpha, scaling, and the config of a merged adapter.

PEFT resolves `rank_pattern` / `alpha_pattern` keys with `re.match(rf"(.*\\.)?({key})$", module)`, first
match wins; the module's scaling is `alpha / r`, or `alpha / sqrt(r)` with rsLoRA. We mirror that exactly so
that what we read is what PEFT would apply, and what we write is what PEFT will apply.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping

# Keys of a PEFT LoraConfig that describe the adapter as a whole and carry over to a merge.
_CARRIED = ("base_model_name_or_path", "revision", "task_type", "fan_in_fan_out", "layers_pattern",
            "bias", "lora_dropout", "inference_mode", "init_lora_weights")


def pattern_key(patterns: Iterable[str], module: str) -> str | None:
    """The pattern key PEFT would pick for `module`, or None."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def module_rank(config: Mapping, module: str) -> int:
    """The rank PEFT gives `module` under this config."""
    patterns = config.get("rank_pattern") or {}
    key = pattern_key(patterns, module)
    return int(patterns[key]) if key is not None else int(config.get("r", 8))


def module_alpha(config: Mapping, module: str) -> float:
    """The lora_alpha PEFT gives `module` under this config."""
    patterns = config.get("alpha_pattern") or {}
    key = pattern_key(patterns, module)
    return float(patterns[key]) if key is not None else float(config.get("lora_alpha", 8))


def scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    """PEFT's LoRA scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def _number(x: float) -> int | float:
    """Write an integral float as an int, so configs stay readable (16, not 16.0)."""
    return int(round(x)) if abs(x - round(x)) < 1e-9 * max(1.0, abs(x)) else x


def _union_targets(values: list) -> list[str] | str | None:
    """Union of several `target_modules`: a sorted list, or a regex when any of them is a regex."""
    values = [v for v in values if v]
    if not values:
        return None
    if all(not isinstance(v, str) for v in values):
        return sorted(set().union(*map(set, values)))
    # A list target means "exact name or suffix after a dot"; as a regex that is (.*\.)?(name)
    parts = []
    for v in values:
        parts.append(v if isinstance(v, str) else r"(.*\.)?(" + "|".join(re.escape(t) for t in sorted(v)) + ")")
    return "|".join(f"({p})" for p in dict.fromkeys(parts))


def merged_config(configs: list[Mapping]) -> dict:
    """The adapter-wide part of the config of a merge of these adapters (ranks and alphas come from `finalize`)."""
    first = configs[0]
    out = {k: first[k] for k in _CARRIED if k in first}
    out["peft_type"] = "LORA"
    out["target_modules"] = _union_targets([c.get("target_modules") for c in configs])
    layers = {repr(c.get("layers_to_transform")) for c in configs}
    out["layers_to_transform"] = first.get("layers_to_transform") if len(layers) == 1 else None
    out["use_rslora"] = False
    out["use_dora"] = False
    out["modules_to_save"] = None
    return out


def finalize(config: Mapping, ranks: Mapping[str, int], scales: Mapping[str, float],
             lora_bias: bool = False) -> dict:
    """Set r, lora_alpha and the patterns so that PEFT gives every module exactly its rank and scale.

    The most common rank and alpha become `r` / `lora_alpha`; every module that differs gets an entry in
    `rank_pattern` / `alpha_pattern` keyed by its escaped full path, which matches that module only.
    """
    out = dict(config)
    rslora = bool(out.get("use_rslora"))
    alphas = {m: _number(scales[m] * (math.sqrt(r) if rslora else r)) for m, r in ranks.items()}
    r = Counter(ranks.values()).most_common(1)[0][0] if ranks else int(out.get("r", 8))
    alpha = Counter(alphas.values()).most_common(1)[0][0] if alphas else out.get("lora_alpha", r)
    out["r"] = r
    out["lora_alpha"] = alpha
    out["rank_pattern"] = {re.escape(m): rk for m, rk in sorted(ranks.items()) if rk != r}
    out["alpha_pattern"] = {re.escape(m): a for m, a in sorted(alphas.items()) if a != alpha}
    out["lora_bias"] = lora_bias
    return out
