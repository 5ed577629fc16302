"""TIES-merging (Yadav et al., 2023): trim, elect sign, disjoint merge; PEFT's semantics.

The sign is elected on the trimmed, unweighted task tensors; the weighted tensors that agree with it are
averaged (divided by how many agree), as in PEFT's `ties`.
"""

from __future__ import annotations

from typing import Literal

import torch

from .prune import prune_magnitude
from .registry import register

URL = "https://arxiv.org/abs/2306.01708"


CHUNK = 1 << 22   # entries per step of the element-wise merge: bounds its temporaries, not its result


def elect_and_merge(stack: torch.Tensor, weights: torch.Tensor, method: str) -> torch.Tensor:
    """Majority sign per entry (from the unweighted stack), then the mean of the agreeing weighted entries.

    Element-wise, so it runs over chunks of entries: the temporaries stay a few times K x CHUNK whatever the
    module's size, and every entry is computed exactly as in one pass."""
    K = stack.shape[0]
    flat = stack.reshape(K, -1)
    w = weights.view(K, 1).to(stack.dtype)
    out = torch.empty(flat.shape[1], dtype=stack.dtype, device=stack.device)
    for start in range(0, flat.shape[1], CHUNK):
        x = flat[:, start:start + CHUNK]
        sign = x.sign()
        votes = x.sum(0) if method == "total" else sign.sum(0)
        majority = torch.where(votes >= 0, 1.0, -1.0)
        agree = (sign == majority).to(stack.dtype)
        out[start:start + CHUNK] = (w * x * agree).sum(0) / agree.sum(0).clamp(min=1.0)
    return out.reshape(stack.shape[1:])


def ties(stack: torch.Tensor, weights: torch.Tensor, *, density: float,
         majority_sign_method: Literal["total", "frequency"] = "total") -> torch.Tensor:
    """Trim each task tensor to its top `density` by magnitude, elect signs, average the agreeing entries."""
    return elect_and_merge(prune_magnitude(stack, density), weights, majority_sign_method)


register("ties", family="factor", op=ties, url=URL,
         summary="PEFT's ties: TIES on the A and on the B factors separately (equal ranks)")
register("ties_svd", family="dense", op=ties, url=URL, default_rank="max",
         summary="TIES on the dense deltas of each module, re-factored by SVD")
