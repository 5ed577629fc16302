"""The fast exact magnitude pruning against `topk`, PEFT's way, on tensors large enough for the sampled bracket,
with ties at the threshold, and the element-wise TIES merge run in chunks against one pass."""

from __future__ import annotations

import pytest
import torch

from lora_merge.methods import ties as ties_module
from lora_merge.methods.prune import kth_largest, prune_magnitude, top_mask


def reference(stack: torch.Tensor, density: float) -> torch.Tensor:
    flat = stack.reshape(stack.shape[0], -1)
    k = int(density * flat.shape[1])
    mask = torch.zeros_like(flat)
    mask.scatter_(1, flat.abs().topk(k, dim=1).indices, 1.0)
    return (flat * mask).reshape(stack.shape)


@pytest.mark.parametrize("density", [0.001, 0.2, 0.5, 0.97])
def test_large_tensors_are_pruned_exactly_as_topk(density):
    x = torch.randn(2, 1500, 1500, generator=torch.Generator().manual_seed(1))      # 2.25M > the 1M cut-off
    assert torch.equal(prune_magnitude(x, density), reference(x, density))


def test_kth_largest_on_skewed_and_tied_values():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3_000_000, generator=g).exp()                  # heavy tail
    for k in (1, 17, 1_500_000, 2_999_999, 3_000_000):
        assert float(kth_largest(x, k)) == float(x.topk(k).values[-1])
    y = torch.randint(0, 5, (2_000_000,), generator=g).float()     # five values, massively tied
    for k in (1, 400_000, 1_000_001):
        assert float(kth_largest(y, k)) == float(y.topk(k).values[-1])
        mask = top_mask(y, k)
        assert int(mask.sum()) == k
        assert float(y[mask].sum()) == float(y.topk(k).values.sum())


def test_chunked_ties_equals_one_pass(monkeypatch):
    stack = torch.randn(4, 300, 70, generator=torch.Generator().manual_seed(3))
    w = torch.tensor([0.4, -0.2, 0.9, 0.5])
    whole = {m: ties_module.elect_and_merge(stack, w, m) for m in ("total", "frequency")}
    monkeypatch.setattr(ties_module, "CHUNK", 1000)               # 21 chunks, the last one short
    for m, expected in whole.items():
        assert torch.equal(ties_module.elect_and_merge(stack, w, m), expected)
