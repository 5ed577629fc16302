"""DARE (Yu et al., 2023): drop entries at random with probability 1 - density, rescale the rest by 1/density.

Masks come from a `torch.Generator` seeded by the `seed` parameter, so a merge is reproducible. They are drawn
chunk by chunk of the task tensors (`stack.TaskStack`), in order, on the CPU where the generator lives, so a
seed gives the same masks on every device.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from .registry import register
from .stack import TaskStack, as_stack
from .ties import elect_and_merge

URL = "https://arxiv.org/abs/2311.03099"


def keep_mask(shape, density: float, rng: torch.Generator | None, dtype=torch.float32) -> torch.Tensor:
    """1 where an entry is kept, 0 where it is dropped: independent Bernoulli draws whose keep probability is
    `density` rounded to a multiple of 2^-16 (at most 7.6e-6 off). Each 64-bit draw of the generator gives four
    16-bit uniforms, half the cost of `rand` (which makes 24-bit floats, one 32-bit draw each)."""
    n = math.prod(shape)
    bits = torch.randint(-2**63, 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, generator=rng)
    threshold = round(density * 65536) - 32768                          # u16 < t  <=>  int16 < t - 32768
    return (bits.view(torch.int16)[:n] < threshold).to(dtype).view(shape)


def _dropped(x: torch.Tensor, density: float, rng: torch.Generator | None) -> torch.Tensor:
    """The kept entries of x (`keep_mask`), not yet rescaled: the callers fold 1/density into their weights."""
    if density >= 1.0:
        return x
    if density <= 0.0:
        return torch.zeros_like(x)
    return x * keep_mask(x.shape, density, rng, x.dtype).to(x.device)


def _rescale(density: float) -> float:
    """What the kept entries are divided by: `density`, or 1 where nothing or everything is dropped."""
    return density if 0.0 < density < 1.0 else 1.0


def drop_and_rescale(x: torch.Tensor, density: float, rng: torch.Generator | None) -> torch.Tensor:
    """Keep each entry with probability `density` (`keep_mask`) and divide the kept ones by `density`."""
    return _dropped(x, density, rng) / _rescale(density)


def dare_linear(stack: torch.Tensor | TaskStack, weights: torch.Tensor, *, density: float,
                rng: torch.Generator | None = None) -> torch.Tensor:
    """DARE, then the weighted sum."""
    src = as_stack(stack)
    w = weights.view(1, -1).to(src.dtype) / _rescale(density)
    return src.map_chunks(lambda _, x: (w @ _dropped(x, density, rng)).squeeze(0))


def dare_ties(stack: torch.Tensor | TaskStack, weights: torch.Tensor, *, density: float,
              majority_sign_method: Literal["total", "frequency"] = "total",
              rng: torch.Generator | None = None) -> torch.Tensor:
    """DARE, then TIES' sign election and disjoint merge. Rescaling by 1/density changes no sign and no vote's
    sign, so it is applied to the weights instead of the entries."""
    src = as_stack(stack)
    w = weights.view(-1, 1).to(src.dtype) / _rescale(density)
    return src.map_chunks(lambda _, x: elect_and_merge(_dropped(x, density, rng), w, majority_sign_method))


register("dare_linear", family="factor", op=dare_linear, url=URL,
         summary="PEFT's dare_linear: DARE on the A and B factors separately, weighted sum (equal ranks)")
register("dare_ties", family="factor", op=dare_ties, url=URL,
         summary="PEFT's dare_ties: DARE then TIES on the A and B factors separately (equal ranks)")
register("dare_linear_svd", family="dense", op=dare_linear, url=URL, default_rank="max",
         summary="DARE on the dense deltas, weighted sum, re-factored by SVD")
register("dare_ties_svd", family="dense", op=dare_ties, url=URL, default_rank="max",
         summary="DARE then TIES on the dense deltas, re-factored by SVD")
