"""Low-rank linear algebra on tensors: factored SVD, rank selection, dense re-factoring.

A sum of LoRAs is `B @ A` with `B = [B_1 ... B_k]` (m x R) and `A = [A_1; ...; A_k]` (R x n). Its SVD comes
from `B = Q_b R_b`, `A^T = Q_a R_a`, and the SVD of the small core `R_b R_a^T` (at most R x R):
`B A = (Q_b U) S (Q_a V)^T`. That costs O((m + n) R^2 + R^3) instead of the O(m n min(m, n)) of a dense SVD,
and never forms the m x n matrix. Functions accept leading batch dimensions where noted.
"""

from __future__ import annotations

import torch

from .errors import MethodError


def factored_svd(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of `B @ A` without forming it: returns U (m x k), S (k), Vh (k x n), k = min(m, n, R).

    Batched over leading dimensions. Singular values are in descending order.
    """
    qb, rb = torch.linalg.qr(B)            # (m, kb), (kb, R)
    qa, ra = torch.linalg.qr(A.mT)         # (n, ka), (ka, R)
    u, s, vh = torch.linalg.svd(rb @ ra.mT, full_matrices=False)
    return qb @ u, s, vh @ qa.mT


def dense_svd(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of a dense matrix (batched over leading dimensions)."""
    return torch.linalg.svd(delta, full_matrices=False)


def select_rank(s: torch.Tensor, rank: int | None = None, energy: float | None = None) -> int:
    """How many singular values to keep.

    `rank` caps the count; `energy` asks for the smallest k whose squared singular values hold at least that
    share of the total. With both, the smaller wins; with neither, all are kept. Never below 1, so that the
    result stays a valid LoRA even for an all-zero module.
    """
    k = s.shape[-1]
    if energy is not None:
        if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0.0 < energy <= 1.0:
            raise MethodError(f"energy must be in (0, 1], got {energy}", key="energy")
        sq = s.double() ** 2
        total = float(sq.sum())
        if total == 0.0:
            k = 1
        else:
            share = torch.cumsum(sq, 0) / total
            # the tolerance keeps energy=1.0 from demanding singular values that are rounding noise
            target = torch.tensor(energy - 1e-12, dtype=share.dtype, device=share.device)
            k = min(k, int(torch.searchsorted(share, target)) + 1)
    if rank is not None:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise MethodError(f"rank must be an integer >= 1, got {rank!r}", key="rank")
        k = min(k, rank)
    return max(1, k)


def truncate(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int | None = None,
             energy: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (B, A) of the best approximation of `u diag(s) vh` at the selected rank.

    As in PEFT, the singular values go to B: `B = U_k S_k`, `A = Vh_k`.
    """
    k = select_rank(s, rank, energy)
    return u[:, :k] * s[:k], vh[:k].contiguous()


def lowrank(B: torch.Tensor, A: torch.Tensor, rank: int | None = None,
            energy: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (B', A') of the best approximation of `B @ A` at the selected rank, via the factored SVD."""
    return truncate(*factored_svd(B, A), rank, energy)
