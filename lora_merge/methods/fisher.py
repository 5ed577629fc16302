"""Fisher-weighted averaging (Matena & Raffel, NeurIPS 2022, arXiv 2111.09832; code mmatena/model_merging).

Every parameter of every input is weighted by its diagonal Fisher information: theta* = sum_i l_i F_i theta_i /
sum_i l_i F_i, where the l_i are the merge weights. As in the original (`merging.py` there), each Fisher may be
divided by its global L2 norm (`normalize`, over all of the adapter's Fisher), and a `floor` replaces Fisher
values below it, either in every input (`favor_target=False`, the default here: a merge of several tasks has
no privileged input) or only in the first, "target" one (`favor_target=True`, the original's default).

The weights are relative, as in any weighted average: `0.5*a + 0.5*b` and `a + b` give the same merge, and they
must be positive. With equal Fishers the merge is the weighted average sum_i l_i theta_i / sum_i l_i.

The space is the Fishers' own (see `lora_merge.fisher`):
- `delta`: theta_i is each module's dense update s_i B_i A_i; the merged delta is re-factored by the engine's
  SVD (to `rank`, default the largest input rank, or `energy`).
- `factor`: theta_i are the factors sqrt(s_i) A_i and sqrt(s_i) B_i (their Fishers divided by s_i accordingly),
  averaged separately; equal ranks needed. Meaningful only where the factors share a basis (adapters
  fine-tuned from one common initialisation); otherwise averaging A's and B's entry by entry mixes unrelated
  coordinates, as PEFT's `linear` does.
A module that an input lacks takes no part in that module's average.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..adapter import LoraWeight
from ..errors import MethodError
from .registry import register

URL = "https://arxiv.org/abs/2111.09832"


def fisher_average(thetas: Sequence[torch.Tensor], fishers: Sequence[torch.Tensor], weights: Sequence[float], *,
                   floor: float = 1e-6, favor_target: bool = False) -> torch.Tensor:
    """sum_i w_i F_i theta_i / sum_i w_i F_i, with F_i floored (in every input, or in the first only)."""
    num = den = None
    for i, (theta, F, w) in enumerate(zip(thetas, fishers, weights)):
        d = F.to(theta.device, torch.float32)             # Fishers are read to the CPU; theta is where the merge runs
        d = w * (d.clamp(min=floor) if (i == 0 or not favor_target) else d)
        num = d * theta.float() if num is None else num.add_(d * theta.float())
        den = d if den is None else den.add_(d)
    return num / den


def fisher(path: str, entries: list, stats: list, *, normalize: bool = True, floor: float = 1e-6,
           favor_target: bool = False) -> LoraWeight | torch.Tensor:
    """One module's Fisher-weighted average: `entries` the module's (weight, LoraWeight, adapter) of the inputs
    that have it, `stats` their Fishers (`lora_merge.fisher.Fisher`)."""
    if floor < 0:
        raise MethodError(f"fisher: floor must be >= 0, got {floor}", key="floor")
    weights = []
    for (c, _, a), F in zip(entries, stats):
        if c <= 0:
            raise MethodError(f"fisher: the weight of '{a.name}' is {c}; Fisher merging is a weighted average and "
                              "needs positive weights (subtract a skill with task arithmetic, method 'sum')",
                              key="weights")
        if path not in F.tensors:
            raise MethodError(f"fisher: the Fisher of adapter '{a.name}' has no module {path} (it was estimated for "
                              f"{F.meta.get('adapter') or 'another adapter'}); was it estimated for this one?",
                              module=path, file=a.source)
        weights.append(c / F.norm if normalize else c)
    if stats[0].space == "delta":
        deltas = [(x.B.float() @ x.A.float()) * x.scale for _, x, _ in entries]
        return fisher_average(deltas, [F.tensors[path]["delta"] for F in stats], weights,
                              floor=floor, favor_target=favor_target)
    roots = [math.sqrt(x.scale) for _, x, _ in entries]
    out = {}
    for side in ("A", "B"):                          # theta = sqrt(s) X, whose Fisher is F_X / s
        thetas = [r * getattr(x, side).float() for r, (_, x, _) in zip(roots, entries)]
        fishers = [F.tensors[path][side].float() / (r * r) for r, F in zip(roots, stats)]
        out[side] = fisher_average(thetas, fishers, weights, floor=floor, favor_target=favor_target)
    return LoraWeight(A=out["A"], B=out["B"], scale=1.0)


register("fisher", family="data", needs="fisher", op=fisher, url=URL, default_rank="max",
         summary="Fisher-weighted average of the inputs (in the space of their Fishers: dense deltas, "
                 "re-factored by SVD, or factors)")
