"""DARE (Yu et al., 2023): drop entries at random with probability 1 - density, rescale the rest by 1/density.

Masks come from a `torch.Generator` seeded by the `seed` parameter, so a merge is reproducible. They are drawn
chunk by chunk of the task tensors (`stack.TaskStack`), in order, on the CPU where the generator lives, so a
seed gives the same masks on every device.
"""

from __future__ import annotations

from typing import Literal

import torch

from .registry import register
from .stack import TaskStack, as_stack
from .ties import elect_and_merge

URL = "https://arxiv.org/abs/2311.03099"


def drop_and_rescale(x: torch.Tensor, density: float, rng: torch.Generator | None) -> torch.Tensor:
    """Keep each entry with probability `density` and divide the kept ones by `density`."""
    if density >= 1.0:
        return x
    if density <= 0.0:
        return torch.zeros_like(x)
    keep = (torch.rand(x.shape, generator=rng) < density).to(x.dtype)   # Bernoulli(density), 2-3x faster
    return x * keep.to(x.device) / density


def dare_linear(stack: torch.Tensor | TaskStack, weights: torch.Tensor, *, density: float,
                rng: torch.Generator | None = None) -> torch.Tensor:
    """DARE, then the weighted sum."""
    src = as_stack(stack)
    w = weights.view(-1, 1).to(src.dtype)
    return src.map_chunks(lambda _, x: (w * drop_and_rescale(x, density, rng)).sum(0))


def dare_ties(stack: torch.Tensor | TaskStack, weights: torch.Tensor, *, density: float,
              majority_sign_method: Literal["total", "frequency"] = "total",
              rng: torch.Generator | None = None) -> torch.Tensor:
    """DARE, then TIES' sign election and disjoint merge."""
    src = as_stack(stack)
    w = weights.view(-1, 1).to(src.dtype)
    return src.map_chunks(lambda _, x: elect_and_merge(drop_and_rescale(x, density, rng), w, majority_sign_method))


register("dare_linear", family="factor", op=dare_linear, url=URL,
         summary="PEFT's dare_linear: DARE on the A and B factors separately, weighted sum (equal ranks)")
register("dare_ties", family="factor", op=dare_ties, url=URL,
         summary="PEFT's dare_ties: DARE then TIES on the A and B factors separately (equal ranks)")
register("dare_linear_svd", family="dense", op=dare_linear, url=URL, default_rank="max",
         summary="DARE on the dense deltas, weighted sum, re-factored by SVD")
register("dare_ties_svd", family="dense", op=dare_ties, url=URL, default_rank="max",
         summary="DARE then TIES on the dense deltas, re-factored by SVD")
