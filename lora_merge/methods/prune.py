"""Magnitude pruning (keep the largest `density` share of each task tensor), as in PEFT's merge_utils."""

from __future__ import annotations

import torch

from .registry import register


def weighted_sum(stack: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_i w_i T_i for a stack (K, ...) and weights (K,)."""
    return (weights.view(-1, *([1] * (stack.dim() - 1))) * stack).sum(0)


def kth_largest(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest value of the 1-d tensor `x` (1 <= k <= numel), exactly.

    A full selection (`kthvalue`) over tens of millions of entries costs about a second on a CPU, and `topk`
    with k = numel / 2 several. Instead: a fixed random sample brackets the value, one pass counts the
    entries above the bracket, and the selection runs on the few entries inside it. If the bracket misses
    (it is 8 standard deviations wide), the full selection gives the answer.
    """
    n = x.numel()
    if n <= 1 << 20:
        return x.kthvalue(n - k + 1).values
    m = 1 << 16
    sample = x[torch.randint(n, (m,), generator=torch.Generator().manual_seed(0)).to(x.device)].sort().values
    q = 1.0 - k / n                                   # the value's quantile
    pos = q * (m - 1)
    margin = 8 * (m * q * (1 - q)) ** 0.5 + 16
    lo, hi = sample[max(0, int(pos - margin))], sample[min(m - 1, int(pos + margin) + 1)]
    above = int(torch.count_nonzero(x > hi))
    inside = x[(x >= lo) & (x <= hi)]
    need = k - above                                  # how many of the inside entries are among the top k
    if 1 <= need <= inside.numel():
        return inside.kthvalue(inside.numel() - need + 1).values
    return x.kthvalue(n - k + 1).values


def top_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of exactly k largest entries of the 1-d tensor `x` (what `topk(k).indices` selects; among
    entries tied at the threshold, the first ones)."""
    if k <= 0:
        return torch.zeros_like(x, dtype=torch.bool)
    v = kth_largest(x, k)
    keep = x >= v
    if int(torch.count_nonzero(keep)) == k:          # the usual case: no other entry equals the threshold
        return keep
    keep = x > v
    tied = x == v                                     # several entries equal it: keep the first of them
    tied &= tied.cumsum(0) <= k - int(torch.count_nonzero(keep))
    return keep | tied


def prune_magnitude(stack: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the int(density * numel) largest-magnitude entries of each tensor of the stack."""
    if density >= 1.0:
        return stack
    flat = stack.reshape(stack.shape[0], -1)
    k = int(density * flat.shape[1])
    out = torch.zeros_like(flat)
    for i in range(flat.shape[0]):                    # one task tensor at a time: one row of temporaries
        keep = top_mask(flat[i].abs(), k)
        out[i] = torch.where(keep, flat[i], 0.0)
    return out.reshape(stack.shape)


def magnitude_prune(stack: torch.Tensor, weights: torch.Tensor, *, density: float) -> torch.Tensor:
    """Prune each task tensor by magnitude, then take the weighted sum."""
    return weighted_sum(prune_magnitude(stack, density), weights)


register("magnitude_prune", family="factor", op=magnitude_prune,
         summary="PEFT's magnitude_prune: prune A and B factors by magnitude, weighted sum (equal ranks)")
register("magnitude_prune_svd", family="dense", op=magnitude_prune, default_rank="max",
         summary="prune each dense delta by magnitude, weighted sum, re-factor by SVD")
