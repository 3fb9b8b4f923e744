"""dppa / dppa_ties inside mergekit: the statistics pre-pass, the lookup table, and parity with
our own ops and (when it exists) the ``dppa merge`` CLI."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import yaml

from test_integration_common import DEVICES, config, load, run, run_cli, write_family

from dppa_kernels import dp_densities, merge_deltas
from dppa_kernels.integrations import mergekit as dk
from dppa_kernels.integrations.mergekit_dppa import DPPATable
from dppa_kernels.reference.naming import group_units

PARAMS = [{"weight": 1.0, "densities": [0.1, 0.2], "alphas": [1.8, 1.0]},
          {"weight": 0.7, "densities": [0.15, 0.3], "alphas": [2.0, 0.5]}]
GLOBAL = {"offset_lambda": 0.05, "outlier_mult_unit": 5, "tie_mode": "gt"}


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    return write_family(tmp_path_factory.mktemp("dppa"), n=2, dtype=torch.bfloat16, seed=5)


@pytest.fixture(autouse=True)
def _clean():
    yield
    dk.uninstall()
    dk.set_dppa_table(None)


def _expected(dirs, method, params, glob):
    """The same merge from in-memory tensors through the public ops only."""
    base = load(dirs[0])
    models = [load(d) for d in dirs[1:]]
    layers = group_units({k: tuple(v.shape) for k, v in base.items()})
    allocs = []
    for p, m in zip(params, models):
        deltas = {k: m[k] - base[k] for k in layers}
        allocs.append(dp_densities(deltas, densities=p["densities"], layers=layers,
                                   offset_lambda=glob["offset_lambda"],
                                   outlier_mult_unit=glob["outlier_mult_unit"]))
    out = {}
    for k, b in base.items():
        deltas = [m[k] - b for m in models]
        w = [p["weight"] for p in params]
        if k in layers:
            out[k] = merge_deltas(deltas, b, method=method, weight=w, tie_mode=glob["tie_mode"],
                                  densities=[tuple(a.densities[k]) for a in allocs],
                                  alphas=[tuple(p["alphas"]) for p in params])
        else:  # non-units: Δ × 1 (nonunit_mode "dense")
            out[k] = merge_deltas(deltas, b, method="ties" if method == "dppa_ties" else "task_arithmetic",
                                  weight=w, density=1.0, normalize=method == "dppa_ties")
    return out, layers


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["dppa", "dppa_ties"])
def test_dppa_in_mergekit_equals_public_ops(fam, tmp_path, method, device):
    got = run(config(method, fam, PARAMS, GLOBAL), tmp_path / "out", ours=True, cuda=device == "cuda")
    want, layers = _expected(fam, method, PARAMS, GLOBAL)
    assert got.keys() == want.keys()
    base = load(fam[0])
    for k in want:
        assert torch.equal(got[k], want[k]), k
    changed = [k for k in layers if not torch.equal(got[k], base[k])]
    assert len(changed) == len(layers)  # every unit got a (pruned, amplified) delta


def test_prepass_table_and_cost(fam):
    from mergekit.config import MergeConfiguration

    mc = MergeConfiguration.model_validate(config("dppa_ties", fam, PARAMS, GLOBAL))
    table = dk.prepare_dppa(mc, activate=False)
    assert table.cost["units"] == 14 and table.cost["bytes_read"] > 0
    for p, d in zip(PARAMS, fam[1:]):
        for name in table.units:
            dens = table.densities[(d, name)]
            assert len(dens) == 2 and dens[0] <= dens[1]
        assert table.alphas[d] == tuple(p["alphas"])
    # per-unit densities differ (that is the point of DP) but average to the level in N-weight
    base = load(fam[0])
    n = {k: base[k].numel() for k in table.units}
    for j, lvl in enumerate(PARAMS[0]["densities"]):
        mean = sum(table.densities[(fam[1], k)][j] * n[k] for k in n) / sum(n.values())
        assert len({table.densities[(fam[1], k)][j] for k in n}) > 1
        assert abs(mean - lvl) < 0.02


def test_dppa_without_prepass_is_a_clear_error(fam, tmp_path):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge

    from test_integration_common import options

    dk.install()
    mc = MergeConfiguration.model_validate(config("dppa", fam, PARAMS, GLOBAL))
    with pytest.raises(RuntimeError, match="prepare_dppa"):
        run_merge(mc, str(tmp_path / "out"), options())


def test_config_errors(fam):
    from mergekit.config import MergeConfiguration

    bad = config("dppa", fam, [{"densities": [0.1, 0.2], "density": 0.2}, {"weight": 1.0}], GLOBAL)
    with pytest.raises(ValueError, match="only one of"):
        dk.prepare_dppa(MergeConfiguration.model_validate(bad), activate=False)
    sliced = {"merge_method": "dppa", "base_model": fam[0],
              "slices": [{"sources": [{"model": d, "layer_range": [0, 2]} for d in fam]}]}
    with pytest.raises(ValueError, match="models:"):
        dk.prepare_dppa(MergeConfiguration.model_validate(sliced), activate=False)
    alphas = config("dppa", fam, [{"densities": [0.1, 0.2], "alphas": [1.5]}, {}], GLOBAL)
    with pytest.raises(ValueError, match="alphas"):
        dk.prepare_dppa(MergeConfiguration.model_validate(alphas), activate=False)


def test_unit_missing_from_table_is_an_error():
    t = DPPATable(units={"model.layers.0.mlp.up_proj.weight": 0})
    with pytest.raises(KeyError, match="no statistics"):
        t.specs("model.norm.weight", ["a"], (4,), normalize=True, lam=0.5)
    t.alphas.update(a=(1.8, 0.0), b=(1.5, 1.0))
    t.levels.update(a=(0.1, 0.2), b=(0.2, 0.3))
    with pytest.raises(KeyError, match="not seen"):
        t.specs("model.layers.1.mlp.up_proj.weight", ["a"], (8, 4), normalize=False, lam=1.0)
    specs, combine = t.specs("model.norm.weight", ["a", "b"], (4,), normalize=True, lam=0.5)
    assert [s.method for s in specs] == ["none", "none"] and combine.lam == 0.5
    t.nonunit_mode = "prune"
    specs, _ = t.specs("model.norm.weight", ["a", "b"], (4,), normalize=True, lam=0.5)
    assert [s.densities for s in specs] == [(0.1, 0.2), (0.2, 0.3)]


@pytest.mark.skipif(importlib.util.find_spec("dppa_kernels.cli") is None,
                    reason="dppa_kernels.cli (the `dppa merge` CLI) does not exist yet")
@pytest.mark.parametrize("method,extra", [
    ("dppa", {}), ("dppa_ties", {}), ("dppa_ties", {"nonunit_mode": "prune", "lambda": 0.8}),
    ("dppa", {"nonunit_mode": "official"}), ("dppa", {"nonunit_mode": "base"}),
])
def test_dppa_parity_with_dppa_merge_cli(fam, tmp_path, method, extra):
    params = [PARAMS[0], {"weight": 0.5, "sparsity": 0.75}]  # one level: default alphas (1.8,)
    cfg = config(method, fam, params, {**GLOBAL, **extra})
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg))
    run_cli(["-m", "dppa_kernels", "merge", str(path), "--out", str(tmp_path / "cli")])
    cli = load(tmp_path / "cli")
    got = run(cfg, tmp_path / "mk", ours=True)
    assert cli.keys() == got.keys()
    for k in got:
        assert torch.equal(got[k], cli[k]), k
