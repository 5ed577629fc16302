"""DARE (Yu et al., 2023): drop entries at random with probability 1 - density, rescale the rest by 1/density.

Masks come from a `torch.Generator` seeded by the `seed` parameter, so a merge is reproducible.
"""

from __future__ import annotations

from typing import Literal

import torch

from .prune import weighted_sum
from .registry import register
from .ties import elect_and_merge

URL = "https://arxiv.org/abs/2311.03099"


def drop_and_rescale(stack: torch.Tensor, density: float, rng: torch.Generator | None) -> torch.Tensor:
    """Keep each entry with probability `density` and divide the kept ones by `density`."""
    if density >= 1.0:
        return stack
    if density <= 0.0:
        return torch.zeros_like(stack)
    # the mask is drawn on the CPU, where the generator lives, so a seed gives the same mask on every device
    keep = torch.bernoulli(torch.full(stack.shape, density, dtype=stack.dtype), generator=rng)
    return stack * keep.to(stack.device) / density


def dare_linear(stack: torch.Tensor, weights: torch.Tensor, *, density: float,
                rng: torch.Generator | None = None) -> torch.Tensor:
    """DARE, then the weighted sum."""
    return weighted_sum(drop_and_rescale(stack, density, rng), weights)


def dare_ties(stack: torch.Tensor, weights: torch.Tensor, *, density: float,
              majority_sign_method: Literal["total", "frequency"] = "total",
              rng: torch.Generator | None = None) -> torch.Tensor:
    """DARE, then TIES' sign election and disjoint merge."""
    return elect_and_merge(drop_and_rescale(stack, density, rng), weights, majority_sign_method)


register("dare_linear", family="factor", op=dare_linear, url=URL,
         summary="PEFT's dare_linear: DARE on the A and B factors separately, weighted sum (equal ranks)")
register("dare_ties", family="factor", op=dare_ties, url=URL,
         summary="PEFT's dare_ties: DARE then TIES on the A and B factors separately (equal ranks)")
register("dare_linear_svd", family="dense", op=dare_linear, url=URL, default_rank="max",
         summary="DARE on the dense deltas, weighted sum, re-factored by SVD")
register("dare_ties_svd", family="dense", op=dare_ties, url=URL, default_rank="max",
         summary="DARE then TIES on the dense deltas, re-factored by SVD")
