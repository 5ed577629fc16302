"""The data-weighted merge methods against their formulas in float64: `fisher` (Matena & Raffel) in the delta
and factor spaces with its options, and `regmean` (Jin et al.) in closed form, factored. The Fishers and Grams
here are random (positive) tensors: what is checked is the merge, not the estimation (test_fisher_estimate)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_adapter, rel

import lora_merge as lm
from lora_merge.errors import MethodError
from lora_merge.fisher import Fisher
from lora_merge.methods.fisher import fisher_average
from lora_merge.methods.regmean import shrink

Q = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    d = tmp_path_factory.mktemp("fisher-merge")
    return [make_adapter(d / "a", r=4, alpha=8, seed=11),
            make_adapter(d / "b", r=4, alpha=4, seed=12),
            make_adapter(d / "c", r=4, alpha=16, targets=("q_proj", "v_proj", "down_proj"), seed=13)]


def delta(adapter, path):
    x = adapter.modules[path]
    return (x.B.double() @ x.A.double()) * x.scale


def random_fisher(adapter, space: str, seed: int, scale: float = 1.0) -> Fisher:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for path, x in adapter.metas.items():
        if space == "delta":
            tensors[path] = {"delta": torch.rand(x.shape, generator=g) * scale}
        else:
            tensors[path] = {"A": torch.rand(tuple(x.A.shape), generator=g) * scale,
                             "B": torch.rand(tuple(x.B.shape), generator=g) * scale}
    return Fisher(space=space, tensors=tensors, gram=None, meta={"kind": "expected", "n_examples": "8"})


def random_gram(adapter, seed: int, tokens: int = 50) -> Fisher:
    g = torch.Generator().manual_seed(seed)
    gram = {}
    for path, x in adapter.metas.items():
        X = torch.randn(tokens, x.shape[1], generator=g)
        gram[path] = X.T @ X
    return Fisher(space="delta", tensors={}, gram=gram, meta={"kind": "gram"})


def test_fisher_average_is_the_formula():
    g = torch.Generator().manual_seed(0)
    thetas = [torch.randn(5, 7, generator=g) for _ in range(3)]
    fishers = [torch.rand(5, 7, generator=g) for _ in range(3)]
    fishers[1][0, 0] = 0.0
    w = [0.2, 0.5, 0.3]
    for favor in (False, True):
        d = [f.double().clamp(min=1e-3) if (i == 0 or not favor) else f.double() for i, f in enumerate(fishers)]
        ref = sum(wi * di * t.double() for wi, di, t in zip(w, d, thetas)) / sum(wi * di for wi, di in zip(w, d))
        got = fisher_average(thetas, fishers, w, floor=1e-3, favor_target=favor)
        assert rel(got, ref) < 1e-6


@pytest.mark.parametrize("normalize", [True, False])
def test_delta_space_merge_matches_float64(trio, normalize):
    ads = [lm.load(p) for p in trio]
    F = [random_fisher(a, "delta", seed=i) for i, a in enumerate(ads)]
    w = [0.5, 0.3, 0.2]
    out = lm.merge(ads, w, "fisher", fishers=F, rank=32, svd="exact", normalize=normalize)
    norms = [float(torch.sqrt(sum((t.double() ** 2).sum() for m in f.tensors.values() for t in m.values())))
             for f in F]
    lam = [wi / n if normalize else wi for wi, n in zip(w, norms)]
    for path in ads[0].metas:
        have = [i for i, a in enumerate(ads) if path in a.metas]
        d = [F[i].tensors[path]["delta"].double().clamp(min=1e-6) for i in have]
        num = sum(lam[i] * di * delta(ads[i], path) for i, di in zip(have, d))
        ref = num / sum(lam[i] * di for i, di in zip(have, d))
        assert rel(out.delta(path), ref) < 1e-5, path
    down = "model.layers.0.mlp.down_proj"                       # only c has it: its own delta
    assert rel(out.delta(down), delta(ads[2], down)) < 1e-5


def test_equal_fishers_reduce_to_the_weighted_average(trio):
    ads = [lm.load(p) for p in trio[:2]]
    same = random_fisher(ads[0], "delta", seed=5)
    out = lm.merge(ads, [0.6, 0.2], "fisher", fishers=[same, same], rank=32, svd="exact")
    ref = (0.6 * delta(ads[0], Q) + 0.2 * delta(ads[1], Q)) / 0.8
    assert rel(out.delta(Q), ref) < 1e-5
    twice = lm.merge(ads, [1.2, 0.4], "fisher", fishers=[same, same], rank=32, svd="exact")   # weights are relative
    assert rel(twice.delta(Q), ref) < 1e-5


def test_default_rank_is_the_largest_input_rank(trio):
    ads = [lm.load(p) for p in trio[:2]]
    out = lm.merge(ads, [0.5, 0.5], "fisher", fishers=[random_fisher(a, "delta", i) for i, a in enumerate(ads)])
    assert out.modules[Q].rank == 4 and out.provenance["params"]["rank"] == 4


def test_factor_space_merges_the_scaled_factors(trio):
    ads = [lm.load(p) for p in trio[:2]]
    F = [random_fisher(a, "factor", seed=i + 7) for i, a in enumerate(ads)]
    w = [0.7, 0.3]
    out = lm.merge(ads, w, "fisher", fishers=F, normalize=False)
    got = out.modules[Q]
    for side in ("A", "B"):
        thetas = [a.modules[Q].scale ** 0.5 * getattr(a.modules[Q], side).double() for a in ads]
        fishers = [(f.tensors[Q][side].double() / a.modules[Q].scale).clamp(min=1e-6) for f, a in zip(F, ads)]
        ref = sum(wi * fi * t for wi, fi, t in zip(w, fishers, thetas)) / sum(wi * fi for wi, fi in zip(w, fishers))
        assert rel(getattr(got, side) * got.scale ** 0.5, ref) < 1e-6, side
    one = lm.merge(ads[:1], [1.0], "fisher", fishers=F[:1])     # a single input is itself
    assert rel(one.delta(Q), delta(ads[0], Q)) < 1e-6


def test_normalize_makes_the_fishers_scale_free_and_favor_target_floors_only_the_first(trio):
    ads = [lm.load(p) for p in trio[:2]]
    F = [random_fisher(ads[0], "delta", 1), random_fisher(ads[1], "delta", 2)]
    loud = random_fisher(ads[1], "delta", 2, scale=1000.0)
    kw = dict(rank=32, svd="exact")
    a = lm.merge(ads, [0.5, 0.5], "fisher", fishers=F, **kw)
    b = lm.merge(ads, [0.5, 0.5], "fisher", fishers=[F[0], loud], **kw)
    assert rel(a.delta(Q), b.delta(Q)) < 1e-5
    c = lm.merge(ads, [0.5, 0.5], "fisher", fishers=[F[0], loud], normalize=False, **kw)
    assert rel(c.delta(Q), a.delta(Q)) > 1e-2
    zero = Fisher("delta", {p: {"delta": torch.zeros(x.shape)} for p, x in ads[1].metas.items()}, None, {})
    target = lm.merge(ads, [0.5, 0.5], "fisher", fishers=[F[0], zero], favor_target=True, normalize=False, **kw)
    assert rel(target.delta(Q), delta(ads[0], Q)) < 1e-5          # the donor's zero Fisher gives it no say
    both = lm.merge(ads, [0.5, 0.5], "fisher", fishers=[F[0], zero], normalize=False, floor=0.05, **kw)
    d0 = F[0].tensors[Q]["delta"].double().clamp(min=0.05)
    ref = (d0 * delta(ads[0], Q) + 0.05 * delta(ads[1], Q)) / (d0 + 0.05)
    assert rel(both.delta(Q), ref) < 1e-5


@pytest.mark.parametrize("alpha", [1.0, 0.9, 0.0])
def test_regmean_matches_its_closed_form_and_stays_factored(trio, alpha):
    ads = [lm.load(p) for p in trio]
    G = [random_gram(a, seed=20 + i) for i, a in enumerate(ads)]
    w = [0.5, 0.3, 0.2]
    out = lm.merge(ads, w, "regmean", grams=G, alpha=alpha)
    for path in ads[0].metas:
        have = [i for i, a in enumerate(ads) if path in a.metas]
        g = [shrink(G[i].gram[path].double(), alpha) for i in have]
        S = sum(w[i] * gi for i, gi in zip(have, g))
        ref = sum(w[i] * delta(ads[i], path) @ gi for i, gi in zip(have, g)) @ torch.linalg.inv(S)
        assert rel(out.delta(path), ref) < 1e-5, path
        assert out.modules[path].rank == sum(ads[i].metas[path].rank for i in have)   # exact: rank sum r_i
    same = lm.merge(ads[:2], [0.6, 0.2], "regmean", grams=[G[0], G[0]], alpha=alpha)
    assert rel(same.delta(Q), (0.6 * delta(ads[0], Q) + 0.2 * delta(ads[1], Q)) / 0.8) < 1e-5
    low = lm.merge(ads, w, "regmean", grams=G, alpha=alpha, rank=4)
    assert low.modules[Q].rank == 4


def test_statistics_are_found_beside_the_adapter_and_recorded(trio, tmp_path):
    ads = [lm.load(p) for p in trio[:2]]
    F = [random_fisher(a, "delta", i) for i, a in enumerate(ads)]
    F[0].save(tmp_path / "fa.safetensors")
    with pytest.raises(MethodError, match=r"no Fisher for adapter 'a'.*fisher.safetensors"):
        lm.merge(ads, [0.5, 0.5], "fisher")
    out = lm.merge(ads, [0.5, 0.5], "fisher", fishers={"a": tmp_path / "fa.safetensors", "b": F[1]})
    assert out.provenance["statistics"]["a"]["kind"] == "expected"
    ref = lm.merge(ads, [0.5, 0.5], "fisher", fishers=F)
    assert rel(out.delta(Q), ref.delta(Q)) < 1e-6


def test_bad_statistics_are_clear_errors(trio):
    ads = [lm.load(p) for p in trio[:2]]
    F = [random_fisher(a, "delta", i) for i, a in enumerate(ads)]
    with pytest.raises(MethodError, match="positive weights"):
        lm.merge(ads, [0.5, -0.5], "fisher", fishers=F)
    with pytest.raises(MethodError, match="different spaces"):
        lm.merge(ads, [0.5, 0.5], "fisher", fishers=[F[0], random_fisher(ads[1], "factor", 3)])
    with pytest.raises(MethodError, match="1 fisher statistics for 2 adapters"):
        lm.merge(ads, [0.5, 0.5], "fisher", fishers=F[:1])
    partial = Fisher("delta", {Q: F[1].tensors[Q]}, None, {})
    with pytest.raises(MethodError, match=r"Fisher of adapter 'b' has no module .*v_proj"):
        lm.merge(ads, [0.5, 0.5], "fisher", fishers=[F[0], partial])
    with pytest.raises(MethodError, match="no Gram matrices"):
        lm.merge(ads, [0.5, 0.5], "regmean", grams=F)
    with pytest.raises(MethodError, match="alpha must be in"):
        lm.merge(ads, [0.5, 0.5], "regmean", grams=[random_gram(a, 1) for a in ads], alpha=2.0)
