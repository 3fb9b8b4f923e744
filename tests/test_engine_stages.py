"""The engine's stages and executors: every executor writes the same bytes (the golden ones); a
shard is a unit of work that runs from a pickled job in any order; a merge resumes with another
executor; per-run work (presets, validation) is not redone per tensor, and the report costs no
second apply."""

from __future__ import annotations

import os
import pickle

import pytest

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
    root = tmp_path_factory.mktemp("stages")
    base, fts = G.family_once(str(tmp_path_factory.getbasetemp() / "golden-family"))  # shared by the modules
    return root, base, fts


def _config(family, case: str) -> str:
    root, base, fts = family
    return G.write_config(str(root / f"{case}.yml"), case, base, fts)


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


def test_presets_are_built_once_per_parameter_set(family, tmp_path, monkeypatch):
    """ties_fp32_work gives every tensor the same parameters: one preset for the whole run."""
    from dppa_kernels.engine import recipe

    presets = _count_calls(monkeypatch, recipe, "preset")
    rep = run_merge(_config(family, "ties_fp32_work"), MergeOptions(out=str(tmp_path / "out"), progress=False))
    assert rep["n_tensors"] > 20 and len(presets) == 1
