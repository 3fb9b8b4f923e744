"""The quality harness end to end in --quick mode (tiny models; seconds), and its method tables."""

import json
import math

import pytest
import torch

from bench.quality import methods as M
from bench.quality.config import FULL, QUICK
from bench.quality.run import main


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("quality")
    n = torch.get_num_threads()
    try:
        results = main(["--quick", "--out", str(root / "out"), "--cache", str(root / "cache"), "--no-progress"])
    finally:
        torch.set_num_threads(n)  # main() sets the thread count for the process
    return results, root


def test_quick_run_writes_tables_plots_and_results(quick_run):
    results, root = quick_run
    out = root / "out"
    assert {p.name for p in out.iterdir()} >= {"README.md", "results.json", "retention.png", "merging.png"}
    assert json.loads((out / "results.json").read_text())["run"]["quick"] is True
    text = (out / "README.md").read_text()
    for name in [*M.PRUNE_METHODS, *M.MERGE_METHODS]:
        assert f"| {name} |" in text
    assert "| base (every delta dropped) |" in text and "## Share of the fine-tuning gain kept" in text
    rows = results["retention"]
    assert len(rows) == len(QUICK.tasks) * len(QUICK.densities) * len(M.PRUNE_METHODS)
    for r in rows:
        n_states = len(QUICK.dare_seeds) if r["method"] == "DARE" else 1
        assert 0 <= r["test_accuracy"] <= 1 and len(r["retentions"]) == n_states
        if r["expert_accuracy"] > 0:
            assert r["retention"] == pytest.approx(r["test_accuracy"] / r["expert_accuracy"])
        else:
            assert math.isnan(r["retention"])
    scaled = [r for r in rows if r["method"] == "magnitude × factor"]
    assert all(r["chosen"]["factor"] in QUICK.factor_grid for r in scaled)
    for r in results["merging"]:
        assert r["chosen"]["lambda"] in QUICK.lambda_grid and set(r["test_accuracy"]) == set(QUICK.tasks)


def test_rerun_uses_cached_models(quick_run):
    results, root = quick_run
    again = main(["--quick", "--out", str(root / "out2"), "--cache", str(root / "cache"), "--no-progress",
                  "--no-plots"])
    assert again["run"]["cached"] and not results["run"]["cached"]
    assert again["reference"] == results["reference"]  # same models, same splits


def _job(density=0.5, factors=(1.0, 2.0), alpha_evals=4):
    g = torch.Generator().manual_seed(0)
    unit = "model.layers.0.mlp.up_proj.weight"
    base = {unit: torch.randn(8, 16, generator=g), "model.norm.weight": torch.ones(4)}
    ft = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    seen = []

    def validate(state):  # prefers larger deltas: a known optimum at the largest factor
        seen.append(state)
        return float((state[unit] - base[unit]).abs().sum())

    return M.PruneJob(base, ft, density, [unit], validate, seeds=(0, 1),
                      factors=factors, alpha_evals=alpha_evals), seen


def test_prune_methods_touch_units_only_at_the_density():
    job, _ = _job()
    unit = "model.layers.0.mlp.up_proj.weight"
    delta = job.finetuned[unit] - job.base[unit]
    for name, method in M.PRUNE_METHODS.items():
        out = method(job)
        for state in out.states:
            assert torch.equal(state["model.norm.weight"], job.finetuned["model.norm.weight"]), name
            kept = (state[unit] - job.base[unit]).abs() > 1e-7
            if name == "DP":  # one unit: no offsets; DPPA's count rule may keep one less
                assert int(kept.sum()) in (63, 64)
            elif name == "DPPA (searched α)":  # α_lo = 0 keeps the upper band (d/2) only
                assert int(kept.sum()) in (31, 32, 63, 64)
            elif name != "DARE":  # DARE keeps each element with probability density
                assert int(kept.sum()) == 64, name
    mag = M.magnitude(job).states[0][unit] - job.base[unit]
    top = delta.abs().flatten().topk(64).indices
    assert torch.allclose(mag.flatten()[top], delta.flatten()[top])


def test_scaled_magnitude_picks_best_validation_factor():
    job, seen = _job(factors=(1.0, 3.0, 2.0))
    out = M.scaled_magnitude(job)
    assert out.chosen["factor"] == 3.0 and len(seen) == 3
    unit = "model.layers.0.mlp.up_proj.weight"
    plain = M.magnitude(job).states[0][unit] - job.base[unit]
    assert torch.allclose(out.states[0][unit] - job.base[unit], 3.0 * plain, atol=1e-6)


def test_merge_tuning_maximises_mean_validation():
    g = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(6, 6, generator=g)}
    fts = {t: {"w": base["w"] + 0.1 * torch.randn(6, 6, generator=g)} for t in ("a", "b")}
    target = base["w"] + 0.75 * sum(ft["w"] - base["w"] for ft in fts.values())

    def validate(state):  # best at λ = 0.75 for task arithmetic
        err = float((state["w"] - target).abs().sum())
        return {"a": -err, "b": -err}

    out = M.task_arithmetic(M.MergeJob(base, fts, validate, lambdas=(0.25, 0.75, 1.0)))
    assert out.chosen["lambda"] == 0.75 and torch.allclose(out.state["w"], target, atol=1e-5)
    assert len(out.chosen["grid"]) == 3


def test_full_budget_is_the_issue_s():
    assert FULL.densities == (0.9, 0.5, 0.2, 0.1) and len(FULL.dare_seeds) == 3
    assert QUICK.training_key() != FULL.training_key()


def test_dppa_searched_amplifies_the_top_band_on_validation():
    # validate prefers larger deltas: the greedy search raises α_hi at every step and keeps α_lo = 0
    job, seen = _job(alpha_evals=4)
    out = M.PRUNE_METHODS["DPPA (searched α)"](job)
    assert out.chosen["alphas"] == [2.1, 0.0] and out.chosen["evaluations"] == 4 and len(seen) == 4
    unit = "model.layers.0.mlp.up_proj.weight"
    delta = (job.finetuned[unit] - job.base[unit]).flatten()
    got = (out.states[0][unit] - job.base[unit]).flatten()
    kept = got.abs() > 1e-7
    assert int(kept.sum()) in (31, 32) and out.chosen["realised_density"] == pytest.approx(int(kept.sum()) / 128)
    assert set(kept.nonzero().flatten().tolist()) <= set(delta.abs().topk(32).indices.tolist())
    assert torch.allclose(got[kept], 2.1 * delta[kept], atol=1e-6)
    plain = M.PRUNE_METHODS["DP"](job)
    assert plain.chosen["alphas"] == [1.0, 1.0]


def test_dppa_merges_share_one_search_and_tune_lambda():
    g = torch.Generator().manual_seed(2)
    unit = "model.layers.0.mlp.up_proj.weight"
    base = {unit: torch.randn(8, 16, generator=g), "model.norm.weight": torch.ones(4)}
    fts = {t: {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for t in ("a", "b")}
    per_task = []

    def validate_task(state, task):
        per_task.append(task)
        return float(-(state[unit] - fts[task][unit]).abs().sum())  # closest to the task's expert

    def validate(state):
        return {t: validate_task(state, t) for t in fts}

    memo = {}
    outs = {}
    for name in ("DPPA + task arithmetic", "DPPA + TIES"):
        job = M.MergeJob(base, fts, validate, lambdas=(0.5, 1.0), densities=(0.5,), validate_task=validate_task,
                         alpha_evals=3, memo=memo)
        n = len(per_task)
        outs[name] = M.MERGE_METHODS[name](job)
        calls = len(per_task) - n
        # the first method runs the per-task α search (3 candidates per task) and the λ grid (2 × 2 tasks)
        assert calls == (2 * 3 + 4 if name == "DPPA + task arithmetic" else 4), (name, calls)
    for out in outs.values():
        assert out.chosen["lambda"] in (0.5, 1.0) and out.chosen["density"] == 0.5
        assert len(out.chosen["alphas"]) == 2 and len(out.chosen["grid"]) == 2
        assert out.state[unit].dtype == base[unit].dtype
