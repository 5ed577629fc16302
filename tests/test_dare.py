"""DARE's random masks: the keep rate and the rescaling, reproducibility by seed."""

from __future__ import annotations

import pytest
import torch

import lora_merge as lm
from lora_merge.methods.dare import dare_linear, dare_ties, drop_and_rescale, keep_mask


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_keep_rate_and_rescaling(density):
    n = 200_000
    out = drop_and_rescale(torch.ones(1, n), density, torch.Generator().manual_seed(0))
    kept = out != 0
    rate = float(kept.float().mean())
    sigma = (density * (1 - density) / n) ** 0.5
    assert abs(rate - density) < 5 * sigma
    assert torch.allclose(out[kept], torch.full_like(out[kept], 1 / density))
    assert abs(float(out.mean()) - 1.0) < 5 * sigma / density       # unbiased in expectation


def test_density_one_keeps_everything_and_zero_drops_everything():
    x = torch.randn(3, 50)
    assert torch.equal(drop_and_rescale(x, 1.0, None), x)
    assert torch.count_nonzero(drop_and_rescale(x, 0.0, None)) == 0


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "dare_ties_svd"])
def test_seed_makes_a_merge_reproducible(same_rank, method):
    adapters = [lm.load(p) for p in same_rank]
    one = lm.merge(adapters, [0.5, 0.5, 0.5], method, density=0.5, seed=3)
    two = lm.merge(adapters, [0.5, 0.5, 0.5], method, density=0.5, seed=3)
    other = lm.merge(adapters, [0.5, 0.5, 0.5], method, density=0.5, seed=4)
    m = "model.layers.0.self_attn.q_proj"
    assert torch.equal(one.delta(m), two.delta(m))
    assert not torch.equal(one.delta(m), other.delta(m))
    assert one.provenance["params"]["seed"] == 3


def test_dare_linear_factor_entries_are_dropped_and_rescaled(same_rank):
    """With one adapter of weight 1, dare_linear's A and B are sqrt(s) times the adapter's, with entries dropped
    and the rest scaled by 1/density."""
    a = lm.load(same_rank[0])
    out = lm.merge([a], [1.0], "dare_linear", density=0.25, seed=0)
    m = "model.layers.1.self_attn.v_proj"
    src, got = a.modules[m], out.modules[m]
    for mine, theirs in ((got.A, src.A), (got.B, src.B)):
        ratio = mine / (src.scale ** 0.5 * theirs.float())
        kept = mine != 0
        assert torch.allclose(ratio[kept], torch.full_like(ratio[kept], 4.0), rtol=1e-5)
        assert 0.05 < float(kept.float().mean()) < 0.5


@pytest.mark.parametrize("method", ["total", "frequency"])
def test_dare_is_the_formula_on_the_kept_entries_rescaled(method):
    """DARE-TIES and DARE-linear (which fold 1/density into the weights) against the written-out formula in
    float64, on the same masks (one chunk: the masks are `keep_mask` of the stacked tasks)."""
    x = torch.randn(4, 300, 70, generator=torch.Generator().manual_seed(0))
    w = torch.tensor([0.7, -0.4, 0.5, 1.2])
    mask = keep_mask((4, 300 * 70), 0.3, torch.Generator().manual_seed(5)).view(x.shape).double()
    assert 0.28 < float(mask.mean()) < 0.32
    d = x.double() * mask / 0.3
    votes = d.sum(0) if method == "total" else d.sign().sum(0)
    agree = ((d.sign() == torch.where(votes >= 0, 1.0, -1.0)) & (d != 0)).double()
    want = (w.double().view(-1, 1, 1) * d * agree).sum(0) / agree.sum(0).clamp(min=1)
    got = dare_ties(x, w, density=0.3, majority_sign_method=method, rng=torch.Generator().manual_seed(5))
    assert float((got.double() - want).abs().max()) < 1e-5
    got = dare_linear(x, w, density=0.3, rng=torch.Generator().manual_seed(5))
    assert float((got.double() - (w.double().view(-1, 1, 1) * d).sum(0)).abs().max()) < 1e-5
