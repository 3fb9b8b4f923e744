"""The report's realised densities come from the plans the merge applied: equal to the
reference's exact count for every threshold and mask plan, on every backend; DARE reports its
draw's keep probability and says so."""

from __future__ import annotations

import pytest
import torch

import dppa_kernels as dk
from dppa_kernels import reference as R
from dppa_kernels.engine.recipe import Recipe
from dppa_kernels.engine.report import kept_fraction, tensor_row
from dppa_kernels.reference import rng
from dppa_kernels.spec import CombineSpec, SparsifySpec
from helpers import quantised_delta, realistic_delta

BANDS = dict(densities=(0.1, 0.3), count_rule="dppa", key_dtype=torch.bfloat16)
SPECS = [
    SparsifySpec("magnitude", density=0.2, count_rule="min1"),
    SparsifySpec("magnitude", density=0.3, tie_mode="gt"),
    SparsifySpec("magnitude", density=0.3, tie_mode="ge"),
    SparsifySpec("magnitude", density=0.25, partition="row", tie_mode="gt"),
    SparsifySpec("magnitude", density=0.4, partition="block", block_size=100, tie_mode="ge"),
    SparsifySpec("magnitude", density=0.4, partition="block", block_size=100),
    SparsifySpec("magnitude", density=1.0, tie_mode="gt", density1_prunes_min=True),
    SparsifySpec("magnitude", density=0.0),
    SparsifySpec("bands", alphas=(1.8, 0.0), tie_mode="gt", **BANDS),
    SparsifySpec("bands", alphas=(2.0, 0.5), tie_mode="ge", **BANDS),
    SparsifySpec("bands", alphas=(1.0, 1.0), partition="row", tie_mode="exact_k", **BANDS),
    SparsifySpec("breadcrumbs", density=0.2, gamma=0.01),
    SparsifySpec("della", density=0.3, epsilon=0.1),
    SparsifySpec("none"),
]
BACKENDS = ["cpu", "torch"]


def _count(delta, spec, stream):
    f = R.sparsify_factor(delta, spec, seed=9, name="w", stream=stream)
    return float((f != 0).sum()) / delta.numel()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.method}-{s.density}-{s.tie_mode}-{s.partition}")
@pytest.mark.parametrize("make", [realistic_delta, quantised_delta], ids=["realistic", "quantised"])
@pytest.mark.parametrize("shape", [(37, 53), (1, 200), (301,)])
def test_kept_fraction_from_the_applied_plan_equals_the_reference_count(backend, spec, make, shape):
    deltas = [make(shape, torch.bfloat16, seed=s) for s in (1, 2)]
    base = torch.zeros(shape, dtype=torch.bfloat16)
    plans: list = []
    dk.merge_deltas(deltas, base, specs=[spec, spec], seed=9, name="w", backend=backend, plans_out=plans)
    assert len(plans) == 2
    for i, (d, p) in enumerate(zip(deltas, plans)):
        assert kept_fraction(p, spec, d, seed=9, name="w", stream=i) == (_count(d, spec, i), True)


def test_reference_backend_counts_its_factors():
    d = realistic_delta((40, 60), torch.bfloat16, seed=3)
    for spec in (SparsifySpec("dare", density=0.3), SparsifySpec("magnitude", density=0.2, tie_mode="gt")):
        assert kept_fraction(None, spec, d, seed=9, name="w", stream=1) == (_count(d, spec, 1), True)


def test_dare_reports_the_keep_probability_and_says_so():
    deltas = [realistic_delta((64, 64), torch.bfloat16, seed=s) for s in (1, 2)]
    specs = [SparsifySpec("dare", density=0.2, rescale="l1"), SparsifySpec("magnitude", density=0.5)]
    plans: list = []
    dk.merge_deltas(deltas, None, specs=specs, seed=9, name="w", backend="cpu", plans_out=plans)
    frac, exact = kept_fraction(plans[0], specs[0], deltas[0], seed=9, name="w", stream=0)
    assert not exact and frac == rng.threshold32(0.2) / 2**32 and abs(_count(deltas[0], specs[0], 0) - frac) < 0.05
    row = tensor_row(Recipe((1.0, 1.0), tuple(specs), CombineSpec()), deltas, plans, seed=9, name="w")
    assert row["expected"] == [0] and row["target"] == [0.2, 0.5] and row["realised"][1] == 0.5
