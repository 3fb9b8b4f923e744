"""dppa / dppa_ties inside mergekit: the statistics pre-pass, the lookup table, and parity with
our own ops and (when it exists) the ``dppa merge`` CLI."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import yaml

from integration_common import DEVICES, config, load, run, run_cli, write_family

from dppa_kernels import dp_densities, merge_deltas
from dppa_kernels.dppa import default_alphas
from dppa_kernels.integrations import mergekit as dk
from dppa_kernels.integrations.mergekit_dppa import DPPATable
from dppa_kernels.methods import methods
from dppa_kernels.reference.naming import group_units

DPPA_METHODS = [n for n, m in methods().items() if m.dppa]

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
@pytest.mark.parametrize("method", DPPA_METHODS)
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

    from integration_common import options

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
    params = [PARAMS[0], {"weight": 0.5, "sparsity": 0.75}]  # one level: default alphas (1.0,)
    cfg = config(method, fam, params, {**GLOBAL, **extra})
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg))
    run_cli(["-m", "dppa_kernels", "merge", str(path), "--out", str(tmp_path / "cli")])
    cli = load(tmp_path / "cli")
    got = run(cfg, tmp_path / "mk", ours=True)
    assert cli.keys() == got.keys()
    for k in got:
        assert torch.equal(got[k], cli[k]), k


def _state_dicts(n: int = 3, seed: int = 0, requires_grad: bool = False):
    gen = torch.Generator().manual_seed(seed)
    names = [f"model.layers.{i}.mlp.{u}.weight" for i in range(3) for u in ("up_proj", "down_proj")]

    def one():
        sd = {k: torch.randn(24, 16, generator=gen) * (1 + 0.5 * j) for j, k in enumerate(names)}
        sd["model.norm.weight"] = torch.randn(16, generator=gen)
        return {k: v.requires_grad_(requires_grad) for k, v in sd.items()}

    return [one() for _ in range(n)], names


@pytest.mark.parametrize("method", DPPA_METHODS)
def test_merge_state_dicts_strided_weights_without_mutation(method):
    """mergekit's rule for every registered method (test_state_dict_methods_accept_strided_weights
    _without_mutation): strided inputs merge like contiguous ones, finite, inputs untouched."""
    from mergekit.merge_methods import merge_state_dicts

    gen = torch.Generator().manual_seed(42)
    tensors = [torch.randn(4, 6, generator=gen).T for _ in range(3)]
    copies = [t.clone() for t in tensors]
    dk.install()
    with pytest.warns(UserWarning, match="no DPPA statistics pre-pass"):
        want = merge_state_dicts([{"w": t.contiguous()} for t in tensors], method, base=0,
                                 parameters={"weight": 1.0, "density": 0.7})["w"]
    with pytest.warns(UserWarning, match="no DPPA statistics pre-pass"):
        got = merge_state_dicts([{"w": t} for t in tensors], method, base=0,
                                parameters={"weight": 1.0, "density": 0.7})["w"]
    assert got.isfinite().all()
    torch.testing.assert_close(got, want)
    for t, c in zip(tensors, copies):
        assert torch.equal(t, c)


@pytest.mark.parametrize("method", DPPA_METHODS)
def test_merge_state_dicts_takes_dp_statistics_from_the_tensors_at_hand(method):
    """Without a pre-pass, the in-memory call allocates DP densities between the unit tensors it
    was given (what dp_densities computes from the same deltas) and merges with them."""
    from mergekit.merge_methods import merge_state_dicts

    sds, names = _state_dicts()
    densities = {1: 0.3, 2: 0.5}
    dk.install()
    with pytest.warns(UserWarning, match=r"6 DPPA unit\(s\)"):
        out = merge_state_dicts(sds, method, base=0, parameters={"weight": [1.0, 0.5], "density": densities})
    layers = group_units({k: tuple(v.shape) for k, v in sds[0].items()})
    assert set(layers) == set(names)
    allocs = {i: dp_densities({k: sds[i][k] - sds[0][k] for k in layers}, densities=(densities[i],),
                              layers=layers) for i in (1, 2)}
    assert len({allocs[1].densities[k][0] for k in layers}) > 1  # DP really varies per unit
    for k in names:
        want = merge_deltas([sds[i][k] - sds[0][k] for i in (1, 2)], sds[0][k], method=method,
                            weight=[1.0, 0.5], densities=[tuple(allocs[i].densities[k]) for i in (1, 2)],
                            alphas=[default_alphas(1)] * 2)
        assert torch.equal(out[k], want), k
    norm = "model.norm.weight"
    want = merge_deltas([sds[i][norm] - sds[0][norm] for i in (1, 2)], sds[0][norm],
                        method="ties" if method == "dppa_ties" else "task_arithmetic", weight=[1.0, 0.5],
                        density=1.0, normalize=method == "dppa_ties")
    assert torch.equal(out[norm], want)


def test_dppa_keeps_autograd_through_in_memory_inputs():
    """Grad on and inputs requiring grad: the differentiable reference merges (same values as our
    kernels), and the gradient w.r.t. a fine-tuned weight is weight × band factor where kept, else 0."""
    from mergekit.merge_methods import merge_state_dicts

    sds, names = _state_dicts(requires_grad=True)
    dk.install()
    with pytest.warns(UserWarning):
        out = merge_state_dicts(sds, "dppa", base=0, parameters={"weight": [1.0, 0.5], "density": 0.3})
    with torch.no_grad(), pytest.warns(UserWarning):
        plain = merge_state_dicts(sds, "dppa", base=0, parameters={"weight": [1.0, 0.5], "density": 0.3})
    k = names[0]
    assert out[k].requires_grad and not plain[k].requires_grad
    torch.testing.assert_close(out[k].detach(), plain[k], rtol=0, atol=1e-6)
    out[k].sum().backward()
    g = sds[2][k].grad
    assert set(torch.unique(g).tolist()) == {0.0, 0.5 * default_alphas(1)[0]}
    assert 0.2 < float((g != 0).float().mean()) < 0.4  # density 0.3 ± DP's offsets


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    ints = {2: torch.int16, 4: torch.int32}
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().view(ints[a.element_size()]),
                                                                      b.contiguous().view(ints[b.element_size()]))


@pytest.mark.parametrize("dtype", [None, "float32"])
@pytest.mark.parametrize("compat", ["official", "none"])
def test_compat_in_mergekit_writes_the_bytes_of_dppa_merge(fam, tmp_path, compat, dtype):
    """compat is read by one function on every path: mergekit's file-based run (the pre-pass), an
    in-memory merge_state_dicts call and ``dppa merge`` write the same bytes, bf16 models merged
    in bf16 or in fp32 (where compat official rounds Δ to bf16 and the default does not)."""
    from mergekit.merge_methods import merge_state_dicts

    glob = {"offset_lambda": 0.04, "compat": compat}
    params = [{"weight": 1.0, "density": 0.2}, {"weight": 0.7, "sparsity": 0.7}]
    cfg = config("dppa", fam, params, glob, dtype=dtype)
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg))
    run_cli(["-m", "dppa_kernels", "merge", str(path), "--out", str(tmp_path / "cli")])
    want = load(tmp_path / "cli")
    got = run(cfg, tmp_path / "mk", ours=True)
    dk.install()
    wd = torch.float32 if dtype else None
    with pytest.warns(UserWarning, match="no DPPA statistics pre-pass"):
        mem = merge_state_dicts([load(d) for d in fam], "dppa", base=0, dtype=wd, out_dtype=wd,
                                parameters={"weight": [1.0, 0.7], "density": {1: 0.2, 2: None},
                                            "sparsity": {1: None, 2: 0.7}, **glob})
    assert got.keys() == want.keys() == mem.keys()
    for k in want:
        assert _same_bytes(got[k], want[k]), k
        assert _same_bytes(mem[k], want[k]), k


def test_mergekit_parameters_come_from_the_registry():
    """The parameters mergekit binds for dppa (file and in-memory) are the registry entry's
    scalar mergekit parameters; the fast path reads the same whole-model keys as plain values."""
    from mergekit.merge_methods import registry

    from dppa_kernels.integrations.mergekit_dppa import PER_TENSOR, dppa_keys

    dk.install()
    for name in DPPA_METHODS:
        entry = methods()[name]
        declared = {p.name for p in registry._METHODS[name].spec.parameters}
        assert declared == {p.name for p in entry.params if p.mergekit and p.type is not list}
        keys = dppa_keys(name)
        assert set(keys["per_model"] + keys["settings"]) | set(PER_TENSOR) == set(entry.names(mergekit=True))
        assert set(keys["levels"]) == {"densities", "density", "sparsity"}


def test_in_memory_call_takes_every_scalar_setting():
    """density_renormalize, nonunit_mode, unit_pattern, compat reach an in-memory call's
    statistics (they were refused before they were declared)."""
    from mergekit.merge_methods import merge_state_dicts

    sds, names = _state_dicts()
    dk.install()
    common = {"weight": [1.0, 0.5], "density": 0.1, "offset_lambda": 0.3}
    with pytest.warns(UserWarning):
        plain = merge_state_dicts(sds, "dppa", base=0, parameters=common)
    with pytest.warns(UserWarning):
        renorm = merge_state_dicts(sds, "dppa", base=0, parameters={**common, "density_renormalize": True})
    assert any(not torch.equal(plain[k], renorm[k]) for k in names)
    with pytest.warns(UserWarning, match="nonunit_mode 'base'"):
        base_only = merge_state_dicts(sds, "dppa", base=0, parameters={**common, "nonunit_mode": "base"})
    assert torch.equal(base_only["model.norm.weight"], sds[0]["model.norm.weight"])
    with pytest.warns(UserWarning, match=r"2 DPPA unit\(s\)"):
        merge_state_dicts(sds, "dppa", base=0, parameters={**common, "unit_pattern": r"layers\.0\."})
    with pytest.raises(ValueError, match="compat must be one of none, official, got 'offical'"):
        merge_state_dicts(sds, "dppa", base=0, parameters={**common, "compat": "offical"})
