"""Magnitude pruning (keep the largest `density` share of each task tensor), as in PEFT's merge_utils."""

from __future__ import annotations

import torch

from .registry import register


def weighted_sum(stack: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_i w_i T_i for a stack (K, ...) and weights (K,)."""
    return (weights.view(-1, *([1] * (stack.dim() - 1))) * stack).sum(0)


def prune_magnitude(stack: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the int(density * numel) largest-magnitude entries of each tensor of the stack."""
    if density >= 1.0:
        return stack
    flat = stack.reshape(stack.shape[0], -1)
    k = int(density * flat.shape[1])
    mask = torch.zeros_like(flat)
    if k > 0:
        mask.scatter_(1, flat.abs().topk(k, dim=1).indices, 1.0)
    return (flat * mask).reshape(stack.shape)


def magnitude_prune(stack: torch.Tensor, weights: torch.Tensor, *, density: float) -> torch.Tensor:
    """Prune each task tensor by magnitude, then take the weighted sum."""
    return weighted_sum(prune_magnitude(stack, density), weights)


register("magnitude_prune", family="factor", op=magnitude_prune,
         summary="PEFT's magnitude_prune: prune A and B factors by magnitude, weighted sum (equal ranks)")
register("magnitude_prune_svd", family="dense", op=magnitude_prune, default_rank="max",
         summary="prune each dense delta by magnitude, weighted sum, re-factor by SVD")
