"""Consensus merging with TALL masks: the definition, every backend against the reference, and
the method in dppa merge, the mergekit fast path and mergekit itself (install())."""

from __future__ import annotations

import pytest
import torch
from backends import BACKENDS, on
from helpers import DTYPE_IDS, DTYPES, assert_ulp_close, family

import dppa_kernels as dk
from dppa_kernels.methods.consensus import consensus_mask


def _mask_by_definition(deltas, weights, lambdas, k):
    """m_i = |Δ_i| > λ_i·|S − Δ_i|, S = Σ w_j Δ_j, kept where Σ m_i ≥ k: element by element in float64."""
    d = torch.stack([x.double() for x in deltas]).reshape(len(deltas), -1)
    out = torch.zeros(d.shape[1], dtype=torch.bool)
    for e in range(d.shape[1]):
        s = sum(float(w) * float(d[i, e]) for i, w in enumerate(weights))
        votes = sum(abs(float(d[i, e])) > lam * abs(s - float(d[i, e])) for i, lam in enumerate(lambdas))
        out[e] = votes >= k
    return out.reshape(deltas[0].shape)


def test_mask_hand_example():
    # element 0: only model 0 matters (selfish) -> dropped at k=2; element 1: both matter equally;
    # element 2: all zero (never kept); element 3: opposite signs cancel, both matter
    d0 = torch.tensor([1.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    d1 = torch.tensor([0.0, 1.0, 0.0, -1.0], dtype=torch.float64)
    m = consensus_mask([d0, d1], [1.0, 1.0], [0.5, 0.5], 2)
    assert m.tolist() == [False, True, False, True]
    assert consensus_mask([d0, d1], [1.0, 1.0], [0.5, 0.5], 1).tolist() == [True, True, False, True]
    assert consensus_mask([d0, d1], [1.0, 1.0], [0.5, 0.5], 0).all()
    assert not consensus_mask([d0, d1], [1.0, 1.0], [0.5, 0.5], 3).any()
    # larger λ keeps less: |1| > λ·|S − 1| holds for elements 1 and 3 up to λ < 1
    assert consensus_mask([d0, d1], [1.0, 1.0], [0.99, 0.99], 2).tolist() == [False, True, False, True]
    assert not consensus_mask([d0, d1], [1.0, 1.0], [1.0, 1.0], 1)[1:].any()


@pytest.mark.parametrize("k", [0, 1, 2, 3, 4])
def test_mask_matches_the_definition(k):
    _, deltas = family((257,), 3, torch.float64, sigma=1e-3, seed=k)
    weights, lambdas = [1.0, 0.6, -0.4], [0.4, 0.2, 0.8]
    assert torch.equal(consensus_mask(deltas, weights, lambdas, k), _mask_by_definition(deltas, weights, lambdas, k))


@pytest.mark.parametrize("normalize", [False, True])
def test_reference_merge_is_masked_task_arithmetic(normalize):
    base, deltas = family((31, 17), 3, torch.float64, sigma=1e-3)
    w = [1.0, 0.5, 0.25]
    got = dk.merge_deltas(deltas, base, method="consensus", weight=w, k=2, tall_mask_lambda=[0.3, 0.4, 0.5],
                          normalize=normalize, lam=0.9, backend="reference")
    keep = _mask_by_definition(deltas, w, [0.3, 0.4, 0.5], 2).double()
    merged = sum(wi * keep * d for wi, d in zip(w, deltas)) * 0.9 / (sum(w) if normalize else 1.0)
    assert torch.allclose(got, base + merged, rtol=0, atol=1e-15)
    assert 0 < int(keep.sum()) < keep.numel()  # the example exercises both sides


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(1,), (7,), (1023,), (5, 33, 41)], ids=str)
@pytest.mark.parametrize("k", [0, 1, 2, 4])
def test_merge_matches_reference(backend, dtype, shape, k):
    device = on(backend)
    base, deltas = family(shape, 3, dtype, sigma=1e-3, seed=len(shape) + k)
    params = dict(weight=[1.0, 0.7, -0.3], k=k, tall_mask_lambda=[0.4, 0.3, 0.6], lam=1.1)
    ref = dk.merge_deltas(deltas, base, method="consensus", backend="reference", **params)
    plans: list = []
    got = dk.merge_deltas([d.to(device) for d in deltas], base.to(device), method="consensus", backend=backend,
                          plans_out=plans, **params)
    assert got.dtype == dtype and got.device.type == device.type
    assert_ulp_close(got, ref, dtype)
    keep = consensus_mask(deltas, params["weight"], params["tall_mask_lambda"], k)
    assert all(torch.equal(p.mask.cpu(), keep) for p in plans) and len(plans) == 3  # masks exact
    pruned = dk.merge_deltas([d.to(device) for d in deltas], base.to(device), method="consensus",
                             backend=backend, **params)[~keep.to(device)]
    assert torch.equal(pruned, base.to(device)[~keep.to(device)])  # dropped entries are the base's


def test_all_zero_and_edge_inputs(backend="cpu"):
    z = [torch.zeros(10), torch.zeros(10)]
    assert torch.equal(dk.merge_deltas(z, torch.ones(10), method="consensus", k=0), torch.ones(10))
    empty = [torch.zeros(0, 3), torch.zeros(0, 3)]
    assert dk.merge_deltas(empty, torch.zeros(0, 3), method="consensus").shape == (0, 3)


def test_bad_parameters_name_the_argument():
    _, deltas = family((8,), 2, torch.float32)
    with pytest.raises(ValueError, match="k must be an integer >= 0"):
        dk.merge_deltas(deltas, None, method="consensus", k=-1)
    with pytest.raises(ValueError, match="k must be an integer >= 0"):
        dk.merge_deltas(deltas, None, method="consensus", k=1.5)
    with pytest.raises(ValueError, match="tall_mask_lambda must be a finite number"):
        dk.merge_deltas(deltas, None, method="consensus", tall_mask_lambda=float("inf"))
    with pytest.raises(ValueError, match="tall_mask_lambda has 3 values"):
        dk.merge_deltas(deltas, None, method="consensus", tall_mask_lambda=[0.1, 0.2, 0.3])
    spec = dk.SparsifySpec("consensus", options=(("k", 2),))
    with pytest.raises(ValueError, match="merges every delta together"):
        dk.merge_deltas(deltas, None, specs=[spec, dk.SparsifySpec("none")])
    with pytest.raises(ValueError, match="k must be the same for every model"):
        dk.merge_deltas(deltas, None, specs=[spec, spec.with_(options=(("k", 1),))])
    with pytest.raises(ValueError, match="method must be one of"):
        dk.prune(deltas[0], "consensus")


# ------------------------------------------------------------------ dppa merge, fast path, mergekit

@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_dppa_merge_writes_the_consensus_of_each_tensor(tmp_path, backend):
    from integration_common import config, load, write_family

    from dppa_kernels.engine import MergeOptions, parse_config, run_merge

    dirs = write_family(tmp_path / "fam", n=3, dtype=torch.bfloat16, seed=5)
    params = [{"weight": 1.0, "tall_mask_lambda": 0.3}, {"weight": 0.5}, {"weight": 0.8}]
    cfg = config("consensus", dirs, params, {"k": 2, "tall_mask_lambda": 0.5})
    parse_config(cfg)
    import yaml

    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(cfg))
    report = run_merge(str(path), MergeOptions(out=str(tmp_path / "out"), backend=backend, progress=False))
    out, base = load(tmp_path / "out"), load(dirs[0])
    fts = [load(d) for d in dirs[1:]]
    for name, t in out.items():
        deltas = [ft[name] - base[name] for ft in fts]
        want = dk.merge_deltas(deltas, base[name], method="consensus", weight=[1.0, 0.5, 0.8], k=2,
                               tall_mask_lambda=[0.3, 0.5, 0.5], backend="reference")
        assert torch.equal(t, want), name
    real = [v for v in report["realised_density"].values()]
    assert all(0.0 < r < 1.0 for r in real), real


def test_fast_path_and_mergekit_fallback_bit_identical(tmp_path):
    pytest.importorskip("mergekit", reason="mergekit is an optional dependency")
    from integration_common import config, write_family
    from test_integration_mergekit_fast import assert_same, both

    dirs = write_family(tmp_path / "fam", n=2, dtype=torch.bfloat16, seed=7)
    cfg = config("consensus", dirs, [{"weight": 0.7, "tall_mask_lambda": 0.2}, {"weight": 0.6}], {"k": 1})
    fast, slow = both(cfg, tmp_path)
    assert_same(fast, slow)


def test_install_registers_consensus_in_mergekit():
    pytest.importorskip("mergekit", reason="mergekit is an optional dependency")
    from mergekit import merge_methods as mm

    from dppa_kernels.integrations import mergekit as mk

    with mk.installed():
        spec = mm.get("consensus").spec
        assert {p.name for p in spec.parameters} == {"weight", "tall_mask_lambda", "k", "normalize", "lambda",
                                                     "int8_mask"}
        assert spec.reference_url.endswith("2405.07813")
    with pytest.raises(RuntimeError):
        mm.get("consensus")
