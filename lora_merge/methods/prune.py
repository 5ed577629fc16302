"""Magnitude pruning (keep the largest `density` share of each task tensor), as in PEFT's merge_utils."""

from __future__ import annotations

import torch

from .registry import register
from .stack import TaskStack, as_stack

SMALL = 1 << 20      # task tensors up to this size are selected in one `kthvalue`
SAMPLE = 1 << 16


def weighted_sum(stack: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_i w_i T_i for a stack (K, ...) and weights (K,)."""
    return (weights.view(-1, *([1] * (stack.dim() - 1))) * stack).sum(0)


class MagnitudeMask:
    """Prunes the chunks of a `TaskStack`, in order, to the k = int(density * numel) largest-magnitude entries of
    each task tensor, exactly as `topk(k)` selects them (among entries tied at the threshold, the first ones).

    The threshold of each task tensor is its k-th largest magnitude. A full selection over tens of millions of
    entries costs seconds, so a fixed random sample of each brackets the value, one pass over the chunks
    counts the entries above the bracket and keeps those inside it, and the selection runs on those few. If a
    bracket misses (it is 8 standard deviations wide), that task tensor's full selection gives the answer.
    """

    def __init__(self, stack: TaskStack, density: float):
        self.k = min(stack.numel, int(density * stack.numel))
        self.v = torch.full((stack.K,), float("inf"), dtype=stack.dtype, device=stack.device)
        self.budget: list[int | None] = [None] * stack.K     # tied entries still to keep; None: all of them
        if self.k == stack.numel:
            self.v.fill_(0.0)
        elif self.k > 0:
            self._select(stack)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        a = x.abs()
        keep = (a >= self.v.view(-1, 1)).to(x.dtype)       # a float mask: multiplying is faster than `where`
        for i, left in enumerate(self.budget):
            if left is None:
                continue
            tied = (a[i] == self.v[i]).nonzero().squeeze(1)
            keep[i, tied[left:]] = 0.0                       # the first `left` tied entries stay
            self.budget[i] = max(0, left - tied.numel())
        return x * keep

    def _select(self, stack: TaskStack) -> None:
        n, k = stack.numel, self.k
        if n <= SMALL:                                      # all task tensors at once: one read of the stack
            whole = torch.cat([x.abs() for _, x in stack.chunks()], 1)
            for i in range(stack.K):
                self._settle(i, whole[i], 0)
            return
        gen = torch.Generator().manual_seed(0)
        q = 1.0 - k / n                                      # the threshold's quantile
        pos, margin = q * (SAMPLE - 1), 8 * (SAMPLE * q * (1 - q)) ** 0.5 + 16
        lo, hi = [], []
        for i in range(stack.K):
            idx = torch.randint(n, (SAMPLE,), generator=gen).to(stack.device)
            sample = stack.gather(i, idx).abs().sort().values
            lo.append(sample[max(0, int(pos - margin))])
            hi.append(sample[min(SAMPLE - 1, int(pos + margin) + 1)])
        lo, hi = torch.stack(lo).view(-1, 1), torch.stack(hi).view(-1, 1)
        above = torch.zeros(stack.K, dtype=torch.long, device=stack.device)
        inside: list[list[torch.Tensor]] = [[] for _ in range(stack.K)]
        for _, x in stack.chunks():
            a = x.abs()
            above += (a > hi).sum(1)
            within = (a >= lo) & (a <= hi)
            for i in range(stack.K):
                inside[i].append(a[i][within[i]])
        for i in range(stack.K):
            values = torch.cat(inside[i])
            if not 1 <= k - int(above[i]) <= values.numel():  # the bracket missed: select over the whole tensor
                values, above_i = stack.task(i).abs(), 0
            else:
                above_i = int(above[i])
            self._settle(i, values, above_i)

    def _settle(self, i: int, values: torch.Tensor, above: int) -> None:
        """Threshold of task i from the magnitudes `values` holding its k-th largest, `above` entries being
        larger than all of them."""
        v = values.kthvalue(values.numel() - (self.k - above) + 1).values
        greater = above + int(torch.count_nonzero(values > v))
        tied = int(torch.count_nonzero(values == v))
        self.v[i] = v
        self.budget[i] = None if greater + tied == self.k else self.k - greater


def prune_magnitude(stack: torch.Tensor | TaskStack, density: float) -> torch.Tensor:
    """Zero all but the int(density * numel) largest-magnitude entries of each task tensor; returns (K, ...)."""
    src = as_stack(stack)
    keep = MagnitudeMask(src, density)
    return torch.cat([keep(x) for _, x in src.chunks()], 1).reshape(src.K, *src.shape)


def magnitude_prune(stack: torch.Tensor | TaskStack, weights: torch.Tensor, *, density: float) -> torch.Tensor:
    """Prune each task tensor by magnitude, then take the weighted sum."""
    src = as_stack(stack)
    w = weights.view(-1, 1).to(src.dtype)
    keep = MagnitudeMask(src, density)
    return src.map_chunks(lambda _, x: (w * keep(x)).sum(0))


register("magnitude_prune", family="factor", op=magnitude_prune,
         summary="PEFT's magnitude_prune: prune A and B factors by magnitude, weighted sum (equal ranks)")
register("magnitude_prune_svd", family="dense", op=magnitude_prune, default_rank="max",
         summary="prune each dense delta by magnitude, weighted sum, re-factor by SVD")
