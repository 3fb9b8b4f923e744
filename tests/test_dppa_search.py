"""The α search on synthetic evaluators with a known optimum: greedy (two-sided, revert to 0),
grid, memoisation, max_evals, directions, per-task and shared multi-task search, bad evaluators."""

from __future__ import annotations

import math

import pytest
import torch

from dppa_kernels.dppa import DPPA, SearchError
from dppa_kernels.dppa.search import GRID_LOWER, GRID_TOP, grid_points
from test_dppa_api import _family

UNIT = "model.layers.1.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def one():
    base, fts = _family(torch.float32, m=1)
    return DPPA.from_models(base, fts)


@pytest.fixture(scope="module")
def two():
    base, fts = _family(torch.float32, m=2, seed=3)
    return DPPA.from_models(base, fts)


def factors(d, sd, i=0):
    """(α_hi, α_lo) read back from a state dict where model i alone was applied."""
    delta = d.deltas[i][UNIT]
    f = (sd[UNIT] - d.base[UNIT]) / torch.where(delta == 0, torch.ones_like(delta), delta)
    hi = round(float(f.reshape(-1)[delta.abs().argmax()]), 2)
    vals = {round(float(v), 2) for v in f[(delta != 0) & (f.abs() > 1e-3)].reshape(-1)}
    lo = [v for v in vals if abs(v - hi) > 0.02]
    return hi, (lo[0] if lo else 0.0)


def bowl(d, hi_opt, lo_opt, calls=None, i=0, sign=1.0):
    def evaluate(sd):
        if calls is not None:
            calls.append(1)
        hi, lo = factors(d, sd, i)
        return sign * -((hi - hi_opt) ** 2 + (lo - lo_opt) ** 2)
    return evaluate


def test_greedy_climbs_both_factors_and_memoises(one):
    calls = []
    res = one.search(bowl(one, 2.3, 1.4, calls), strategy="greedy", max_evals=20)
    assert res.best == [[2.3, 1.4]]
    seen = [tuple(r["alphas"]) for r in res.table]
    assert len(seen) == len(set(seen)) == len(calls)  # every candidate evaluated once
    assert seen[:2] == [(1.8, 0.0), (1.9, 0.0)] and (1.0,) == seen[7][1:]  # start, then up; then α_lo = 1.0
    assert res.best_score == pytest.approx(0.0, abs=1e-3)
    assert all(r["eval_s"] >= 0 and r["apply_s"] >= 0 for r in res.table)


def test_greedy_goes_down_when_up_is_worse(one):
    res = one.search(bowl(one, 1.2, 0.0), max_evals=20)
    assert res.best == [[1.2, 0.0]]
    assert [tuple(r["alphas"]) for r in res.table][:3] == [(1.8, 0.0), (1.9, 0.0), (1.7, 0.0)]


def test_greedy_reverts_the_lower_band_to_zero(one):
    """1.0 is worse than 0: the search keeps 0 (the official loop would stay at 1.0)."""
    res = one.search(bowl(one, 1.8, -1.0), max_evals=20)
    assert res.best == [[1.8, 0.0]]
    assert (1.8, 1.0) in [tuple(r["alphas"]) for r in res.table] and (1.8, 1.1) not in \
        [tuple(r["alphas"]) for r in res.table]


def test_max_evals_caps_the_search(one):
    res = one.search(bowl(one, 2.9, 1.8), max_evals=4)
    assert len(res.table) == 4 and res.best == [[2.1, 0.0]]


def test_lower_is_better(one):
    loss = bowl(one, 2.0, 1.2, sign=-1.0)  # a squared error: smaller is better
    loss.higher_is_better = False
    res = one.search(loss, max_evals=20)
    assert res.best == [[2.0, 1.2]] and res.best_score == pytest.approx(0.0, abs=1e-3)
    plain = bowl(one, 2.0, 1.2, sign=-1.0)  # no attribute: the argument says which way is better
    assert one.search(plain, max_evals=20, higher_is_better=False).best == [[2.0, 1.2]]


def test_grid_is_the_spec_grid(one):
    assert len(grid_points(2)) == 21 * 12 and GRID_TOP[0] == 1.0 and GRID_TOP[-1] == 3.0
    assert GRID_LOWER[:2] == (0.0, 1.0) and GRID_LOWER[-1] == 2.0
    full = one.search(bowl(one, 2.4, 1.3), strategy="grid", max_evals=300)
    assert full.complete and len(full.table) == 252 and full.best == [[2.4, 1.3]]
    part = one.search(bowl(one, 2.4, 1.3), strategy="grid", max_evals=20)
    assert not part.complete and len(part.table) == 20


def test_per_task_search_finds_each_models_own_factors(two):
    res = two.search([bowl(two, 2.2, 1.1, i=0), bowl(two, 1.5, 0.0, i=1)], per_task=True, max_evals=20)
    assert res.best == [[2.2, 1.1], [1.5, 0.0]]
    assert {r["task"] for r in res.table} == {0, 1}


def test_shared_search_maximises_the_normalised_geometric_mean(two):
    def score(i, opt):
        def f(sd):
            delta = two.deltas[i][UNIT]
            k = delta.abs().argmax()
            a = float(((sd[UNIT] - two.base[UNIT]).reshape(-1)[k]) / delta.reshape(-1)[k])
            return 1.0 / (1.0 + (a - opt) ** 2)
        return f
    evals = [score(0, 2.0), score(1, 1.6)]
    res = two.search(evals, max_evals=12)
    assert res.dense is not None and len(res.dense) == 2
    assert res.table[0]["objective"] == pytest.approx(
        math.sqrt(evals[0](two.merge((1.8, 0.0))) / res.dense[0] * evals[1](two.merge((1.8, 0.0))) / res.dense[1]),
        rel=1e-6)
    best = max(res.table, key=lambda r: r["objective"])
    assert res.best == [best["alphas"]] * 2


@pytest.mark.parametrize("bad, match", [
    (lambda n: (_ for _ in ()).throw(RuntimeError("boom")) if n == 3 else 1.0, "RuntimeError: boom"),
    (lambda n: float("nan") if n == 3 else 1.0, "finite"),
    (lambda n: "high" if n == 3 else 1.0, "expected a number"),
])
def test_bad_evaluate_names_the_candidate_and_keeps_the_partial_result(one, bad, match):
    n = [0]

    def evaluate(sd):
        n[0] += 1
        return bad(n[0])
    with pytest.raises(SearchError, match=match) as info:
        one.search(evaluate, max_evals=20)
    err = info.value
    assert "alphas [1.7, 0.0]" in str(err)  # start, 1.9 (not better), then 1.7 fails
    assert len(err.partial.table) == 2 and err.candidate


def test_bad_arguments(one, two):
    with pytest.raises(ValueError, match="strategy"):
        one.search(lambda sd: 1.0, strategy="random")
    with pytest.raises(ValueError, match="max_evals"):
        one.search(lambda sd: 1.0, max_evals=0)
    with pytest.raises(TypeError, match="callable"):
        one.search("not callable")
    with pytest.raises(ValueError, match="per_task"):
        two.search(lambda sd: 1.0, per_task=True)
