"""The α search on a local Ray cluster started here (one per module: 2 CPUs, no dashboard).

Grid, greedy, per-task and shared multi-task searches give the sequential search's result (best
factors, dense scores, the candidate table apart from the times) on synthetic evaluators with a
known optimum, the grid's candidates on more than one worker; an evaluator that raises in a
worker gives the sequential search's error and partial table; ``dppa search --executor ray``
writes the sequential command's candidates; evaluators that cannot travel by reference are
refused before any worker starts.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

# CI installs ray (.ci/setup); elsewhere it is an optional extra
ray = pytest.importorskip("ray", reason="the Ray search's tests need the optional ray package")

from dppa_kernels.dppa import DPPA, SearchError  # noqa: E402
from dppa_kernels.dppa.ray_search import search_on_ray  # noqa: E402
from dppa_kernels.dppa.search import _subset, grid_points  # noqa: E402
from test_dppa_api import _family  # noqa: E402

UNIT = "model.layers.1.mlp.up_proj.weight"
HERE = os.path.dirname(os.path.abspath(__file__))
_FAMILIES: dict = {}
# the grid candidate the exploding evaluator fails on (α_lo < α_hi: both read back from the merge)
BAD_AT = next(j for j, (hi, lo) in enumerate(_subset(grid_points(2), 60)) if j >= 25 and 0 < lo < hi)
BAD = _subset(grid_points(2), 60)[BAD_AT]


def _unit(m: int, seed: int, i: int) -> tuple:
    """(base, delta of model i) of the unit tensor the evaluators read back (same family as the DPPA)."""
    if (m, seed) not in _FAMILIES:
        base, fts = _family(torch.float32, m=m, seed=seed)
        _FAMILIES[(m, seed)] = base[UNIT], [ft[UNIT] - base[UNIT] for ft in fts]
    b, ds = _FAMILIES[(m, seed)]
    return b, ds[i]


def factors(sd: dict, m: int = 1, seed: int = 0, i: int = 0) -> tuple:
    """(α_hi, α_lo) read back from a merged state dict where model i alone was applied."""
    b, delta = _unit(m, seed, i)
    f = (sd[UNIT] - b) / torch.where(delta == 0, torch.ones_like(delta), delta)
    hi = round(float(f.reshape(-1)[delta.abs().argmax()]), 2)
    vals = {round(float(v), 2) for v in f[(delta != 0) & (f.abs() > 1e-3)].reshape(-1)}
    lo = [v for v in vals if abs(v - hi) > 0.02]
    return hi, (lo[0] if lo else 0.0)


def bowl(sd: dict, hi: float = 2.3, lo: float = 1.4, m: int = 1, seed: int = 0, i: int = 0) -> float:
    """−squared distance of the candidate's factors from (hi, lo): the optimum is (hi, lo)."""
    a, b = factors(sd, m, seed, i)
    return -((a - hi) ** 2 + (b - lo) ** 2)


def top(sd: dict, opt: float = 2.0, m: int = 2, seed: int = 3, i: int = 0) -> float:
    """A positive score of the merge's top factor for task i (peak at ``opt``)."""
    b, delta = _unit(m, seed, i)
    k = delta.abs().argmax()
    a = float((sd[UNIT] - b).reshape(-1)[k] / delta.reshape(-1)[k])
    return 1.0 / (1.0 + (a - opt) ** 2)


def task_a(sd: dict) -> float:
    return bowl(sd, 2.2, 1.1, m=2, seed=3, i=0)


def task_b(sd: dict) -> float:
    return bowl(sd, 1.5, 0.0, m=2, seed=3, i=1)


def top_a(sd: dict) -> float:
    return top(sd, 2.0, i=0)


def top_b(sd: dict) -> float:
    return top(sd, 1.6, i=1)


def exploding(sd: dict) -> float:
    """The bowl, except that one candidate of the grid raises."""
    if factors(sd) == BAD:
        raise RuntimeError("validation set exploded")
    return bowl(sd)


@pytest.fixture(scope="module")
def cluster():
    """A 2-CPU local cluster whose workers can import this module (the evaluators' references)."""
    assert not ray.is_initialized()
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (HERE, old) if p)  # the workers inherit it
    try:
        ctx = ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old
    yield ctx.address_info["address"]
    ray.shutdown()


@pytest.fixture(scope="module")
def one():
    return DPPA.from_models(*_family(torch.float32, m=1))


@pytest.fixture(scope="module")
def two():
    return DPPA.from_models(*_family(torch.float32, m=2, seed=3))


def same(a, b) -> None:
    """Equal search results apart from the times."""
    def strip(res):
        out = res.to_json()
        out["candidates"] = [{k: v for k, v in r.items() if not k.endswith("_s")} for r in out["candidates"]]
        return {k: v for k, v in out.items() if "seconds" not in k}
    assert strip(a) == strip(b)
    assert a.table, "an empty table proves nothing"


def test_grid_is_the_sequential_grid_on_two_workers(cluster, one):
    line: list = []
    got = search_on_ray(one, "test_ray_search:bowl", strategy="grid", max_evals=40, timeline=line)
    same(got, one.search(bowl, strategy="grid", max_evals=40))
    assert len(line) == 40 and len({e["pid"] for e in line}) == 2  # the grid spread over both workers
    assert all(e["pid"] != os.getpid() for e in line)


def test_greedy_is_the_sequential_greedy(cluster, one):
    got = search_on_ray(one, bowl, eval_kwargs={"hi": 2.1, "lo": 1.2}, max_evals=20, workers=1)
    assert got.best == [[2.1, 1.2]]
    same(got, one.search(lambda sd: bowl(sd, 2.1, 1.2), max_evals=20))


def test_per_task_and_shared_multi_task_searches(cluster, two):
    per = search_on_ray(two, ["test_ray_search:task_a", task_b], per_task=True, max_evals=20)
    seq = two.search([task_a, task_b], per_task=True, max_evals=20)
    same(per, seq)
    assert per.best == [[2.2, 1.1], [1.5, 0.0]]
    assert {r["task"] for r in per.table} == {0, 1}
    shared = search_on_ray(two, [top_a, top_b], max_evals=12)
    seq = two.search([top_a, top_b], max_evals=12)
    same(shared, seq)
    assert shared.dense == seq.dense and len(shared.dense) == 2


def test_an_evaluator_raising_in_a_worker_is_the_sequential_error(cluster, one):
    with pytest.raises(SearchError) as seq:
        one.search(exploding, strategy="grid", max_evals=60)
    with pytest.raises(SearchError) as got:
        search_on_ray(one, exploding, strategy="grid", max_evals=60)
    assert str(got.value) == str(seq.value)
    assert f"alphas {list(BAD)}" in str(got.value) and "validation set exploded" in str(got.value)
    assert got.value.candidate == seq.value.candidate
    same(got.value.partial, seq.value.partial)  # the rows before the failed candidate, in grid order
    assert len(got.value.partial.table) == BAD_AT


def test_evaluators_must_travel_by_reference(one):
    with pytest.raises(TypeError, match="by reference"):
        search_on_ray(one, lambda sd: 1.0)
    with pytest.raises(ValueError, match="cannot import module"):
        search_on_ray(one, "no_such_module_xyz:f")
    with pytest.raises(ValueError, match="strategy"):
        search_on_ray(one, bowl, strategy="random")


def test_cli_executor_ray_gives_the_sequential_candidates(cluster, tmp_path):
    pytest.importorskip("transformers")
    from dppa_kernels.tasks.tokenizer import char_tokenizer
    from engine_util import cli, family, write_config

    base, fts = family(tmp_path / "fam", n_ft=2)
    char_tokenizer().save_pretrained(str(tmp_path / "tok"))
    data = tmp_path / "val.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n" for a in range(5)
                            for b in range(3)))
    cfg = write_config(tmp_path / "cfg.yaml", "dppa", base, fts, model_params=[{"densities": [0.1, 0.2]}] * 2)
    reports = {}
    for executor, extra in (("local", []), ("ray", ["--ray-address", cluster, "--workers", "2"])):
        out = tmp_path / executor
        r = cli("search", cfg, "--eval", "dppa_kernels.eval:loss", "--eval-data", data, "--tokenizer",
                tmp_path / "tok", "--out", out, "--no-progress", "--strategy", "grid", "--max-evals", "3",
                "--executor", executor, *extra)
        assert r.exit_code == 0, r.output
        reports[executor] = json.loads((out / "search_report.json").read_text())
    loc, got = reports["local"], reports["ray"]
    assert got["executor"] == "ray" and got["best_alphas"] == loc["best_alphas"]
    rows = [[{k: v for k, v in r.items() if not k.endswith("_s")} for r in rep["candidates"]] for rep in (loc, got)]
    assert rows[0] == rows[1] and len(rows[0]) == 3
    assert got["realised_density"] == loc["realised_density"] and got["allocation"] == loc["allocation"]
