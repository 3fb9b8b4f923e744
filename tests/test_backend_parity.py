"""Every backend against the reference, one test per property (tests/backends.py lists the
backends; an unavailable one skips with its reason). Thresholds, counts, histograms and masks
exact, ties included; merged values within one output ulp plus the fp32 reduction error.
Inputs are realistic tie-heavy deltas and heavily quantised ones (tests/helpers.py)."""

from __future__ import annotations

import math

import pytest
import torch
from backends import BACKENDS, on
from helpers import DTYPE_IDS, DTYPES, SHAPES, assert_ulp_close, family, quantised_delta, realistic_delta

import dppa_kernels as dk
from dppa_kernels import reference as R
from dppa_kernels.backends.registry import get_backend
from dppa_kernels.methods import methods
from dppa_kernels.plans import keep_counts, _partition_lengths
from dppa_kernels.reference import rng


def _no_zeros(x: torch.Tensor) -> torch.Tensor:
    """Exact zeros become a tiny value (one more tie group), so a mask can be read off Δ·f."""
    return torch.where(x == 0, torch.full_like(x, 2.0**-20), x)


def _bs(shape) -> int:
    return 37 if math.prod(shape) <= 5000 else 1031


def _interpreted(backend: str) -> bool:
    """Triton under its CPU interpreter (about 1 ms per program instance): fewer cases per call;
    on a GPU it runs them all."""
    return backend == "triton" and not torch.cuda.is_available()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("partition", ["tensor", "row", "block"])
def test_select_matches_reference(backend, dtype, shape, partition):
    dev, be = on(backend), get_backend(backend)
    n, bs = math.prod(shape), _bs(shape)
    alt = torch.bfloat16 if dtype != torch.bfloat16 else torch.float32
    cases = [(realistic_delta(shape, dtype, sigma=1e-4), None), (realistic_delta(shape, dtype, sigma=1e-4), alt),
             (quantised_delta(shape, dtype), None)]
    if n <= 5000:  # the reference loops over partitions in Python: more cases for small shapes only
        cases += [(realistic_delta(shape, dtype, sigma=2e-3, seed=1), alt), (quantised_delta(shape, dtype), alt)]
    densities = (0.0, 1.0 / n, 0.2, 0.5, 1.0)
    if _interpreted(backend):
        cases, densities, bs = cases[len(shape) % 3::3], (1.0 / n, 0.5), 1000
    for x, kd in cases:
        for d in densities:
            ref = R.magnitude_threshold_ref(x, d, partition=partition, block_size=bs, key_dtype=kd)
            got = be.select(x.to(dev), ref["k"], partition, bs, kd)
            for name, g in zip(("tau_key", "c_above", "c_eq"), got):
                assert torch.equal(g, ref[name]), (d, name, str(kd))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(1,), (1023,), (5, 123, 123)], ids=str)
def test_histogram_matches_reference(backend, dtype, shape):
    dev, be = on(backend), get_backend(backend)
    x = realistic_delta(shape, dtype, sigma=1e-3)
    for sd in (torch.bfloat16, torch.float16):
        got = be.histogram(x.to(dev), sd)
        assert got.dtype == torch.int64 and got.device.type == "cpu"
        assert torch.equal(got, R.histogram_ref(x, sd))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("tie_mode", ["exact_k", "ge", "gt"])
@pytest.mark.parametrize("partition", ["tensor", "row", "block"])
@pytest.mark.parametrize("shape", [(1023,), (9, 7, 41)], ids=str)
def test_magnitude_masks_match_reference(backend, dtype, tie_mode, partition, shape):
    dev = on(backend)
    n = math.prod(shape)
    cases = [_no_zeros(quantised_delta(shape, dtype, levels=5)), _no_zeros(realistic_delta(shape, dtype, sigma=1e-4))]
    for x in cases[:1] if _interpreted(backend) else cases:
        for d in (0.0, 1.0 / n, 0.2, 0.5, 1.0):
            kw = dict(density=d, tie_mode=tie_mode, partition=partition, block_size=50)
            got = dk.prune(x.to(dev), "magnitude", backend=backend, **kw).cpu()
            mask = R.magnitude_mask_ref(x, d, tie_mode=tie_mode, partition=partition, block_size=50)
            assert torch.equal(got, torch.where(mask, x, torch.zeros_like(x))), d
            if tie_mode == "exact_k":  # exactly k kept in every partition
                lengths = _partition_lengths(x, partition, 50)
                kept = torch.stack([c.sum() for c in torch.split(mask.reshape(-1), lengths.tolist())])
                assert torch.equal(kept, keep_counts(lengths, d, "floor")), d


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_dare_mask_bit_identical(backend, dtype):
    dev = on(backend)
    x = _no_zeros(realistic_delta((3, 50, 123), dtype, sigma=2e-3))
    for seed, name, p in ((0, "", 0.3), (2**40 + 7, "model.layers.0.mlp.up_proj.weight", 0.9), (5, "w", 0.0)):
        got = dk.prune(x.to(dev), "dare", density=p, seed=seed, name=name, backend=backend).cpu()
        keep = rng.keep_mask(x.numel(), p, *rng.stream_keys(seed, name, 0)).reshape(x.shape)
        assert torch.equal(got != 0, keep), (seed, p)
        assert torch.equal(got, torch.where(keep, x, torch.zeros_like(x)))


# one case per sparsifier that prune offers, and more where options change the plan
PRUNE_CASES = [
    ("magnitude", dict(density=0.3, rescale="l1", partition="row")),
    ("magnitude", dict(density=0.3, key_dtype=torch.bfloat16, count_rule="min1")),
    ("dare", dict(density=0.3, rescale="inv_density")), ("dare", dict(density=0.3, rescale="l1")),
    ("della", dict(density=0.4, epsilon=0.1, rescale="l1")), ("della", dict(density=0.9, epsilon=0.05)),
    ("breadcrumbs", dict(density=0.2, gamma=0.05)),
    ("bands", dict(densities=(0.1, 0.2), alphas=(1.8, 1.0))),
    ("bands", dict(densities=(0.05, 0.1, 0.3), alphas=(2.0, 1.5, 1.0), band_combine="direct", tie_mode="exact_k",
                   partition="row")),
]


def test_prune_cases_cover_every_prune_method():
    assert {m for m, _ in PRUNE_CASES} == set(dk.ops.prune_methods())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_prune_matches_reference(backend, dtype):
    dev = on(backend)
    x = realistic_delta((37, 129), dtype, sigma=2e-3)
    for method, kw in PRUNE_CASES:
        ref = dk.prune(x, method, seed=11, name="layer.w", backend="reference", **kw)
        got = dk.prune(x.to(dev), method, seed=11, name="layer.w", backend=backend, **kw).cpu()
        assert torch.equal(got != 0, ref != 0), (method, kw)
        assert_ulp_close(got, ref, dtype)


def _merge_params(method: str) -> dict:
    """Per-model parameters for a registered method (lists of three), from its parameters."""
    names = methods()[method].names()
    p = {"weight": [1.0, 0.7, -0.3]}
    if "density" in names and "densities" not in names:
        p["density"] = [0.2, 0.3, 0.5]
    if "densities" in names:
        p.update(weight=[1.0, 0.7, 0.5], densities=[[0.1, 0.2], [0.15, 0.3], [0.1, 0.1]], alphas=[1.8, 1.0])
    if "epsilon" in names:
        p["epsilon"] = 0.1
    if "gamma" in names:
        p["gamma"] = [0.01, 0.05, 0.1]
    if "tall_mask_lambda" in names:
        p.update(tall_mask_lambda=[0.3, 0.4, 0.5], k=2)
    return p


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("method", sorted(methods()))
def test_merge_matches_reference(backend, dtype, method):
    dev = on(backend)
    base, deltas = family((33, 65), 3, dtype, sigma=1e-3)
    params = _merge_params(method)
    ref = dk.merge_deltas(deltas, base, method=method, seed=5, name="t", backend="reference", **params)
    got = dk.merge_deltas([d.to(dev) for d in deltas], base.to(dev), method=method, seed=5, name="t",
                          backend=backend, **params)
    assert got.dtype == base.dtype and got.device.type == dev.type
    assert_ulp_close(got, ref, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_abs_sums_match_reference(backend):
    dev, be = on(backend), get_backend(backend)
    x = realistic_delta((37, 129), torch.bfloat16, sigma=1e-3)
    xd = x.double()
    for method, kw in PRUNE_CASES:
        spec = dk.ops.sparsify_spec(method, **{k: v for k, v in kw.items() if k != "rescale"})
        plan = dk.ops.make_plan(be, x.to(dev), spec, seed=3, name="w", stream=0)
        f = R.sparsify_factor(x, spec, seed=3, name="w", stream=0)
        before, after = be.abs_sums(x.to(dev), plan)
        assert before == pytest.approx(float(xd.abs().sum()), rel=1e-6), method
        assert after == pytest.approx(float((xd * f).abs().sum()), rel=1e-6), method
