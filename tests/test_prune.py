"""The chunked element-wise methods: exact magnitude pruning against `topk` (PEFT's way) on tensors large enough
for the sampled bracket, with ties at the threshold; results independent of the chunk size; the deltas read a
block of rows at a time (`LowRankStack`) against the dense deltas."""

from __future__ import annotations

import pytest
import torch

from lora_merge.methods import stack as stack_module
from lora_merge.methods.dare import dare_linear, dare_ties
from lora_merge.methods.prune import magnitude_prune, prune_magnitude
from lora_merge.methods.stack import LowRankStack
from lora_merge.methods.ties import ties


def reference(stack: torch.Tensor, density: float) -> torch.Tensor:
    flat = stack.reshape(stack.shape[0], -1)
    k = int(density * flat.shape[1])
    mask = torch.zeros_like(flat)
    mask.scatter_(1, flat.abs().topk(k, dim=1).indices, 1.0)
    return (flat * mask).reshape(stack.shape)


def ties_reference(stack: torch.Tensor, w: torch.Tensor, density: float, method: str) -> torch.Tensor:
    """PEFT's ties, written out: trim, elect on the unweighted trimmed tensors, disjoint mean of weighted ones."""
    trimmed = reference(stack, density)
    sign = trimmed.sign()
    votes = trimmed.sum(0) if method == "total" else sign.sum(0)
    majority = torch.where(votes >= 0, 1.0, -1.0)
    agree = (sign == majority).float()
    weighted = w.view(-1, 1, 1) * trimmed
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1.0)


@pytest.mark.parametrize("density", [0.0, 0.001, 0.2, 0.5, 0.97, 1.0])
def test_large_tensors_are_pruned_exactly_as_topk(density):
    x = torch.randn(2, 1500, 1500, generator=torch.Generator().manual_seed(1))      # 2.25M > the 1M cut-off
    assert torch.equal(prune_magnitude(x, density), reference(x, density))


@pytest.mark.parametrize("k", [1, 400_000, 1_000_001, 1_999_999])
def test_ties_at_the_threshold_keep_the_first_entries(k):
    """Five values, massively tied: exactly k entries stay, the first tied ones in flat order, whatever chunks
    the threshold's ties fall into."""
    g = torch.Generator().manual_seed(2)
    sign = torch.randint(0, 2, (1, 2000, 1000), generator=g) * 2 - 1
    y = torch.randint(1, 6, (1, 2000, 1000), generator=g).float() * sign
    got = prune_magnitude(y, (k + 0.5) / y.numel())
    assert int(torch.count_nonzero(got)) == k
    flat, out = y.flatten().abs(), got.flatten()
    v = flat.topk(k).values[-1]
    assert torch.equal(out[flat > v], y.flatten()[flat > v])                 # all above the threshold kept
    kept_ties = (out != 0) & (flat == v)
    last = int(kept_ties.nonzero().max()) if kept_ties.any() else -1
    assert not ((flat[:last + 1] == v) & (out[:last + 1] == 0)).any()        # no tied entry skipped before it


def test_heavy_tailed_values_select_exactly():
    x = torch.randn(1, 3_000_000, generator=torch.Generator().manual_seed(3)).exp()
    for density in (1 / 3_000_000, 0.5, 0.999):
        assert torch.equal(prune_magnitude(x, density), reference(x, density))


@pytest.mark.parametrize("method", ["total", "frequency"])
def test_ties_equals_the_written_out_formula(method):
    stack = torch.randn(4, 300, 70, generator=torch.Generator().manual_seed(4))
    w = torch.tensor([0.4, -0.2, 0.9, 0.5])
    assert torch.allclose(ties(stack, w, density=0.3, majority_sign_method=method),
                          ties_reference(stack, w, 0.3, method), atol=1e-7)


def _low_rank(K=3, m=1100, n=1000, ranks=(4, 8, 2), seed=5):
    g = torch.Generator().manual_seed(seed)
    Bs = [torch.randn(m, r, generator=g) for r in ranks[:K]]
    As = [torch.randn(r, n, generator=g) for r in ranks[:K]]
    scales = [0.5, 2.0, 1.5][:K]
    dense = torch.stack([(b @ a) * s for b, a, s in zip(Bs, As, scales)])
    return LowRankStack(Bs, As, scales), dense


def test_low_rank_stack_reads_the_dense_deltas():
    src, dense = _low_rank()
    assert torch.allclose(torch.cat([x for _, x in src.chunks()], 1).reshape(dense.shape), dense, atol=1e-5)
    idx = torch.tensor([0, 5, 999, 1000, 1_099_999])
    assert torch.allclose(src.gather(1, idx), dense[1].flatten()[idx], atol=1e-5)


def test_methods_on_low_rank_deltas_match_the_dense_ones():
    src, _ = _low_rank()
    dense = torch.cat([x for _, x in src.chunks()], 1).reshape(src.K, *src.shape)   # the very same floats
    w = torch.tensor([0.7, -0.4, 0.5])
    assert torch.equal(ties(src, w, density=0.2), ties(dense, w, density=0.2))
    assert torch.equal(magnitude_prune(src, w, density=0.2), magnitude_prune(dense, w, density=0.2))
    for op in (dare_linear, dare_ties):
        assert torch.equal(op(src, w, density=0.4, rng=torch.Generator().manual_seed(1)),
                           op(dense, w, density=0.4, rng=torch.Generator().manual_seed(1)))


def test_results_do_not_depend_on_the_chunk_size(monkeypatch):
    """On given task tensors, the chunking changes nothing (the low-rank deltas themselves may round differently
    in another block size: BLAS picks its kernels by shape, so the chunk size is a fixed constant)."""
    src, _ = _low_rank()
    dense = torch.cat([x for _, x in src.chunks()], 1).reshape(src.K, *src.shape)
    w = torch.tensor([0.7, -0.4, 0.5])
    before = {m: ties(dense, w, density=0.3, majority_sign_method=m) for m in ("total", "frequency")}
    pruned = magnitude_prune(dense, w, density=0.3)
    monkeypatch.setattr(stack_module, "CHUNK", 7 * 1000 + 13)   # 7 rows per chunk, the last one short
    for m, expected in before.items():
        assert torch.equal(ties(dense, w, density=0.3, majority_sign_method=m), expected)
    assert torch.equal(magnitude_prune(dense, w, density=0.3), pruned)
    assert torch.allclose(ties(src, w, density=0.3), before["total"], atol=1e-4)
