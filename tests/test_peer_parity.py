"""The reference against the real peers: mergekit 0.1.5 and PEFT 0.21 (docs/methods.md, against the peers).

Inputs are tie-free fp32 (distinct magnitudes), so deterministic methods must agree exactly;
random methods (their global RNG vs our hash RNG) agree in keep rate and L1 statistics.
"""

import pytest
import torch

from dppa_kernels import reference as R
from dppa_kernels.spec import CombineSpec, SparsifySpec

mk_sparsify = pytest.importorskip("mergekit.sparsify", reason="mergekit is a test dependency")
mk_api = pytest.importorskip("mergekit.merge_methods.api")
peft_mu = pytest.importorskip("peft.utils.merge_utils", reason="peft is a test dependency")


def tie_free(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.tensor(shape).prod())
    mags = (torch.randperm(n, generator=g).to(torch.float64) + 1) / n * 1e-2
    signs = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    return (mags * signs).to(torch.float32).reshape(shape)


@pytest.mark.parametrize("density", [0.0, 0.01, 0.2, 0.5, 0.99, 1.0])
def test_magnitude_equals_mergekit(density):
    x = tie_free((37, 53))
    ours = R.sparsify_ref(x, SparsifySpec("magnitude", density=density, count_rule="min1")).float()
    assert torch.equal(ours, mk_sparsify.magnitude(x, density))
    ours_l1 = R.sparsify_ref(x, SparsifySpec("magnitude", density=density, count_rule="min1", rescale="l1"))
    theirs = mk_sparsify.magnitude(x, density, rescale_norm=mk_sparsify.RescaleNorm.l1)
    torch.testing.assert_close(ours_l1.float(), theirs, rtol=1e-6, atol=0)


@pytest.mark.parametrize("density,gamma", [(0.2, 0.01), (0.5, 0.1), (0.9, 0.05), (0.995, 0.01), (0.3, 0.0)])
def test_breadcrumbs_equals_mergekit_magnitude_outliers(density, gamma):
    x = tie_free((4099,), seed=1)
    ours = R.sparsify_ref(x, SparsifySpec("breadcrumbs", density=density, gamma=gamma)).float()
    assert torch.equal(ours, mk_sparsify.magnitude_outliers(x, density, gamma=gamma))


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties"])
def test_gta_merges_equal_mergekit(method):
    from dppa_kernels.methods import preset

    base = tie_free((41, 67), seed=2)
    fts = [base + tie_free((41, 67), seed=3 + i) for i in range(3)]
    params = {"weight": [1.0, 0.6, 0.3], "density": [0.2, 0.5, 0.3]}
    if method.startswith("breadcrumbs"):
        params["gamma"] = [0.01, 0.02, 0.0]
    theirs = mk_api.merge_tensors([base, *fts], method, parameters=params, base_index=0, name="w")
    deltas = [f - base for f in fts]  # fp32, exactly as mergekit forms them
    w, specs, combine = preset(method, 3, params)
    ours = R.merge_ref(deltas, base, specs, w, combine, out_dtype=torch.float32)
    torch.testing.assert_close(ours, theirs, rtol=2e-6, atol=1e-9)


def test_dare_and_della_agree_with_mergekit_statistically():
    torch.manual_seed(0)
    x = tie_free((200, 500), seed=4)
    for density in (0.1, 0.5):
        ours = R.sparsify_ref(x, SparsifySpec("dare", density=density, rescale="l1"), seed=3, name="w")
        theirs = mk_sparsify.bernoulli(x, density, rescale_norm=mk_sparsify.RescaleNorm.l1)
        for t in (ours, theirs):
            kept = (t != 0).double().mean().item()
            assert abs(kept - density) < 4 * (density * (1 - density) / x.numel()) ** 0.5
            # L1 rescale: the kept values carry the whole L1 norm
            assert t.abs().sum().item() == pytest.approx(x.double().abs().sum().item(), rel=1e-5)
        ours = R.sparsify_ref(x, SparsifySpec("della", density=density, epsilon=0.05, rescale="l1"), seed=3)
        theirs = mk_sparsify.della_magprune(x, density, 0.05, rescale_norm=mk_sparsify.RescaleNorm.l1)
        k_o, k_t = (ours != 0).double().mean().item(), (theirs != 0).double().mean().item()
        assert abs(k_o - k_t) < 0.01
        # larger magnitudes are kept more often in both
        big = x.abs() > x.abs().median()
        for t in (ours, theirs):
            assert (t[big] != 0).double().mean() > (t[~big] != 0).double().mean()


@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 1.0])
def test_peft_magnitude_pruning_and_ties_equal(density):
    ts = [tie_free((23, 31), seed=10 + i) for i in range(3)]
    w = torch.tensor([1.0, 0.5, -0.7])
    if density < 1:
        ours = R.sparsify_ref(ts[0], SparsifySpec("magnitude", density=density)).float()
        assert torch.equal(ours, peft_mu.magnitude_based_pruning(ts[0], density))
    peft_ties = peft_mu.ties(ts, w, density, majority_sign_method="total")
    spec = SparsifySpec("magnitude", density=density)
    ours = R.merge_ref(ts, None, [spec] * 3, w.tolist(),
                       CombineSpec("ties", elect="sum", divisor="count", normalize=True), out_dtype=torch.float32)
    torch.testing.assert_close(ours, peft_ties, rtol=1e-6, atol=1e-9)
    peft_freq = peft_mu.ties(ts, w, density, majority_sign_method="frequency")
    ours = R.merge_ref(ts, None, [spec] * 3, w.tolist(),
                       CombineSpec("ties", elect="frequency", divisor="count", normalize=True), out_dtype=torch.float32)
    torch.testing.assert_close(ours, peft_freq, rtol=1e-6, atol=1e-9)
    ta = R.merge_ref(ts, None, [SparsifySpec()] * 3, w.tolist(), CombineSpec(), out_dtype=torch.float32)
    torch.testing.assert_close(ta, peft_mu.task_arithmetic(ts, w), rtol=1e-6, atol=1e-9)


def test_peft_random_pruning_statistics():
    torch.manual_seed(1)
    x = tie_free((300, 300), seed=5)
    ours = R.sparsify_ref(x, SparsifySpec("dare", density=0.3, rescale="inv_density"), seed=1)
    theirs = peft_mu.random_pruning(x, 0.3, rescale=True)
    for t in (ours, theirs):
        kept = t != 0
        assert abs(kept.double().mean().item() - 0.3) < 0.01
        torch.testing.assert_close(t[kept].double(), x[kept].double() / 0.3)
