"""TIES-merging (Yadav et al., 2023): trim, elect sign, disjoint merge; PEFT's semantics.

The sign is elected on the trimmed, unweighted task tensors; the weighted tensors that agree with it are
averaged (divided by how many agree), as in PEFT's `ties`. Everything is element-wise, so it runs over the
chunks of the task tensors (`stack.TaskStack`): trimming, election and merge in one pass over each chunk.
"""

from __future__ import annotations

from typing import Literal

import torch

from .prune import MagnitudeMask
from .registry import register
from .stack import TaskStack, as_stack

URL = "https://arxiv.org/abs/2306.01708"


def elect_and_merge(x: torch.Tensor, w: torch.Tensor, method: str) -> torch.Tensor:
    """For entries x (K, c) and weights w (K, 1): the majority sign per entry (from the unweighted entries; +1
    where the vote is zero), then the mean of the agreeing weighted entries (c,). Written in float arithmetic
    rather than boolean masks and `where`, which are several times slower on a CPU; the values are the same."""
    votes = x.sum(0) if method == "total" else x.sign().sum(0)
    majority = torch.ones_like(votes).copysign_(votes + 0.0)      # + 0.0 turns a -0.0 vote into +0.0: +1
    agree = (x * majority).clamp_(min=0.0).sign_()                 # 1: non-zero and of the majority's sign
    ones = torch.ones(1, x.shape[0], dtype=x.dtype, device=x.device)
    # the two sums over the K tasks as (1, K) @ (K, c) products: one pass each
    return (w.view(1, -1) @ (x * agree)).squeeze(0) / (ones @ agree).squeeze(0).clamp_(min=1.0)


def ties(stack: torch.Tensor | TaskStack, weights: torch.Tensor, *, density: float,
         majority_sign_method: Literal["total", "frequency"] = "total") -> torch.Tensor:
    """Trim each task tensor to its top `density` by magnitude, elect signs, average the agreeing entries."""
    src = as_stack(stack)
    w = weights.view(-1, 1).to(src.dtype)
    keep = MagnitudeMask(src, density)
    return src.map_chunks(lambda _, x: elect_and_merge(keep(x), w, majority_sign_method))


register("ties", family="factor", op=ties, url=URL,
         summary="PEFT's ties: TIES on the A and on the B factors separately (equal ranks)")
register("ties_svd", family="dense", op=ties, url=URL, default_rank="max",
         summary="TIES on the dense deltas of each module, re-factored by SVD")
