"""The method registry is the one home of every method and parameter: what the config
validation, the argument checks, mergekit's parameter specs, the fast path and the README
derive from it must match it."""

from __future__ import annotations

import os

import pytest
import torch

import dppa_kernels as dk
from dppa_kernels.engine.config import parse_config
from dppa_kernels.engine.errors import MergeError
from dppa_kernels.integrations import mergekit_fast as F
from dppa_kernels.methods import engine_methods, get_method, methods, preset, sparsifiers
from dppa_kernels.methods import _table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_tables_are_generated_from_the_registry():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    assert _table.render(text) == text, "README is stale: python -m dppa_kernels.methods._table README.md"
    for name in methods():
        assert f"| `{name}` |" in text


def test_every_method_names_a_registered_sparsifier_and_unique_params():
    sps = sparsifiers()
    for m in methods().values():
        assert m.sparsifier in sps, m.name
        names = [p.name for p in m.params]
        assert len(names) == len(set(names)), m.name
        assert m.combine in ("sum", "ties")
        assert all(p.scope in ("model", "global") and p.stage in ("merge", "dppa") for p in m.params)


def _cfg(method, glob=None, model=None):
    return {"merge_method": method, "base_model": "b", "models": [{"model": "m", "parameters": model or {}}],
            "parameters": glob or {}}


@pytest.mark.parametrize("method", engine_methods())
def test_config_accepts_exactly_the_registered_parameters(method):
    entry = get_method(method)
    for p in entry.params:
        value = p.default if p.default is not None else ([0.5] if p.type is list else
                                                          {float: 0.5, int: 1, bool: True, str: "x"}[p.type])
        value = list(value) if isinstance(value, tuple) else value
        parse_config(_cfg(method, glob={p.name: value}))
        if p.scope == "model":
            parse_config(_cfg(method, model={p.name: value}))
        else:
            with pytest.raises(MergeError, match="is global"):
                parse_config(_cfg(method, model={p.name: value}))
    with pytest.raises(MergeError, match="unknown parameter"):
        parse_config(_cfg(method, glob={"no_such_knob": 1}))


def test_linear_is_offered_by_merge_deltas_only():
    assert "linear" not in engine_methods()
    with pytest.raises(MergeError, match="unknown merge_method"):
        parse_config(_cfg("linear"))
    d = [torch.ones(4), 3 * torch.ones(4)]
    assert torch.equal(dk.merge_deltas(d, torch.zeros(4), method="linear"), 2 * torch.ones(4))


@pytest.mark.parametrize("method", sorted(methods()))
def test_preset_refuses_parameters_of_other_methods(method):
    other = "gamma" if "gamma" not in get_method(method).names() else "epsilon"
    with pytest.raises(ValueError, match=f"unknown parameter.*{other}"):
        preset(method, 2, {other: 0.1})


def test_param_check_types_and_ranges():
    entry = get_method("breadcrumbs")
    assert entry.param("gamma").check(0.5, "w") == 0.5
    with pytest.raises(ValueError, match="w: gamma = 1.5 is outside"):
        entry.param("gamma").check(1.5, "w")
    with pytest.raises(ValueError, match="normalize must be true or false"):
        entry.param("normalize").check(1, "w")
    with pytest.raises(ValueError, match="must be a finite number"):
        entry.param("weight").check(float("nan"), "w")
    with pytest.raises(ValueError, match="tie_mode must be one of"):
        entry.param("tie_mode").check("sometimes", "w")
    assert entry.param("rescale").check("inv_density", "w") == "inv_density"
    with pytest.raises(ValueError, match="densities must be a non-empty list"):
        get_method("dppa").param("densities").check([], "w")


def test_prune_offers_the_single_delta_sparsifiers():
    assert set(dk.ops.prune_methods()) == {n for n, s in sparsifiers().items() if s.prune}
    assert "none" not in dk.ops.prune_methods()
    with pytest.raises(ValueError, match="method must be one of"):
        dk.prune(torch.ones(3), "none", density=0.5)


def test_fast_path_takes_the_mergekit_parameters_only():
    assert F._param_reason("ties", {"density": 0.5}, [{"weight": 1.0}]) is None
    assert "tie_mode" in F._param_reason("ties", {"tie_mode": "ge"}, [{"weight": 1.0}])
    assert "no weight" in F._param_reason("ties", {}, [{}])  # mergekit requires a GTA weight
    assert F._param_reason("dppa", {"tie_mode": "ge"}, [{}]) is None
    assert "not a plain value" in F._param_reason("dppa", {"offset_lambda": [{"filter": "x", "value": 1}]}, [{}])


mergekit = pytest.importorskip("mergekit", reason="mergekit is an optional dependency")


@pytest.mark.parametrize("method", [n for n, m in methods().items() if m.mergekit == "gta"])
def test_registry_matches_mergekit_gta_specs(method):
    from mergekit import merge_methods as mm
    from mergekit.merge_methods.base import MISSING

    spec = {p.name: p for p in mm.get(method).spec.parameters}
    entry = get_method(method)
    assert set(spec) == set(entry.names(mergekit=True))
    for p in entry.params:
        if not p.mergekit:
            continue
        ps = spec[p.name]
        assert (ps.scope.name == "NON_BASE") == (p.scope == "model"), p.name
        if p.required:
            assert ps.default is MISSING, p.name
        elif p.name == "rescale":
            assert ps.default == entry.rescale
        elif p.name == "normalize":
            assert ps.default == entry.normalize
        else:
            assert ps.default == p.default, p.name


def test_installed_own_methods_declare_registry_specs():
    from mergekit import merge_methods as mm

    from dppa_kernels.integrations import mergekit as mk

    with mk.installed():
        for name in mk.own_names():
            spec = {p.name: p for p in mm.get(name).spec.parameters}
            assert set(spec) <= set(get_method(name).names(mergekit=True)), name
            assert mm.get(name).spec.reference_url.endswith(get_method(name).reference)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_each_sparsifier_knows_what_it_kept(backend):
    """Sparsifier.realised, given the plan the merge applied (none on the reference), equals the
    count of the reference factor's nonzeros; the report's kept fraction is that value (DARE's
    plan: the expected value, marked as such)."""
    from test_backend_parity import PRUNE_CASES

    from dppa_kernels import reference as R
    from dppa_kernels.backends.registry import get_backend
    from dppa_kernels.engine.report import kept_fraction
    from helpers import realistic_delta

    x = realistic_delta((37, 129), torch.bfloat16, sigma=2e-3)
    for method, kw in PRUNE_CASES:
        spec = dk.ops.sparsify_spec(method, **kw)
        plan = None if backend == "reference" else dk.ops.make_plan(get_backend(backend), x, spec, seed=3, name="w",
                                                                     stream=1)
        sp = sparsifiers()[method]
        got = sp.realised(x, spec, seed=3, name="w", stream=1, backend=backend, plan=plan)
        f = R.sparsify_factor(x, spec, seed=3, name="w", stream=1)
        assert got == float((f != 0).sum()) / x.numel(), (method, kw)
        guess = sp.expected(spec, plan)
        want = (got, True) if guess is None else (guess, False)
        assert kept_fraction(plan, spec, x, seed=3, name="w", stream=1) == want, (method, kw)
        assert (guess is None) == (plan is None or plan.kind != "dare"), (method, kw)


def test_the_report_counts_only_through_the_sparsifier(monkeypatch):
    """The merge report holds no counting rule of its own, so it cannot drift from the registry:
    for every sparsifier its kept fraction is what ``realised`` returns (with the plan, seed, name
    and stream of the tensor), or ``expected`` where that gives a value; its target is ``target``."""
    from dppa_kernels.backends.base import ApplyPlan
    from dppa_kernels.engine.recipe import Recipe
    from dppa_kernels.engine.report import kept_fraction, tensor_row
    from dppa_kernels.spec import CombineSpec, SparsifySpec

    x, plan = torch.ones(10), ApplyPlan("dense")
    for name, sp in sparsifiers().items():
        calls = []
        cls = type(sp)
        monkeypatch.setattr(cls, "realised", lambda self, d, s, **kw: calls.append((d, s, kw)) or 0.125)
        monkeypatch.setattr(cls, "expected", lambda self, s, p: None)
        monkeypatch.setattr(cls, "target", lambda self, s: [name])
        spec = SparsifySpec(name)
        assert kept_fraction(plan, spec, x, seed=4, name="t", stream=2) == (0.125, True), name
        assert calls == [(x, spec, dict(seed=4, name="t", stream=2, plan=plan))], name
        row = tensor_row(Recipe((1.0,), (spec,), CombineSpec()), [x], [plan], seed=4, name="t")
        assert row == {"target": [[name]], "realised": [0.125]}, name
        monkeypatch.setattr(cls, "expected", lambda self, s, p: 0.5)
        assert kept_fraction(plan, spec, x, seed=4, name="t", stream=2) == (0.5, False), name
        row = tensor_row(Recipe((1.0,), (spec,), CombineSpec()), [x], [plan], seed=4, name="t")
        assert row == {"target": [[name]], "realised": [0.5], "expected": [0]}, name
