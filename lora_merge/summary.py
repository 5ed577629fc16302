"""What an adapter holds: base model, ranks, alphas, targets, and per module the norm of its update and the
singular-value energy profile (how much of its rank it really uses). Computed in factored form."""

from __future__ import annotations

import torch

from .adapter import Adapter
from .linalg import factored_svd


def _rank_for(share: torch.Tensor, energy: float) -> int:
    """The smallest k whose top-k squared singular values hold `energy` of the total (share is cumulative)."""
    if share.numel() == 0 or float(share[-1]) == 0.0:
        return 0
    return int(torch.searchsorted(share, torch.tensor(energy - 1e-12, dtype=share.dtype))) + 1


def describe(adapter: Adapter) -> dict:
    """A JSON-ready summary of `adapter` (see the module docstring)."""
    cfg = adapter.config
    modules = []
    profiles = []
    for path, w in sorted(adapter.modules.items()):
        s = factored_svd(w.B.double() * w.scale, w.A.double())[1]
        sq = s**2
        total = float(sq.sum())
        share = torch.cumsum(sq, 0) / total if total > 0 else torch.zeros_like(sq)
        profiles.append(share)
        modules.append({
            "module": path,
            "shape": list(w.shape),
            "rank": w.rank,
            "scale": w.scale,
            "norm": total**0.5,
            "top_singular_value": float(s[0]) if s.numel() else 0.0,
            "stable_rank": total / float(s[0]) ** 2 if total > 0 else 0.0,
            "rank_90": _rank_for(share, 0.90),
            "rank_99": _rank_for(share, 0.99),
            "singular_values": [float(x) for x in s],
            "embedding": w.embedding,
            "dora": w.magnitude is not None,
        })
    width = max((p.numel() for p in profiles), default=0)
    profile = []
    for k in range(width):
        vals = [float(p[min(k, p.numel() - 1)]) for p in profiles if p.numel()]
        profile.append(sum(vals) / len(vals) if vals else 0.0)
    ranks = sorted({m["rank"] for m in modules})
    return {
        "name": adapter.name,
        "source": adapter.source,
        "revision": adapter.revision,
        "base_model": adapter.base_model,
        "peft_type": cfg.get("peft_type", "LORA"),
        "r": cfg.get("r"),
        "lora_alpha": cfg.get("lora_alpha"),
        "use_rslora": bool(cfg.get("use_rslora")),
        "use_dora": bool(cfg.get("use_dora")),
        "rank_pattern": cfg.get("rank_pattern") or {},
        "alpha_pattern": cfg.get("alpha_pattern") or {},
        "target_modules": cfg.get("target_modules"),
        "dtype": str(adapter.dtype).removeprefix("torch."),
        "files": dict(adapter.files),
        "n_modules": len(modules),
        "ranks": ranks,
        "parameters": sum(w.A.numel() + w.B.numel() for w in adapter.metas.values()),
        "energy_profile": profile,      # mean share of squared singular values held by the top k, k = 1, 2, ...
        "mean_rank_90": sum(m["rank_90"] for m in modules) / max(len(modules), 1),
        "mean_rank_99": sum(m["rank_99"] for m in modules) / max(len(modules), 1),
        "modules": modules,
    }


__all__ = ["describe"]
