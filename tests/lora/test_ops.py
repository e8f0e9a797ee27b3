"""The mixed-rank primitive and factored SVD of fedpeft.lora.ops."""

from __future__ import annotations

import itertools

import pytest
import torch

from fedpeft.lora import (
    AdapterLayout,
    LoraFactors,
    factors_from_svd,
    pad_adapter_to,
    pad_rank,
    product_frobenius_inner,
    product_mean,
    refactor_svd,
    rescale,
    resize_adapter_to,
    split_adapter,
    stack_factors,
    svd_factors,
    truncate_adapter_to,
    truncate_rank,
)

LAYOUT = AdapterLayout(lora_alpha=8.0)


def _factors(seed: int, rank: int, m: int = 7, n: int = 5, dtype=torch.float64) -> LoraFactors:
    gen = torch.Generator().manual_seed(seed)
    return LoraFactors(
        a=torch.randn(rank, n, generator=gen, dtype=dtype),
        b=torch.randn(m, rank, generator=gen, dtype=dtype),
        scaling=LAYOUT.scaling(rank),
    )


def test_pad_keeps_the_product_and_folds_the_scale_into_b():
    f = _factors(0, 2)
    g = pad_rank(f, 8, LAYOUT.scaling(8))
    assert g.a.shape == (8, 5) and g.b.shape == (7, 8) and g.scaling == 1.0
    assert torch.allclose(g.delta(), f.delta(), atol=1e-12)
    assert torch.equal(g.a[2:], torch.zeros(6, 5, dtype=torch.float64))
    assert torch.equal(g.b[:, 2:], torch.zeros(7, 6, dtype=torch.float64))
    assert torch.equal(g.b[:, :2], f.b * 4.0)  # s_2 / s_8 = 4


def test_truncate_of_pad_is_the_identity_bitwise():
    for r, big in [(2, 8), (4, 4), (1, 16)]:
        f = _factors(r, r)
        back = truncate_rank(pad_rank(f, big, LAYOUT.scaling(big)), r, LAYOUT.scaling(r))
        assert torch.equal(back.a, f.a) and torch.equal(back.b, f.b) and back.scaling == f.scaling


def test_pad_and_truncate_without_scaling_keep_the_factors_scale():
    f = _factors(0, 3)
    assert pad_rank(f, 5).scaling == f.scaling
    assert torch.equal(truncate_rank(pad_rank(f, 5), 3).b, f.b)


def test_bad_ranks_name_the_value():
    f = _factors(0, 4)
    with pytest.raises(ValueError, match="rank must be >= the factors' rank 4, got 2"):
        pad_rank(f, 2)
    with pytest.raises(ValueError, match=r"rank must be in \[0, 4\].*got 5"):
        truncate_rank(f, 5)
    with pytest.raises(ValueError, match="scaling must be > 0"):
        rescale(f, 0.0)


def test_rescale_keeps_the_product():
    f = _factors(1, 4)
    assert torch.allclose(rescale(f, 0.3).delta(), f.delta(), atol=1e-12)
    assert rescale(f, f.scaling) is f


def test_truncating_svd_ordered_factors_is_the_best_approximation():
    f = refactor_svd(_factors(2, 6), 6, LAYOUT.scaling(6), sigma="b")
    sv = torch.linalg.svdvals(f.delta())
    small = truncate_rank(f, 2, LAYOUT.scaling(2))
    err = (small.delta() - f.delta()).norm()
    assert float(err) == pytest.approx(float(sv[2:].pow(2).sum().sqrt()), rel=1e-10)


def test_stack_is_exact_for_heterogeneous_ranks_and_drops_zero_weights():
    fs = [_factors(i, r) for i, r in enumerate([1, 4, 2, 3])]
    w = [0.1, 0.4, 0.0, 0.5]
    st = stack_factors(fs, w)
    assert st.rank == 1 + 4 + 3 and st.scaling == 1.0
    dense = sum(wk * f.delta() for wk, f in zip(w, fs, strict=True))
    assert (st.delta() - dense).abs().max() < 1e-12
    assert (product_mean(fs, w) - dense).abs().max() < 1e-12


def test_stack_rejects_mismatched_layers():
    with pytest.raises(ValueError, match=r"layer shapes differ"):
        stack_factors([_factors(0, 2), _factors(1, 2, m=3)], [0.5, 0.5])
    with pytest.raises(ValueError, match="2 factors but 1 weights"):
        stack_factors([_factors(0, 2), _factors(1, 2)], [1.0])


def test_product_mean_runs_in_at_least_float32():
    fs = [_factors(i, 2, dtype=torch.bfloat16) for i in range(2)]
    assert product_mean(fs, [0.5, 0.5]).dtype == torch.float32


def test_factored_svd_equals_dense_svd_on_non_square_layers():
    st = stack_factors([_factors(i, 3, m=9, n=4) for i in range(3)], [0.2, 0.3, 0.5])
    u, sv, vh = svd_factors(st)
    dense = st.delta()
    assert u.shape == (9, 4) and sv.shape == (4,) and vh.shape == (4, 4)
    assert torch.allclose(sv, torch.linalg.svdvals(dense), atol=1e-12)
    assert torch.allclose(u @ torch.diag(sv) @ vh, dense, atol=1e-12)
    assert torch.allclose(u.T @ u, torch.eye(4, dtype=torch.float64), atol=1e-12)


def test_factored_svd_does_not_depend_on_stack_order():
    fs = [_factors(i, 2, m=12, n=10) for i in range(3)]
    w = [0.2, 0.3, 0.5]
    ref = svd_factors(stack_factors(fs, w))
    for order in itertools.permutations(range(3)):
        got = svd_factors(stack_factors([fs[i] for i in order], [w[i] for i in order]))
        for x, y in zip(ref, got, strict=True):
            assert torch.allclose(x, y, atol=1e-10)


@pytest.mark.parametrize("sigma", ["b", "a", "sqrt"])
@pytest.mark.parametrize("dense", [True, False])
def test_refactor_is_eckart_young_optimal(sigma, dense):
    st = stack_factors([_factors(i, 3, m=8, n=6) for i in range(3)], [0.3, 0.3, 0.4])
    target = st.delta()
    sv = torch.linalg.svdvals(target)
    for r in [1, 3, 5]:
        s = LAYOUT.scaling(r)
        f = refactor_svd(target if dense else st, r, s, sigma=sigma)
        assert f.a.shape == (r, 6) and f.b.shape == (8, r) and f.scaling == s
        err = float((f.delta() - target).norm())
        assert err == pytest.approx(float(sv[r:].pow(2).sum().sqrt()), rel=1e-9, abs=1e-12)
    b_split = refactor_svd(st, 3, 2.0, sigma="b")
    assert torch.allclose(b_split.a @ b_split.a.T, torch.eye(3, dtype=torch.float64), atol=1e-12)


def test_refactor_above_the_attainable_rank_pads_or_completes():
    f = _factors(3, 2, m=10, n=9)
    padded = refactor_svd(f, 5, 1.0, sigma="b")
    assert torch.equal(padded.a[2:], torch.zeros(3, 9, dtype=torch.float64))
    basis = torch.randn(5, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    done = refactor_svd(f, 5, 1.0, sigma="b", complete=basis)
    assert torch.allclose(done.a @ done.a.T, torch.eye(5, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(done.delta(), f.delta(), atol=1e-12)
    assert done.b[:, 2:].abs().max() < 1e-12  # the completed directions carry σ = 0


def test_refactor_validates_its_options():
    with pytest.raises(ValueError, match="sigma split must be one of"):
        refactor_svd(_factors(0, 2), 2, sigma="left")
    with pytest.raises(ValueError, match="dense source must be"):
        refactor_svd(torch.zeros(3), 2)
    with pytest.raises(ValueError, match="scaling > 0"):
        factors_from_svd(torch.eye(2), torch.ones(2), torch.eye(2), 1, 0.0)


def _adapter(rank: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(rank)
    return {
        "q.lora_A.weight": torch.randn(rank, 5, generator=gen, dtype=torch.float64),
        "q.lora_B.weight": torch.randn(7, rank, generator=gen, dtype=torch.float64),
        "head.weight": torch.randn(2, 3, generator=gen, dtype=torch.float64),
        "q.base_layer.delta": torch.randn(7, 5, generator=gen, dtype=torch.float64),
    }


@pytest.mark.parametrize("layout", [LAYOUT, AdapterLayout(lora_alpha=8.0, use_rslora=True)])
def test_adapter_pad_and_truncate_keep_products_and_extras(layout):
    small = _adapter(2)
    big = pad_adapter_to(small, 8, layout)
    assert big["q.lora_A.weight"].shape == (8, 5) and big["q.lora_B.weight"].shape == (7, 8)
    assert torch.equal(big["head.weight"], small["head.weight"])
    assert torch.equal(big["q.base_layer.delta"], small["q.base_layer.delta"])
    f_small = split_adapter(small, layout)[0]["q"]
    f_big = split_adapter(big, layout)[0]["q"]
    assert torch.allclose(f_big.delta(), f_small.delta(), atol=1e-12)
    back = truncate_adapter_to(big, 2, layout)
    assert all(torch.allclose(back[k], small[k], atol=1e-12) for k in small)
    assert set(resize_adapter_to(big, 2, layout)) == set(small)
    same = resize_adapter_to(small, 2, layout)
    assert all(same[k] is small[k] for k in small)  # no copy when nothing changes


def test_adapter_pad_refuses_to_shrink():
    with pytest.raises(ValueError, match="rank must be >= the factors' rank 4"):
        pad_adapter_to(_adapter(4), 2, LAYOUT)


def test_product_frobenius_inner_equals_dense():
    fs = [_factors(i, r) for i, r in enumerate([2, 3])]
    x = [(0.4, fs[0]), (0.6, fs[1])]
    dense = 0.4 * fs[0].delta() + 0.6 * fs[1].delta()
    assert product_frobenius_inner(x, x) == pytest.approx(float((dense * dense).sum()), rel=1e-12)
