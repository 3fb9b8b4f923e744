"""Properties of the reference definitions (docs/methods.md: DPPA, tie rules)."""

import logging

import pytest
import torch
from helpers import quantised_delta, realistic_delta
from hypothesis import given, settings
from hypothesis import strategies as st

from dppa_kernels import reference as R
from dppa_kernels.spec import CombineSpec, SparsifySpec

SETTINGS = settings(max_examples=40, deadline=None)


@SETTINGS
@given(n=st.integers(1, 400), d=st.floats(0, 1), seed=st.integers(0, 10**6),
       part=st.sampled_from(["tensor", "row", "block"]))
def test_exact_k_keeps_exactly_k_per_partition(n, d, seed, part):
    x = quantised_delta((n, 3), levels=3, seed=seed)  # heavy ties
    m = R.magnitude_mask_ref(x, d, tie_mode="exact_k", partition=part, block_size=5)
    flat = m.reshape(-1)
    parts = R.threshold.partition_view(flat, x.shape, part, 5)
    for start, length in parts:
        assert int(flat[start:start + length].sum()) == R.keep_count(length, d)


@SETTINGS
@given(n=st.integers(1, 300), d=st.floats(0, 1), seed=st.integers(0, 10**6))
def test_gt_le_k_le_ge_and_masks_nested(n, d, seed):
    x = quantised_delta((n,), levels=4, seed=seed)
    k = R.keep_count(n, d)
    gt = R.magnitude_mask_ref(x, d, tie_mode="gt")
    ex = R.magnitude_mask_ref(x, d, tie_mode="exact_k")
    ge = R.magnitude_mask_ref(x, d, tie_mode="ge")
    if d < 1:
        assert int(gt.sum()) <= k <= int(ge.sum())
    assert bool((gt <= ex).all()) and bool((ex <= ge).all())


def test_exact_k_ties_taken_in_flat_index_order():
    x = torch.tensor([1.0, 3.0, 2.0, 2.0, 2.0, 0.5])
    m = R.magnitude_mask_ref(x, 3 / 6, tie_mode="exact_k")  # k = 3: 3.0 then the first two 2.0s
    assert m.tolist() == [False, True, True, True, False, False]
    assert R.magnitude_mask_ref(x, 0.5, tie_mode="gt").tolist() == [False, True, False, False, False, False]
    assert R.magnitude_mask_ref(x, 0.5, tie_mode="ge").tolist() == [False, True, True, True, True, False]


def test_density_edges_and_official_quirk():
    x = realistic_delta((50,), torch.bfloat16)
    assert not R.magnitude_mask_ref(x, 0.0, tie_mode="ge").any()
    for tm in ("gt", "ge", "exact_k"):
        assert R.magnitude_mask_ref(x, 1.0, tie_mode=tm).all()
    # The official DPPA code prunes the minima at d = 1 ("prune |x| <= τ" with τ = min).
    quirk = R.magnitude_mask_ref(x, 1.0, tie_mode="gt", density1_prunes_min=True)
    keys = R.magnitude_keys(x)
    assert not quirk[keys == keys.min()].any() and quirk[keys > keys.min()].all()


def test_threshold_value_is_kth_largest_and_inf_when_nothing_kept():
    x = torch.tensor([[0.1, -0.5, 0.3], [2.0, -1.0, 0.25]])
    t = R.magnitude_threshold_ref(x, 2 / 3, partition="row")
    assert torch.equal(t["tau"], torch.tensor([0.3, 1.0]))
    assert torch.isinf(R.magnitude_threshold_ref(x, 0.0)["tau"]).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_histogram_threshold_equals_sort_threshold(dtype):
    x = realistic_delta((3001,), dtype, sigma=1e-4)
    h = R.histogram_ref(x, dtype)
    for d in (0.0, 1 / 3001, 0.1, 0.5, 0.9, 1.0):
        k = R.keep_count(3001, d)
        ref = R.magnitude_threshold_ref(x, d)
        assert R.threshold_from_hist(h, k, dtype) == (int(ref["tau_key"][0]), int(ref["c_above"][0]),
                                                      int(ref["c_eq"][0]))


def test_band_max_rule_equals_elementwise_max_construction():
    # the official my_max keeps, per element, the larger of α_lo·Δ^(0.8), α_hi·Δ^(0.9).
    x = realistic_delta((4000,), torch.bfloat16, sigma=2e-3)
    for a_hi, a_lo in ((1.8, 0.0), (1.8, 1.0), (1.8, 2.0), (0.0, 1.3)):
        m9 = R.magnitude_mask_ref(x, 0.1, tie_mode="gt", count_rule="dppa").double()
        m8 = R.magnitude_mask_ref(x, 0.2, tie_mode="gt", count_rule="dppa").double()
        xd = x.double()
        lo, hi = a_lo * xd * m8, a_hi * xd * m9
        literal = torch.where(hi.abs() > lo.abs(), hi, lo)
        spec = SparsifySpec("bands", densities=(0.1, 0.2), alphas=(a_hi, a_lo), tie_mode="gt", count_rule="dppa")
        assert torch.equal(R.sparsify_ref(x, spec), literal)


def test_band_factors_direct_and_codes_nested():
    assert R.band_factors((1.8, 2.0), "max") == [2.0, 2.0]
    assert R.band_factors((1.8, 2.0), "direct") == [1.8, 2.0]
    x = realistic_delta((999,), torch.bfloat16)
    codes = R.band_codes_ref(x, (0.05, 0.1, 0.3), tie_mode="exact_k")
    for j, d in enumerate((0.05, 0.1, 0.3), start=1):
        m = R.magnitude_mask_ref(x, d, tie_mode="exact_k")
        assert torch.equal(m, (codes >= 1) & (codes <= j))


def _hist_of(values):
    return R.histogram_ref(torch.tensor(values, dtype=torch.float32).to(torch.bfloat16))


def _outlier_unit(n, n_out):
    """A unit of n elements with n_out outliers: 0.01 everywhere, 1.0 on the outliers."""
    x = torch.full((n,), 0.01)
    x[:n_out] = 1.0
    return R.histogram_ref(x)


def test_dp_worked_example_unit_offsets():
    # worked example: N = (1, 1, 2)·k and p = (1, 2, 0.5) % → r = (0, 1, −0.5), u = (0, +λ, −λ/2).
    hists = {"model.layers.0.mlp.up_proj.weight": _outlier_unit(1000, 10),
             "model.layers.0.mlp.gate_proj.weight": _outlier_unit(1000, 20),
             "model.layers.0.mlp.down_proj.weight": _outlier_unit(2000, 10)}
    layers = {k: 0 for k in hists}  # one layer: ℓ = 0
    a = R.dp_allocate(hists, layers, (0.1, 0.2))
    assert list(a.unit_ratio.values()) == pytest.approx([1.0, 2.0, 0.5])
    assert list(a.unit_offset.values()) == pytest.approx([0.0, 0.08, -0.04])
    assert a.densities["model.layers.0.mlp.gate_proj.weight"] == pytest.approx([0.18, 0.28])
    # k for the DPPA count rule: prune floor(N·(1 − d)) of 10^6 at d = 0.26 → keep 260 000
    assert R.keep_count(10**6, 0.26, "dppa") == 10**6 - 740000


def test_dp_allocation_properties(caplog):
    torch.manual_seed(1)
    hists, layers = {}, {}
    for layer in range(4):
        for unit in range(3):
            x = torch.randn(64, 32) * 0.01
            x[torch.rand_like(x) < 0.002 * (1 + layer + unit)] *= 40  # outliers vary by layer/unit
            name = f"model.layers.{layer}.mlp.u{unit}.weight"
            hists[name] = R.histogram_ref(x)
            layers[name] = layer
    a9 = R.dp_allocate(hists, layers, (0.3,))
    a8 = R.dp_allocate(hists, layers, (0.4,))
    n = {k: int(h.sum()) for k, h in hists.items()}
    total = sum(n.values())
    # 1. equal-sized layers, no clamp → the N-weighted mean density is exactly 1 − s
    assert not a9.clamped
    mean = sum(a9.densities[k][0] * n[k] for k in n) / total
    assert mean == pytest.approx(0.3, abs=1e-12)
    # 2. offsets do not depend on s: d(s − 0.1) = d(s) + 0.1 → nested masks
    for k in n:
        assert a8.densities[k][0] == pytest.approx(a9.densities[k][0] + 0.1, abs=1e-12)
    # offsets within [-λ, λ] with one end reached
    lo = list(a9.layer_offset.values())
    assert max(abs(v) for v in lo) == pytest.approx(0.08)
    # 3. more outliers → more kept (layer offsets ordered like layer ratios)
    order_ratio = sorted(a9.layer_ratio, key=a9.layer_ratio.get)
    order_off = sorted(a9.layer_offset, key=a9.layer_offset.get)
    assert order_ratio == order_off
    # clamping warns once and keeps the range
    with caplog.at_level(logging.WARNING):
        a = R.dp_allocate(hists, layers, (0.01,), offset_lambda=0.2)
    assert a.clamped and any("clamped" in r.message for r in caplog.records)
    assert all(0.0 <= d[0] <= 1.0 for d in a.densities.values())


def test_dp_equal_ratios_give_zero_offsets_not_nan():
    h = R.histogram_ref(torch.full((100,), 0.01))
    hists = {f"model.layers.{i}.self_attn.q_proj.weight": h for i in range(3)}
    layers = {k: i for i, k in enumerate(hists)}
    a = R.dp_allocate(hists, layers, (0.2,))
    assert all(v == 0.0 for v in a.layer_offset.values())
    assert all(d == [0.2] for d in a.densities.values())


def test_naming_groups_units_for_common_architectures():
    names = {
        "model.layers.3.self_attn.q_proj.weight": 3, "model.layers.0.mlp.down_proj.weight": 0,
        "transformer.h.11.attn.c_attn.weight": 11, "gpt_neox.layers.2.attention.query_key_value.weight": 2,
        "bert.encoder.layer.5.attention.self.query.weight": 5, "vit.encoder.layer.1.intermediate.dense.weight": 1,
        "model.layers.1.mlp.gate_up_proj.weight": 1,
    }
    non_units = ["model.embed_tokens.weight", "lm_head.weight", "model.layers.0.input_layernorm.weight",
                 "model.norm.weight", "model.layers.0.self_attn.q_proj.bias", "bert.pooler.dense.weight"]
    got = R.group_units({**{n: (4, 4) for n in names}, **{n: (4, 4) for n in non_units}})
    assert got == names
    assert R.unit_layer("model.layers.0.input_layernorm.weight", (4,)) is None


def test_rng_is_a_pure_function_with_the_right_rate():
    k1, k2 = R.rng.stream_keys(7, "w", 0)
    a = R.rng.keep_mask(200000, 0.3, k1, k2)
    b = R.rng.keep_mask(200000, 0.3, *R.rng.stream_keys(7, "w", 0))
    c = R.rng.keep_mask(200000, 0.3, *R.rng.stream_keys(7, "w", 1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert abs(a.double().mean().item() - 0.3) < 0.005
    # the tail of a long stream equals a stream started at an offset
    tail = R.rng.random_bits(10, k1, k2, offset=199990)
    assert torch.equal(tail, R.rng.random_bits(200000, k1, k2)[-10:])
    assert R.rng.threshold32(1.0) == 1 << 32 and R.rng.threshold32(0.0) == 0


def test_ties_output_sign_agrees_with_elected_sign():
    base = torch.zeros(2000, dtype=torch.float64)
    deltas = [torch.randn(2000, dtype=torch.float64) for _ in range(3)]
    spec = SparsifySpec("magnitude", density=0.5)
    out = R.merge_ref(deltas, base, [spec] * 3, [1.0, 0.5, 2.0], CombineSpec("ties", normalize=True))
    vals = torch.stack([R.sparsify_ref(d, spec) for d in deltas]) * torch.tensor([1.0, 0.5, 2.0]).unsqueeze(1)
    elected = torch.where(vals.sum(0) >= 0, 1.0, -1.0)
    nz = out != 0
    assert bool((out[nz].sign() == elected[nz]).all())


def test_della_probabilities_range_and_breadcrumbs_window():
    x = realistic_delta((4, 50), torch.float32, sigma=1e-2)
    p = R.della_probabilities(x, 0.4, 0.1)
    assert p.min().item() == pytest.approx(0.3) and p.max().item() == pytest.approx(0.5)
    assert R.breadcrumbs_window(1000, 0.2, 0.01) == (10, 200)
    assert R.breadcrumbs_window(1000, 0.995, 0.01) == (5, 995)  # outlier removal reduced


@SETTINGS
@given(seed=st.integers(0, 10**6), layers=st.integers(1, 5), units=st.integers(1, 4),
       level=st.floats(0.25, 0.75), lam=st.floats(0.0, 0.12))
def test_property_dp_weighted_density_is_exact_for_equal_layers(seed, layers, units, level, lam):
    g = torch.Generator().manual_seed(seed)
    hists, lay = {}, {}
    sizes = [int(s) for s in torch.randint(20, 200, (units,), generator=g)]  # same units in every layer
    for li in range(layers):
        for u in range(units):
            x = torch.randn(sizes[u], generator=g) * 0.01
            x[torch.rand(sizes[u], generator=g) < 0.05] *= 30
            name = f"model.layers.{li}.mlp.w{u}.weight"
            hists[name], lay[name] = R.histogram_ref(x), li
    a = R.dp_allocate(hists, lay, (level,), offset_lambda=lam)
    assert not a.clamped  # |ℓ| + |u| ≤ 2λ < level
    n = {k: int(h.sum()) for k, h in hists.items()}
    mean = sum(a.densities[k][0] * n[k] for k in n) / sum(n.values())
    assert mean == pytest.approx(level, abs=1e-12)


@SETTINGS
@given(seed=st.integers(0, 10**6), ds=st.lists(st.floats(0, 1), min_size=1, max_size=4),
       tie_mode=st.sampled_from(["gt", "ge", "exact_k"]))
def test_property_bands_are_nested(seed, ds, tie_mode):
    ds = sorted(ds)
    x = quantised_delta((257,), levels=9, seed=seed)
    masks = [R.magnitude_mask_ref(x, d, tie_mode=tie_mode) for d in ds]
    for a, b in zip(masks, masks[1:]):
        assert bool((a <= b).all())
    codes = R.band_codes_ref(x, ds, tie_mode=tie_mode)
    assert torch.equal(codes > 0, masks[-1])


@SETTINGS
@given(seed=st.integers(0, 10**6), m=st.integers(1, 5), density=st.floats(0.05, 1.0),
       elect=st.sampled_from(["weighted_sum", "count"]))
def test_property_ties_sign_agrees_with_election(seed, m, density, elect):
    g = torch.Generator().manual_seed(seed)
    deltas = [torch.randn(300, generator=g, dtype=torch.float64) for _ in range(m)]
    w = (torch.rand(m, generator=g, dtype=torch.float64) + 0.1).tolist()
    spec = SparsifySpec("magnitude", density=density)
    out = R.merge_ref(deltas, None, [spec] * m, w, CombineSpec("ties", elect=elect, normalize=True))
    vals = torch.stack([R.sparsify_ref(d, spec) for d in deltas]) * torch.tensor(w, dtype=torch.float64).unsqueeze(1)
    vote = vals.sign().sum(0) if elect == "count" else vals.sum(0)
    elected = torch.where(vote >= 0, 1.0, -1.0).to(torch.float64)
    nz = out != 0
    assert bool((out[nz].sign() == elected[nz]).all())
