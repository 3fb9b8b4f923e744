"""DPPA as a FusionBench method (``method=dppa``): the algorithm class on FusionBench model pools, the
program entry point (FusionBench's own ``fusion_bench`` and our wrapper) and the α search with a
FusionBench task pool as its evaluator, each equal to :class:`dppa_kernels.dppa.DPPA` called
directly on the same state dicts; bad config values.

The task pool here is a small local one (distance of the candidate's weights to a target model):
FusionBench's own evaluation task pools (CLIP, GLUE, lm-eval) need model hub and dataset downloads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("fusion_bench.method", reason="fusion-bench is not installed (pip install 'dppa-kernels[fusion-bench]')")
pytest.importorskip("transformers", reason="transformers is not installed")

from fusion_bench.modelpool import BaseModelPool  # noqa: E402
from fusion_bench.taskpool import BaseTaskPool  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from test_integration_fusion_bench_algorithms import (  # noqa: E402
    causal_lm_pool, family_for, instance_pool, model, run_quiet, write_pool)

from dppa_kernels.dppa import DPPA  # noqa: E402
from dppa_kernels.integrations.fusion_bench_cli import SEARCH_PATH, with_search_path  # noqa: E402
from dppa_kernels.integrations.fusion_bench_dppa import DPPAAlgorithm, metric_of, taskpool_evaluator  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["task0", "task1", "task2"]


class DistanceTaskPool(BaseTaskPool):
    """A local task pool: ``distance.score`` = −‖θ − θ_target‖ over the floating tensors the target has."""

    def __init__(self, target_path: str, **kwargs):
        super().__init__(**kwargs)
        self.target = load_file(target_path)
        self.calls = 0

    def evaluate(self, model):
        self.calls += 1
        sd = model.state_dict()
        sq = sum(float((sd[k].float() - t.float()).pow(2).sum()) for k, t in self.target.items())
        return {"distance": {"score": -sq ** 0.5}, "calls": self.calls}


def target_file(family, path: Path) -> str:
    """θ_target = base + 1.5 (θ_0 − base): a merge that amplifies model 0 scores best."""
    _, base, fts = family
    save_file({k: (b.float() + 1.5 * (fts[0][k].float() - b.float())).contiguous() for k, b in base.items()},
              str(path))
    return str(path)


def direct(family, alphas=None, evaluate=None, max_evals=20, **kw):
    """DPPA called directly: (merged state dict, search result or None)."""
    _, base, fts = family
    merge_kw = {k: kw.pop(k) for k in ("combine", "weights", "lam") if k in kw}
    d = DPPA.from_models(base, fts, labels=NAMES, **kw)
    result = None
    if evaluate is not None:
        result = d.search(evaluate, model=model(base, family[0]), max_evals=max_evals, **merge_kw)
        alphas = result.best
    return d.merge(alphas, **merge_kw), result


def assert_equal_state(got: dict, want: dict):
    assert set(got) <= set(want) and "lm_head.weight" in got
    for k in got:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


# ---------------------------------------------------------------- the algorithm class

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("cfg,kw", [
    ({}, {}),
    ({"alphas": [1.8, 1.0], "combine": "ties", "scaling_factor": 0.7, "tie_mode": "gt"},
     {"alphas": (1.8, 1.0), "combine": "ties", "lam": 0.7, "tie_mode": "gt"}),
    ({"densities": [0.05, 0.1, 0.3], "alphas": "official_start", "combine": "mean",
      "weights": {"task2": 0.5, "task0": 2.0, "task1": 1.0}, "nonunit_mode": "base", "band_combine": "direct"},
     {"densities": [0.05, 0.1, 0.3], "alphas": "official_start", "combine": "mean", "weights": [2.0, 1.0, 0.5],
      "nonunit_mode": "base", "band_combine": "direct"}),
], ids=["defaults", "ties", "three_levels"])
def test_algorithm_equals_dppa_called_directly(dtype, cfg, kw):
    family = family_for(dtype)
    merged = run_quiet(DPPAAlgorithm(**cfg), instance_pool(family))
    want, _ = direct(family, **kw)
    assert_equal_state(merged.state_dict(), want)


def test_causal_lm_pool_from_folders(tmp_path):
    family = family_for(torch.bfloat16)
    paths = write_pool(family, tmp_path)
    alg = DPPAAlgorithm(alphas="amplified", scaling_factor=0.5)
    merged = run_quiet(alg, causal_lm_pool(paths, torch.bfloat16))
    want, _ = direct(family, alphas="amplified", lam=0.5)
    assert_equal_state(merged.state_dict(), want)
    assert [s["model"] for s in alg.dppa.summary] == NAMES  # labelled by the pool's names


def test_search_with_a_task_pool(tmp_path):
    """alphas: search with a task pool object: the same candidates, scores and choice as
    DPPA.search with the same evaluator, and the merged model is the best candidate's merge."""
    family = family_for(torch.float32)
    pool = DistanceTaskPool(target_file(family, tmp_path / "target.safetensors"))
    report = tmp_path / "out" / "search.json"
    alg = DPPAAlgorithm(alphas="search", combine="sum", scaling_factor=0.5,
                        search={"metric": "distance.score", "max_evals": 6, "taskpool": pool,
                                "report_path": str(report)})
    merged = run_quiet(alg, instance_pool(family))
    evaluator = taskpool_evaluator(DistanceTaskPool(str(tmp_path / "target.safetensors")), "distance.score")
    want, result = direct(family, evaluate=evaluator, max_evals=6, combine="sum", lam=0.5)
    got = alg.search_result
    assert got.best == result.best and got.best_score == result.best_score
    assert [r["alphas"] for r in got.table] == [r["alphas"] for r in result.table]
    assert [r["score"] for r in got.table] == [r["score"] for r in result.table]
    assert len(got.table) == 6 and pool.calls == 6
    assert got.best[0] != [1.8, 0.0]  # the search moved from its start
    assert_equal_state(merged.state_dict(), want)
    assert json.loads(report.read_text())["best_alphas"] == got.best


def test_search_with_python_evaluators_per_task():
    """run(pool, evaluate=[...]) with per_task: each model's own factors, as DPPA.search chooses them."""
    family = family_for(torch.float32)

    def norm_of(key):
        def ev(m):
            return -abs(float(m.state_dict()[key].float().norm()) - 3.0)
        return ev
    evs = [norm_of(f"model.layers.{i % 2}.mlp.up_proj.weight") for i in range(3)]
    alg = DPPAAlgorithm(alphas="search", search={"per_task": True, "max_evals": 3, "strategy": "grid"})
    merged = alg.run(instance_pool(family), evaluate=evs)
    _, base, fts = family
    d = DPPA.from_models(base, fts, labels=NAMES)
    res = d.search(evs, model=model(base, torch.float32), per_task=True, max_evals=3, strategy="grid")
    assert alg.search_result.best == res.best and len(alg.search_result.table) == 9
    assert_equal_state(merged.state_dict(), d.merge(res.best))


# ---------------------------------------------------------------- the program entry point

def program(tmp_path: Path, paths: dict, overrides: list, own_cli: bool, extra_pythonpath: str = ""):
    cfg = tmp_path / "cfg"
    (cfg / "modelpool").mkdir(parents=True, exist_ok=True)
    models = "\n".join(f"  {name}: {path}" for name, path in paths.items())
    (cfg / "modelpool" / "tiny.yaml").write_text(
        f"_target_: fusion_bench.modelpool.CausalLMPool\n_recursive_: false\nmodels:\n{models}\n"
        f"model_kwargs:\n  torch_dtype: bfloat16\ntokenizer: null\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", FUSION_BENCH_PROJECT_ROOT=str(tmp_path / "run"),
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), extra_pythonpath) if p))
    # FusionBench's own command needs our configs on Hydra's search path; the wrapper adds them
    entry, path = (["fusion_bench"], [f"hydra.searchpath=[{SEARCH_PATH}]"]) if own_cli else \
        (["dppa_kernels.integrations.fusion_bench_cli"], [])
    cmd = [sys.executable, "-m", *entry, "--config-dir", str(cfg), *path, "method=dppa", "modelpool=tiny",
           "fabric.accelerator=cpu", "print_config=false", f"merged_model_save_path={tmp_path / 'merged'}", *overrides]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("own_cli", [True, False], ids=["fusion_bench", "wrapper"])
def test_program_entry_point_equals_direct(tmp_path, own_cli):
    family = family_for(torch.bfloat16)
    paths = write_pool(family, tmp_path / "pool")
    overrides = ["taskpool=dummy", "method.alphas=[1.8,1.0]", "method.combine=ties", "method.scaling_factor=0.6",
                 "method.tie_mode=gt"] if own_cli else ["taskpool=dummy"]
    res = program(tmp_path, paths, overrides, own_cli)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    saved = load_file(str(tmp_path / "merged" / "model.safetensors"))
    kw = {"alphas": (1.8, 1.0), "combine": "ties", "lam": 0.6, "tie_mode": "gt"} if own_cli else {}
    want, _ = direct(family, **kw)
    assert_equal_state(saved, want)


def test_program_search_with_the_programs_task_pool(tmp_path):
    """method.alphas=search through the program: the program's task pool is the evaluator; the
    saved model is DPPA.search's choice with the same evaluator, merged."""
    family = family_for(torch.bfloat16)
    paths = write_pool(family, tmp_path / "pool")
    target = target_file(family, tmp_path / "target.safetensors")
    overrides = [f"taskpool._target_={Path(__file__).stem}.DistanceTaskPool", f"+taskpool.target_path={target}",
                 "method.alphas=search", "method.search.metric=distance.score", "method.search.max_evals=5",
                 f"method.search.report_path={tmp_path / 'search.json'}"]
    res = program(tmp_path, paths, overrides, own_cli=False, extra_pythonpath=str(ROOT / "tests"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    evaluator = taskpool_evaluator(DistanceTaskPool(target), "distance.score")
    want, result = direct(family, evaluate=evaluator, max_evals=5)
    report = json.loads((tmp_path / "search.json").read_text())
    assert report["best_alphas"] == result.best and len(report["candidates"]) == 5
    assert_equal_state(load_file(str(tmp_path / "merged" / "model.safetensors")), want)


def test_program_bad_config_is_a_clear_error(tmp_path):
    paths = write_pool(family_for(torch.bfloat16), tmp_path / "pool")
    res = program(tmp_path, paths, ["taskpool=dummy", "method.combine=median"], own_cli=False)
    assert res.returncode != 0
    assert "method.combine must be one of ('sum', 'mean', 'ties'), got 'median'" in res.stdout + res.stderr
    assert not (tmp_path / "merged").exists()


# ---------------------------------------------------------------- bad values

@pytest.mark.parametrize("cfg,match", [
    ({"densities": []}, "method.densities must be a non-empty list of numbers"),
    ({"densities": ["a", 0.2]}, "method.densities must be"),
    ({"densities": 0.1}, "method.densities must be"),
    ({"alphas": [1.8]}, r"method.alphas \(1.8,\) must have one factor per density level \(2\)"),
    ({"alphas": [1.8, -1.0]}, "method.alphas .* finite and >= 0"),
    ({"alphas": "searching"}, "method.alphas: unknown value 'searching'; valid: plain, .* or search"),
    ({"combine": "median"}, "method.combine must be one of"),
    ({"scaling_factor": "x"}, "method.scaling_factor must be a finite number, got 'x'"),
    ({"scaling_factor": float("nan")}, "method.scaling_factor must be a finite number"),
    ({"weights": {"task0": "heavy"}}, "method.weights must map model names to finite numbers"),
    ({"weights": [1.0, None]}, "method.weights must be a non-empty list of numbers"),
    ({"offset_lambda": "big"}, "method.offset_lambda must be a finite number, got 'big'"),
    ({"density_clamp": [0.0]}, "method.density_clamp must be 2 numbers"),
    ({"renormalize": "yes"}, "method.renormalize must be true or false"),
    ({"tie_mode": 3}, "method.tie_mode must be a string"),
    ({"search": {"strategy": "random"}}, "method.search.strategy must be one of"),
    ({"search": {"max_evals": 0}}, "method.search.max_evals must be a positive integer"),
    ({"search": {"metrics": "x"}}, r"method.search: unknown key\(s\) \['metrics'\]"),
    ({"search": {"metric": ""}}, "method.search.metric must be a dotted path"),
    ({"search": "greedy"}, "method.search must be a mapping"),
])
def test_bad_config_values_at_construction(cfg, match):
    with pytest.raises(ValueError, match=match):
        DPPAAlgorithm(**cfg)


@pytest.mark.parametrize("cfg,err,match", [
    ({"densities": [0.3, 0.1]}, ValueError, r"method=dppa: densities must be non-decreasing"),
    ({"densities": [0.1, 1.5]}, ValueError, r"method=dppa: densities\[1\] must be in \[0, 1\]"),
    ({"tie_mode": "lt"}, ValueError, "method=dppa: tie_mode must be gt, ge or exact_k, got 'lt'"),
    ({"backend": "tpu"}, ValueError, "method=dppa: backend must be one of"),
    ({"weights": {"task0": 1.0, "task9": 1.0}}, ValueError, r"missing \['task1', 'task2'\], unknown \['task9'\]"),
    ({"weights": [1.0, 2.0]}, ValueError, r"method.weights has 2 entries; the pool has 3"),
    ({"alphas": "search"}, ValueError, "set method.search.metric"),
    ({"alphas": "search", "search": {"metric": "average.accuracy"}}, ValueError, "there is no task pool"),
])
def test_bad_config_values_at_run(cfg, err, match):
    family = family_for(torch.float32)
    pool = instance_pool(family)
    before = {k: v.clone() for k, v in pool.load_model("_pretrained_").state_dict().items()}
    with pytest.raises(err, match=match):
        run_quiet(DPPAAlgorithm(**cfg), pool)
    after = pool.load_model("_pretrained_").state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing half-merged


def test_bad_pools(tmp_path):
    family = family_for(torch.bfloat16)
    _, base, fts = family
    with pytest.raises(ValueError, match="_pretrained_"):
        DPPAAlgorithm().run(BaseModelPool({"task0": model(fts[0], torch.bfloat16)}))
    with pytest.raises(ValueError, match="at least one fine-tuned model"):
        DPPAAlgorithm().run(BaseModelPool({"_pretrained_": model(base, torch.bfloat16)}))
    with pytest.raises(TypeError, match="lazy loading is not supported"):
        DPPAAlgorithm().run(causal_lm_pool(write_pool(family, tmp_path), torch.bfloat16, lazy=True))
    with pytest.raises(TypeError, match="modelpool must be a FusionBench BaseModelPool"):
        DPPAAlgorithm().run([model(base, torch.bfloat16)])
    with pytest.raises(ValueError, match="evaluate= is used only with method.alphas: search, got alphas 'plain'"):
        DPPAAlgorithm(alphas="plain").run(instance_pool(family), evaluate=lambda m: 1.0)


def test_metric_of_and_a_failing_metric(tmp_path):
    report = {"average": {"accuracy": torch.tensor(0.5), "loss": 1.0}, "task0": {"accuracy": float("nan")}}
    assert metric_of(report, "average.accuracy") == 0.5
    with pytest.raises(KeyError, match=r"no key 'acc' in average \(it has \['accuracy', 'loss'\]\)"):
        metric_of(report, "average.acc")
    with pytest.raises(ValueError, match="not a finite number"):
        metric_of(report, "task0.accuracy")
    with pytest.raises(ValueError, match="not a finite number"):
        metric_of(report, "average")
    # a metric the task pool's report lacks stops the search with the candidate named
    family = family_for(torch.float32)
    pool = DistanceTaskPool(target_file(family, tmp_path / "t.safetensors"))
    alg = DPPAAlgorithm(alphas="search", search={"metric": "distance.accuracy", "taskpool": pool})
    with pytest.raises(RuntimeError, match=r"evaluate failed on alphas \[1.8, 0.0\]: KeyError.*no key 'accuracy'"):
        run_quiet(alg, instance_pool(family))


def test_search_path_argument():
    p = f"hydra.searchpath=[{SEARCH_PATH}]"
    assert with_search_path(["method=dppa"]) == ["method=dppa", p]
    assert with_search_path(["hydra.searchpath=[file:///x]", "a=b"]) == \
        [f"hydra.searchpath=[file:///x,{SEARCH_PATH}]", "a=b"]
    assert with_search_path([p]) == [p]
    assert with_search_path(["hydra.searchpath=[]"]) == [p]
