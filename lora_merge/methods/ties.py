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


def elect_and_merge(stack: torch.Tensor, weights: torch.Tensor, method: str) -> torch.Tensor:
    """Majority sign per entry (from the unweighted stack), then the mean of the agreeing weighted entries."""
    sign = stack.sign()
    votes = stack.sum(0) if method == "total" else sign.sum(0)
    majority = torch.where(votes >= 0, 1.0, -1.0)
    agree = (sign == majority).to(stack.dtype)
    weighted = weights.view(-1, *([1] * (stack.dim() - 1))) * stack
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1.0)


def ties(stack: torch.Tensor, weights: torch.Tensor, *, density: float,
         majority_sign_method: Literal["total", "frequency"] = "total") -> torch.Tensor:
    """Trim each task tensor to its top `density` by magnitude, elect signs, average the agreeing entries."""
    return elect_and_merge(prune_magnitude(stack, density), weights, majority_sign_method)


register("ties", family="factor", op=ties, url=URL,
         summary="PEFT's ties: TIES on the A and on the B factors separately (equal ranks)")
register("ties_svd", family="dense", op=ties, url=URL, default_rank="max",
         summary="TIES on the dense deltas of each module, re-factored by SVD")
