"""PEM arithmetic on Adapter objects: exact in delta space, lazy; compress; expressions; PEM factor mode."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import rel

import lora_merge as lm


@pytest.fixture()
def abc(same_rank):
    return [lm.load(p) for p in same_rank]


def _formula(terms, module):
    """sum_i c_i s_i B_i A_i in float64 over the adapters that have the module."""
    out = 0
    for c, a in terms:
        if module in a.modules:
            w = a.modules[module]
            out = out + c * w.scale * (w.B.double() @ w.A.double())
    return out


def test_arithmetic_laws_hold_in_delta_space(same_rank, abc):
    a, b, _ = abc
    b2 = lm.load(same_rank[1])                      # another object: no coefficient cancellation
    a2 = lm.load(same_rank[0])
    negated = -a2
    for m in a.modules:
        assert rel(((a + b) - b2).delta(m), a.delta(m)) < 1e-6
        assert rel((2 * a).delta(m), (a + a2).delta(m)) < 1e-6
        assert rel((-negated).delta(m), a.delta(m)) < 1e-7
        assert rel(negated.delta(m), -a.delta(m)) < 1e-7
    assert ((a + b) - b) is a                       # same object: exact cancellation
    assert (a * 3 / 3) is a


def test_combination_is_lazy_and_exact(abc):
    a, b, c = abc
    combo = 0.6 * a + 0.4 * b - 0.3 * c
    assert combo._modules is None
    for m in combo.modules:                          # includes down_proj (only c) and embed_tokens (not c)
        assert rel(combo.delta(m), _formula([(0.6, a), (0.4, b), (-0.3, c)], m)) < 1e-6
    assert set(combo.modules) == set(a.modules) | set(c.modules)
    assert combo.modules["model.layers.0.self_attn.q_proj"].rank == 12
    assert sum([a, b, c]).modules["model.layers.0.self_attn.q_proj"].rank == 12


def test_compress_full_rank_is_lossless_and_low_rank_is_optimal(abc):
    a, b, c = abc
    combo = a + 0.5 * b - c
    full = combo.compress()
    low = combo.compress(rank=2)
    for m in combo.modules:
        exact = _formula([(1, a), (0.5, b), (-1, c)], m)
        assert rel(full.delta(m), exact) < 1e-5
        U, S, Vh = torch.linalg.svd(exact, full_matrices=False)
        assert rel(low.delta(m), (U[:, :2] * S[:2]) @ Vh[:2]) < 1e-5
        assert low.modules[m].rank == 2


def test_compress_by_energy_keeps_that_share(abc):
    a, b, _ = abc
    out = (a + b).compress(energy=0.8)
    for m, w in out.modules.items():
        s = torch.linalg.svdvals(_formula([(1, a), (1, b)], m))
        share = (s[: w.rank] ** 2).sum() / (s ** 2).sum()
        assert share >= 0.8 - 1e-6
        if w.rank > 1:
            assert (s[: w.rank - 1] ** 2).sum() / (s ** 2).sum() < 0.8


def test_compose_equals_arithmetic(abc):
    a, b, c = abc
    composed = lm.compose("0.6*math + 0.4*code - 0.3*toxic", math=a, code=b, toxic=c)
    for m in composed.modules:
        assert rel(composed.delta(m), _formula([(0.6, a), (0.4, b), (-0.3, c)], m)) < 1e-6
    compressed = lm.compose("(math + code) / 2", math=a, code=b, rank=3)
    assert {w.rank for w in compressed.modules.values()} == {3}


def test_compose_with_a_method_uses_the_parsed_weights(abc):
    a, b, c = abc
    via_expr = lm.compose("0.6*a + 0.4*b - 0.3*c", a=a, b=b, c=c, method="ties", params={"density": 0.5})
    direct = lm.merge([a, b, c], [0.6, 0.4, -0.3], "ties", density=0.5)
    for m in direct.modules:
        assert torch.equal(via_expr.delta(m), direct.delta(m))


def test_pem_factor_mode_follows_the_paper(abc):
    """PEM adds A and B element-wise and negates by negating one factor (here B)."""
    a, b, c = abc
    out = lm.compose("0.6*a + 0.4*b - 0.3*c", a=a, b=b, c=c, method="pem")
    m = "model.layers.1.self_attn.v_proj"
    terms = [(0.6, a), (0.4, b), (-0.3, c)]
    A = sum(abs(k) * math.sqrt(x.modules[m].scale) * x.modules[m].A.double() for k, x in terms)
    B = sum(k * math.sqrt(x.modules[m].scale) * x.modules[m].B.double() for k, x in terms)
    assert rel(out.delta(m), B @ A) < 1e-6
    # and it differs from the exact sum by the cross terms
    assert rel(out.delta(m), _formula(terms, m)) > 0.1


def test_weights_by_name_and_default(abc):
    a, b, _ = abc
    by_name = lm.merge([a, b], {"a": 0.5}, "sum")
    m = "model.layers.0.self_attn.q_proj"
    assert rel(by_name.delta(m), _formula([(0.5, a), (1.0, b)], m)) < 1e-6
    assert rel(lm.merge([a, b]).delta(m), _formula([(1.0, a), (1.0, b)], m)) < 1e-6
