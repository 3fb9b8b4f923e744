"""The engine's stages and executors: every executor writes the same bytes (the golden ones); a
shard is a unit of work that runs from a pickled job in any order; a merge resumes with another
executor; per-run work (presets, validation) is not redone per tensor, and the report costs no
second apply."""

from __future__ import annotations

import os
import pickle

import pytest
import yaml

import engine_golden as G
from dppa_kernels.engine import Executor, MergeOptions, execute_shard, run_merge
from dppa_kernels.engine.outdir import tmp_path as partial_dir
from dppa_kernels.engine.shards import Journal


class PicklingExecutor(Executor):
    """A distributed executor's shape: each shard from a copy of the job that went through
    pickle (as it would to another process), in reverse order."""

    def __init__(self):
        self.shards: list = []

    def execute(self, job, shards, sink):
        for i in reversed(list(shards)):
            self.shards.append(i)
            sink(execute_shard(pickle.loads(pickle.dumps(job)), i))


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return G.shared_family(tmp_path_factory, "stages")


_config = G.config_of


def test_executor_is_an_interface():
    with pytest.raises(TypeError):
        Executor()


@pytest.mark.parametrize("case", list(G.CASES))
def test_serial_executor_writes_the_golden_bytes(family, tmp_path, case):
    got = G.run_dppa_merge(_config(family, case), str(tmp_path / "out"), executor="serial")
    assert got == G.load_golden()["dppa_merge"][case]


@pytest.mark.parametrize("case", ["ties", "dare_ties", "della", "dppa_ties"])
def test_shards_from_a_pickled_job_in_any_order(family, tmp_path, case):
    ex = PicklingExecutor()
    got = G.run_dppa_merge(_config(family, case), str(tmp_path / "out"), executor=ex)
    assert got == G.load_golden()["dppa_merge"][case]
    assert len(ex.shards) > 1 and ex.shards == sorted(ex.shards, reverse=True)


@pytest.mark.parametrize("case", ["dare_ties", "dppa"])
def test_resume_with_another_executor(family, tmp_path, monkeypatch, case):
    """Interrupted after one shard under the local executor, finished by the serial one."""
    cfg, out = _config(family, case), str(tmp_path / "out")
    real = Journal.record

    def stop_after_one(self, result):
        real(self, result)
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(Journal, "record", stop_after_one)
        with pytest.raises(KeyboardInterrupt):
            G.run_dppa_merge(cfg, out)
    assert len([f for f in os.listdir(partial_dir(out)) if f.endswith(".safetensors")]) == 1
    assert G.run_dppa_merge(cfg, out, executor="serial", resume=True) == G.load_golden()["dppa_merge"][case]


def _count_calls(monkeypatch, owner, name: str) -> list:
    calls: list = []
    real = getattr(owner, name)

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(owner, name, counting)
    return calls


@pytest.mark.parametrize("case", ["ties", "dare_ties", "breadcrumbs_ties"])
def test_one_apply_per_tensor_and_no_reference_rerun(family, tmp_path, monkeypatch, case):
    """The report counts the plans the merge applied: one fused apply per merged tensor."""
    from dppa_kernels import reference
    from dppa_kernels.backends.cpu import CpuBackend

    applies = _count_calls(monkeypatch, CpuBackend, "apply")
    monkeypatch.setattr(reference, "sparsify_factor", lambda *a, **k: pytest.fail("reference re-run"))
    rep = run_merge(_config(family, case), MergeOptions(out=str(tmp_path / "out"), backend="cpu", progress=False))
    assert len(applies) == rep["n_tensors"] == len(rep["tensors"])
    assert all(len(row["realised"]) == 3 for row in rep["tensors"].values())
    assert rep["realised_density_exact"] == (case != "dare_ties")


@pytest.mark.parametrize("case", ["dppa", "dppa_ties"])
def test_dppa_statistics_and_merge_resolve_no_backend(family, tmp_path, monkeypatch, case):
    """DPPA's statistics pass and merge check no tensor argument and resolve no backend per tensor."""
    from dppa_kernels import _validate, ops
    from dppa_kernels.engine import run as run_mod

    per_call = [_count_calls(monkeypatch, _validate, f) for f in ("check_tensor", "check_same", "check_finite")]
    in_ops, in_driver = _count_calls(monkeypatch, ops, "resolve"), _count_calls(monkeypatch, run_mod, "resolve")
    rep = run_merge(_config(family, case), MergeOptions(out=str(tmp_path / "out"), progress=False))
    assert rep["dppa"] and [len(c) for c in per_call] == [0, 0, 0]
    assert (len(in_driver), len(in_ops)) == (1, 0)


def test_presets_validation_and_backend_once_per_run(family, tmp_path, monkeypatch):
    """ties_fp32_work gives every tensor the same parameters: one preset and one validation of
    its three specs and its combine for the whole run, the backend resolved once, by the driver,
    and no per-tensor argument check in the merge loop."""
    from dppa_kernels import _validate, ops
    from dppa_kernels.engine import recipe
    from dppa_kernels.engine import run as run_mod

    presets = _count_calls(monkeypatch, recipe, "preset")
    specs = _count_calls(monkeypatch, _validate, "check_sparsify_spec")
    combines = _count_calls(monkeypatch, _validate, "check_combine_spec")
    per_call = [_count_calls(monkeypatch, _validate, f) for f in ("check_tensor", "check_same", "check_finite")]
    in_ops, in_driver = _count_calls(monkeypatch, ops, "resolve"), _count_calls(monkeypatch, run_mod, "resolve")
    rep = run_merge(_config(family, "ties_fp32_work"), MergeOptions(out=str(tmp_path / "out"), progress=False))
    assert rep["n_tensors"] > 20
    assert (len(presets), len(specs), len(combines)) == (1, 3, 1)
    assert [len(c) for c in per_call] == [0, 0, 0]
    assert (len(in_driver), len(in_ops)) == (1, 0)


FIRST = "lm_head.weight"  # the first tensor in output order (the run stops there), not a DPPA unit


def _poisoned(root, base: str, fts: list, name: str, value: float) -> list:
    """A copy of the fine-tuned models with one value of tensor ``name`` in the second replaced."""
    import shutil

    from safetensors.torch import load_file, save_file

    out = []
    for i, src in enumerate(fts):
        dst = os.path.join(str(root), f"p{i}")
        shutil.copytree(src, dst)
        if i == 1:
            for fn in os.listdir(dst):
                if fn.endswith(".safetensors"):
                    sd = load_file(os.path.join(dst, fn))
                    if name in sd:
                        sd[name].view(-1)[7] = value
                        save_file(sd, os.path.join(dst, fn), metadata={"format": "pt"})
        out.append(dst)
    return out


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's Inf * 0
@pytest.mark.parametrize("backend", ["cpu", "torch", "triton", "reference"])
@pytest.mark.parametrize("case,params,name", [
    ("task_arithmetic", None, FIRST), ("dare_linear", None, FIRST), ("della", None, FIRST), ("ties", None, FIRST),
    ("dppa", {"nonunit_mode": "base"}, FIRST), ("dppa", None, "model.layers.1.mlp.up_proj.weight")])
def test_a_nan_or_inf_delta_is_refused_by_every_plan_kind(family, tmp_path, backend, case, params, name):
    """Dense, DARE, mask and threshold plans find NaN/Inf inside the merge's passes, DPPA's unit
    deltas inside the statistics pass's histograms; the reference and a tensor whose base is
    copied (DPPA nonunit_mode base) check them beforehand."""
    from dppa_kernels.backends.registry import availability
    from dppa_kernels.engine import MergeError

    ok, why = availability()[backend]
    if not ok:
        pytest.skip(f"backend {backend} unavailable: {why}")  # CI requires cpu and triton (tests/test_ops.py)
    _, base, fts = family
    value = {"cpu": float("nan"), "torch": float("inf"), "triton": -float("inf")}.get(backend, float("nan"))
    bad = _poisoned(tmp_path, base, fts, name, value)
    method, per, glob, top = G.CASES[case]
    cfg = str(tmp_path / "c.yml")
    with open(cfg, "w") as f:
        yaml.safe_dump({"merge_method": method, "base_model": base, "parameters": {**(glob or {}), **(params or {})},
                        "models": [{"model": m, "parameters": p} for m, p in zip(bad, per)], **top}, f)
    with pytest.raises(MergeError, match=f"tensor '{name}': the delta of model '{bad[1]}' has 1 NaN/Inf value"):
        run_merge(cfg, MergeOptions(out=str(tmp_path / "out"), backend=backend, progress=False))
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_float64_work_is_refused_by_the_plan_on_a_fast_backend(family, tmp_path, backend):
    """The merge loop checks no dtype: the plan refuses what a fast backend cannot merge."""
    from dppa_kernels.engine import MergeError

    cfg = G.write_config(str(tmp_path / "c.yml"), "ties", family[1], family[2])
    with open(cfg) as f:
        data = yaml.safe_load(f)
    with open(cfg, "w") as f:
        yaml.safe_dump({**data, "dtype": "float64"}, f)
    with pytest.raises(MergeError, match="merges in float64, which only --backend reference"):
        run_merge(cfg, MergeOptions(out=str(tmp_path / "out"), backend=backend, progress=False))
    assert not os.path.exists(tmp_path / "out")


def test_mergekit_fast_path_runs_the_stages_without_a_yaml_round_trip(family, tmp_path, monkeypatch):
    """dppa-mergekit-yaml's fast path plans once and runs the stages: no config written and parsed
    again, no run_merge, no file opened for writing twice (nothing rewritten), the golden bytes."""
    import builtins
    import tempfile

    from dppa_kernels.engine import config as config_mod
    from dppa_kernels.engine import plan as plan_mod
    from dppa_kernels.engine import run as run_mod

    cfg = _config(family, "dare_ties")
    for owner, name in [(run_mod, "run_merge"), (config_mod, "load_config"), (yaml, "safe_dump"), (yaml, "dump"),
                        (tempfile, "mkstemp"), (tempfile, "NamedTemporaryFile"), (tempfile, "mkdtemp")]:
        monkeypatch.setattr(owner, name, lambda *a, _n=name, **k: pytest.fail(f"the fast path called {_n}"))
    plans = _count_calls(monkeypatch, plan_mod, "build_plan")
    real_open, written = builtins.open, []

    def recording_open(file, mode="r", *a, **k):
        if any(c in mode for c in "wax+"):
            written.append(os.path.abspath(file))
        return real_open(file, mode, *a, **k)

    monkeypatch.setattr(builtins, "open", recording_open)
    got = G.run_mergekit_fast(cfg, str(tmp_path / "mk"))
    monkeypatch.setattr(builtins, "open", real_open)
    assert got == G.load_golden()["mergekit_yaml"]["dare_ties"]
    assert len(plans) == 1 and written and len(written) == len(set(written)), written
