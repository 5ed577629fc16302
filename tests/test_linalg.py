"""Factored SVD against a float64 dense SVD of the summed delta, and rank selection."""

from __future__ import annotations

import pytest
import torch
from conftest import rel

from lora_merge.linalg import factored_svd, select_rank, truncate


def _known_spectrum(m=48, n=40, R=12, seed=0):
    """B (m x R) and A (R x n) whose product has singular values 2^0 .. 2^-(R-1), hidden by a random mixing M."""
    g = torch.Generator().manual_seed(seed)
    u0, _ = torch.linalg.qr(torch.randn(m, R, generator=g, dtype=torch.float64))
    v0, _ = torch.linalg.qr(torch.randn(n, R, generator=g, dtype=torch.float64))
    s0 = 2.0 ** -torch.arange(R, dtype=torch.float64)
    M = torch.randn(R, R, generator=g, dtype=torch.float64) + 3 * torch.eye(R, dtype=torch.float64)
    return (u0 * s0) @ M, torch.linalg.solve(M, v0.T), s0


def test_singular_values_match_float64_dense_svd():
    B, A, s0 = _known_spectrum()
    u, s, vh = factored_svd(B.float(), A.float())
    dense = torch.linalg.svdvals(B @ A)[: s.shape[0]]
    assert torch.allclose(s.double(), dense, rtol=1e-5, atol=1e-6 * float(dense[0]))
    assert torch.allclose(dense, s0, rtol=1e-10)
    assert rel(u @ torch.diag(s) @ vh, B @ A) < 1e-5


@pytest.mark.parametrize("k", [1, 3, 7])
def test_truncation_is_the_optimal_rank_k_approximation(k):
    B, A, _ = _known_spectrum()
    Bk, Ak = truncate(*factored_svd(B.float(), A.float()), rank=k)
    U, S, Vh = torch.linalg.svd(B @ A, full_matrices=False)
    best = (U[:, :k] * S[:k]) @ Vh[:k]
    assert Bk.shape == (48, k) and Ak.shape == (k, 40)
    assert rel(Bk @ Ak, best) < 1e-5
    # Eckart-Young: the error is the norm of the dropped singular values
    err = float((Bk.double() @ Ak.double() - B @ A).norm())
    assert err == pytest.approx(float(S[k:].norm()), rel=1e-4)


def test_factored_svd_is_batched():
    pairs = [_known_spectrum(seed=s) for s in range(3)]
    B = torch.stack([b for b, _, _ in pairs]).float()
    A = torch.stack([a for _, a, _ in pairs]).float()
    u, s, vh = factored_svd(B, A)
    for i in range(3):
        assert rel(u[i] @ torch.diag(s[i]) @ vh[i], B[i] @ A[i]) < 1e-5


def test_more_rank_than_dimensions_is_exact():
    g = torch.Generator().manual_seed(1)
    B, A = torch.randn(6, 20, generator=g), torch.randn(20, 5, generator=g)   # R = 20 > m, n
    u, s, vh = factored_svd(B, A)
    assert s.shape == (5,)
    assert rel(u @ torch.diag(s) @ vh, B @ A) < 1e-5


def test_select_rank_by_energy_and_cap():
    s = torch.tensor([3.0, 2.0, 1.0])           # squared: 9, 4, 1 of 14
    assert select_rank(s, energy=0.6) == 1       # 9/14 = 0.643
    assert select_rank(s, energy=0.9) == 2       # 13/14 = 0.929
    assert select_rank(s, energy=0.95) == 3
    assert select_rank(s, energy=1.0) == 3
    assert select_rank(s, rank=2, energy=0.95) == 2
    assert select_rank(s) == 3
    assert select_rank(torch.zeros(4), energy=0.5) == 1    # an all-zero module still gives a valid LoRA
