"""The report's realised densities: fast paths equal the reference's exact count."""

from __future__ import annotations

import pytest
import torch

from dppa_kernels import reference as R
from dppa_kernels.engine.compute import realised_density
from dppa_kernels.spec import SparsifySpec

SPECS = [SparsifySpec("della", density=0.3, epsilon=0.1), SparsifySpec("della", density=0.05, epsilon=0.05),
         SparsifySpec("dare", density=0.2), SparsifySpec("magnitude", density=0.2),
         SparsifySpec("breadcrumbs", density=0.2, gamma=0.01)]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.method}-{s.density}")
@pytest.mark.parametrize("shape", [(37, 53), (1, 200), (300,)])
def test_realised_density_matches_reference_count(spec, shape):
    g = torch.Generator().manual_seed(3)
    delta = (torch.randn(shape, generator=g) * 1e-3).bfloat16()
    want = float((R.sparsify_factor(delta, spec, seed=7, name="w", stream=2) != 0).sum()) / delta.numel()
    for backend in ("reference", "cpu"):
        got = realised_density(delta, spec, seed=7, name="w", stream=2, backend=backend)
        assert got == want, (backend, got, want)


def test_report_counts_the_mask_the_merge_drew():
    """With the merge's plans (plans_out), a DELLA density is counted from the drawn mask and
    equals the reference's count; the reference backend hands out no plans."""
    import dppa_kernels as dk

    g = torch.Generator().manual_seed(4)
    deltas = [(torch.randn(40, 70, generator=g) * 1e-3).bfloat16() for _ in range(2)]
    base = torch.randn(40, 70, generator=g).bfloat16()
    spec = SparsifySpec("della", density=0.3, epsilon=0.1)
    plans: list = []
    dk.merge_deltas(deltas, base, specs=[spec, spec], seed=9, name="w", backend="cpu", plans_out=plans)
    assert [p.kind for p in plans] == ["mask", "mask"]
    for i, (d, p) in enumerate(zip(deltas, plans)):
        want = float((R.sparsify_factor(d, spec, seed=9, name="w", stream=i) != 0).sum()) / d.numel()
        assert realised_density(d, spec, seed=9, name="w", stream=i, backend="cpu", plan=p) == want
    ref_plans: list = []
    dk.merge_deltas(deltas, base, specs=[spec, spec], seed=9, name="w", backend="reference", plans_out=ref_plans)
    assert ref_plans == []
