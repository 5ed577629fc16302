"""The batched and randomized re-factoring paths against the exact per-matrix SVD, on matrices whose spectra are
known, and the rule that picks between them. Tolerances are the ones stated in the README."""

from __future__ import annotations

import pytest
import torch
from conftest import rel

from lora_merge.errors import MethodError
from lora_merge.linalg import dense_svd, randomized_svd, refactor, truncate, use_randomized


def known(m: int, n: int, s: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """U diag(s) V^T with random orthonormal U (m x len(s)) and V (n x len(s)), in float64."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, len(s), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=torch.float64))
    return (u * s.double()) @ v.T


def best(D: torch.Tensor, k: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(D.double(), full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k]


SPECTRA = {
    "low rank (rank 20 < k + p)": torch.cat([torch.linspace(5, 1, 20), torch.zeros(0)]),
    "geometric decay 0.8^i": 0.8 ** torch.arange(120, dtype=torch.float64),
    "gap after k": torch.cat([torch.linspace(10, 5, 16), torch.full((100,), 0.5)]),
}


@pytest.mark.parametrize("name", SPECTRA)
def test_randomized_equals_exact_truncation_where_the_spectrum_allows(name):
    k = 16
    D = known(300, 260, SPECTRA[name]).float()
    u, s, vh = randomized_svd(D, k)
    assert u.shape == (300, k) and s.shape == (k,) and vh.shape == (k, 260)
    assert rel(s, torch.linalg.svdvals(D.double())[:k]) < 1e-5
    assert rel((u * s) @ vh, best(D, k)) < 1e-4


def test_randomized_without_a_gap_is_near_optimal():
    """s_i = 1/sqrt(i) has no gap at k: the top-k subspace itself is ill-determined, but the approximation
    error stays within 1% of the optimal (Eckart-Young) error."""
    k = 16
    s = 1 / torch.arange(1, 201, dtype=torch.float64).sqrt()
    D = known(400, 300, s).float()
    u, S, vh = randomized_svd(D, k)
    optimal = float(s[k:].norm())
    ours = float((D.double() - ((u * S) @ vh).double()).norm())
    assert optimal <= ours * (1 + 1e-6)
    assert ours <= 1.01 * optimal


def test_randomized_batched_equals_one_at_a_time():
    stack = torch.stack([known(200, 150, 0.85 ** torch.arange(100, dtype=torch.float64), seed=i).float()
                         for i in range(4)])
    u, s, vh = randomized_svd(stack, 8)
    for i in range(4):
        ui, si, vhi = randomized_svd(stack[i], 8)
        assert torch.allclose((u[i] * s[i]) @ vh[i], (ui * si) @ vhi, atol=1e-6 * float(si[0]), rtol=0)


def test_randomized_is_deterministic():
    D = known(100, 90, 0.9 ** torch.arange(60, dtype=torch.float64)).float()
    a, b = randomized_svd(D, 5), randomized_svd(D, 5)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_batched_exact_refactor_equals_per_matrix_svd():
    stack = torch.randn(5, 40, 30, generator=torch.Generator().manual_seed(0))
    out = refactor(stack, rank=6, energy=None, mode="exact")
    for i, (B, A) in enumerate(out):
        Bi, Ai = truncate(*dense_svd(stack[i]), 6)
        assert rel(B @ A, Bi @ Ai) < 1e-5
        assert rel(B @ A, best(stack[i], 6)) < 1e-5


def test_energy_per_matrix_in_a_batch():
    """Rank by energy is chosen per matrix even when they are decomposed together."""
    a = known(50, 40, torch.tensor([1.0, 1e-4, 1e-4]), seed=1)
    b = known(50, 40, torch.tensor([1.0, 1.0, 1.0]), seed=2)
    (Ba, Aa), (Bb, Ab) = refactor(torch.stack([a, b]).float(), rank=None, energy=0.99, mode="auto")
    assert Ba.shape[1] == 1 and Bb.shape[1] == 3


def test_the_auto_rule():
    assert not use_randomized((64, 64), 8, None, "auto")              # small: the exact SVD is cheap
    assert use_randomized((4096, 11008), 16, None, "auto")
    assert not use_randomized((4096, 11008), 16, 0.9, "auto")         # energy needs the whole spectrum
    assert not use_randomized((4096, 11008), 16, None, "exact")
    assert not use_randomized((4096, 11008), 2000, None, "auto")      # sketch too wide to pay
    assert use_randomized((2048, 2048), 16, None, "auto", oversample=160)
    assert not use_randomized((2048, 2048), 16, None, "auto", oversample=600)   # many inputs: a wide sketch
    assert use_randomized((64, 64), 8, None, "randomized")
    with pytest.raises(MethodError, match="needs a rank"):
        use_randomized((64, 64), None, 0.9, "randomized")
    with pytest.raises(MethodError, match="svd must be"):
        use_randomized((64, 64), 8, None, "fast")
