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
# (`revision` is the base model's revision in PEFT's sense.)
_CARRIED = ("base_model_name_or_path", "revision", "task_type", "fan_in_fan_out", "bias", "lora_dropout",
            "inference_mode")


def peft_pattern(key: str) -> re.Pattern:
    """The regex PEFT builds from a rank_pattern / alpha_pattern key (raises re.error if it is invalid)."""
    return re.compile(rf"(.*\.)?({key})$")


def pattern_key(patterns: Iterable[str], module: str) -> str | None:
    """The pattern key PEFT would pick for `module`, or None."""
    for key in patterns:
        if peft_pattern(key).match(module):
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


def merged_config(configs: list[Mapping], module_sets: list[set[str]]) -> dict:
    """The adapter-wide part of the config of a merge (ranks and alphas come from `finalize`).

    PEFT builds a LoRA layer for every module that `target_modules` / `layers_to_transform` select, and
    initialises those missing from the file itself. So the inputs' targets are kept only when every input
    selects the same modules the same way; otherwise `target_modules` lists the exact module paths. Either
    way `init_lora_weights` is True: a module PEFT builds but the file lacks then adds nothing.
    """
    first = configs[0]
    out = {k: first[k] for k in _CARRIED if k in first}
    out["peft_type"] = "LORA"
    selectors = ("target_modules", "layers_to_transform", "layers_pattern", "exclude_modules")
    def norm(value):
        return sorted(value) if isinstance(value, (list, tuple, set)) else value

    same = all(norm(c.get(k)) == norm(first.get(k)) for c in configs for k in selectors) and \
        all(m == module_sets[0] for m in module_sets)
    if same:
        out.update({k: first.get(k) for k in selectors})
    else:
        out.update(target_modules=sorted(set().union(*module_sets)), layers_to_transform=None,
                   layers_pattern=None, exclude_modules=None)
    out.update(init_lora_weights=True, use_rslora=False, use_dora=False, modules_to_save=None)
    return out


def finalize(config: Mapping, ranks: Mapping[str, int], scales: Mapping[str, float],
             lora_bias: bool = False) -> dict:
    r"""Set r, lora_alpha and the patterns so that PEFT gives every module exactly its rank and scale.

    The most common rank and alpha become `r` / `lora_alpha`; every module that differs gets an entry in
    `rank_pattern` / `alpha_pattern` keyed by `^` + its escaped full path. PEFT matches keys with
    `(.*\.)?(key)$`, so the anchor is what keeps `proj` from also matching `inner.proj`.
    """
    out = dict(config)
    rslora = bool(out.get("use_rslora"))
    alphas = {m: _number(scales[m] * (math.sqrt(r) if rslora else r)) for m, r in ranks.items()}
    r = Counter(ranks.values()).most_common(1)[0][0] if ranks else int(out.get("r", 8))
    alpha = Counter(alphas.values()).most_common(1)[0][0] if alphas else out.get("lora_alpha", r)
    out["r"] = r
    out["lora_alpha"] = alpha
    out["rank_pattern"] = {"^" + re.escape(m): rk for m, rk in sorted(ranks.items()) if rk != r}
    out["alpha_pattern"] = {"^" + re.escape(m): a for m, a in sorted(alphas.items()) if a != alpha}
    out["lora_bias"] = lora_bias
    return out
