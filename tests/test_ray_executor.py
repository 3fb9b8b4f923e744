"""The Ray executor on a local Ray cluster started here (one per module: 2 CPUs, no dashboard).

Same bytes as the golden ones for every method; DPPA's statistics as Ray tasks; a worker killed
in the middle of a shard (its task retried, the output unchanged); a driver killed after one
shard (``--resume`` finishes with every executor); a node that cannot see a model path (a clear
error naming it, before any shard); ray missing or its options misused (one clear error).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest

import engine_golden as G
from dppa_kernels.engine import MergeError, MergeOptions, execute_shard, run_merge
from dppa_kernels.engine.outdir import tmp_path as partial_dir
from dppa_kernels.engine.shards import JOURNAL, ShardWriter

# CI installs ray (.ci/setup); elsewhere it is an optional extra
ray = pytest.importorskip("ray", reason="the ray executor's tests need the optional ray package")

from dppa_kernels.engine.ray_executor import RayExecutor  # noqa: E402

GOLDEN = G.load_golden()["dppa_merge"]


@pytest.fixture(scope="module")
def cluster():
    """A 2-CPU local cluster for the module; yields its address (other drivers may join it)."""
    assert not ray.is_initialized()
    ctx = ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the test units run on workers
    yield ctx.address_info["address"]
    ray.shutdown()


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return G.shared_family(tmp_path_factory, "ray")


_config = G.config_of


@pytest.mark.parametrize("case", list(G.CASES))
def test_ray_writes_the_golden_bytes(cluster, family, tmp_path, case):
    ex = RayExecutor(progress=False)
    assert G.run_dppa_merge(_config(family, case), str(tmp_path / "out"), executor=ex) == GOLDEN[case]
    shards = sorted(t.index for t in ex.timeline if t.kind == "shard")
    assert shards == list(range(len(GOLDEN[case]) - 1))  # one task per output shard
    stats = [t for t in ex.timeline if t.kind == "statistics"]
    assert bool(stats) == case.startswith("dppa")  # DPPA's histograms counted by Ray tasks
    assert all(t.pid != os.getpid() for t in ex.timeline)


def test_cli_executor_ray_with_one_worker(cluster, family, tmp_path):
    """``dppa merge --executor ray --workers 1``: the golden bytes, one task at a time."""
    from typer.testing import CliRunner

    from dppa_kernels.cli import app

    out = str(tmp_path / "out")
    args = ["merge", _config(family, "ties"), "--out", out, "--executor", "ray", "--ray-address", cluster,
            "--workers", "1", "--backend", "cpu", "--out-shard-size", str(G.SHARD), "--seed", str(G.SEED),
            "--no-progress"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert G.digests(out) == GOLDEN["ties"]


def test_workers_limit_tasks_in_flight(cluster, family, tmp_path):
    ex = RayExecutor(workers=1, progress=False)
    assert G.run_dppa_merge(_config(family, "dppa"), str(tmp_path / "out"), executor=ex) == GOLDEN["dppa"]
    spans = sorted((t.start, t.end) for t in ex.timeline)
    assert len(spans) >= 3 and all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # never two at once


def dying_unit(marker: str):
    """A unit of work whose first call kills its own worker process (SIGKILL) after the first
    tensor of its shard is written: the shard's ``.partial`` is half-written when it dies."""

    def unit(job, i):
        if not os.path.exists(marker):
            with open(marker, "w") as f:
                f.write(str(os.getpid()))
            real = ShardWriter.add

            def add_then_die(self, *a, **k):
                real(self, *a, **k)
                self.f.flush()
                os.kill(os.getpid(), signal.SIGKILL)

            ShardWriter.add = add_then_die  # only in this worker process, which dies
        return execute_shard(job, i)

    return unit


@pytest.mark.parametrize("case", ["della", "dppa_ties"])
def test_worker_killed_mid_shard_is_retried(cluster, family, tmp_path, case):
    marker = str(tmp_path / "killed")
    ex = RayExecutor(progress=False, unit=dying_unit(marker))
    assert G.run_dppa_merge(_config(family, case), str(tmp_path / "out"), executor=ex) == GOLDEN[case]
    with open(marker) as f:
        dead = int(f.read())
    # the killed attempt returned nothing; a retry in another worker process did
    assert dead not in {t.pid for t in ex.timeline if t.kind == "shard"}


_KILLED_DRIVER = textwrap.dedent("""
    import os, signal, sys
    from dppa_kernels.engine import MergeOptions, run_merge
    from dppa_kernels.engine.shards import Journal

    real = Journal.record

    def record_then_die(self, result):  # the driver dies right after journaling its first shard
        real(self, result)
        os.kill(os.getpid(), signal.SIGKILL)

    Journal.record = record_then_die
    cfg, out, address, shard, seed = sys.argv[1:]
    run_merge(cfg, MergeOptions(out=out, executor="ray", ray_address=address, backend="cpu", shard_size=int(shard),
                                seed=int(seed), progress=False))
""")


@pytest.fixture(scope="module")
def killed_driver(cluster, family):
    """The temporary folder of a DPPA merge whose driver (joined to the module's cluster) was
    SIGKILLed after its first shard."""
    root = family[0]
    out = str(root / "killed-out")
    cmd = [sys.executable, "-c", _KILLED_DRIVER, _config(family, "dppa"), out, cluster, str(G.SHARD), str(G.SEED)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    tmp = partial_dir(out)
    with open(os.path.join(tmp, JOURNAL)) as f:
        assert len(json.load(f)["done"]) == 1
    return tmp


@pytest.mark.parametrize("executor", ["ray", "local", "serial"])
def test_driver_killed_then_resume_with_any_executor(cluster, family, tmp_path, killed_driver, executor):
    out = str(tmp_path / "out")
    shutil.copytree(killed_driver, partial_dir(out))  # the journal does not depend on the output's name
    assert G.run_dppa_merge(_config(family, "dppa"), out, executor=executor, resume=True) == GOLDEN["dppa"]
    with open(os.path.join(out, "merge_report.json")) as f:
        rep = json.load(f)
    assert rep["timings"].get("phase1_cached") is True  # the allocation the dead driver made


def test_node_that_cannot_see_a_model_path(cluster, family, tmp_path):
    """A model path only the driver can see (through one of its file descriptors): the probe of
    every node names the node and the path before any shard task runs; nothing is left."""
    fd = os.open(family[2][1], os.O_RDONLY | os.O_DIRECTORY)
    hidden = 900
    os.dup2(fd, hidden)
    os.close(fd)
    try:
        path = f"/proc/self/fd/{hidden}"
        fts = [family[2][0], path, family[2][2]]
        ex = RayExecutor(progress=False)
        out = str(tmp_path / "out")
        with pytest.raises(MergeError) as err:
            G.run_dppa_merge(_config(family, "ties", fts), out, executor=ex)
    finally:
        os.close(hidden)
    msg = str(err.value)
    assert "Ray node" in msg and f"{path}/model" in msg and "shared filesystem" in msg, msg
    assert ray.util.get_node_ip_address() in msg
    assert ex.timeline == []  # no shard (nor statistics) task ran
    assert not os.path.exists(out) and not os.path.exists(partial_dir(out))


def test_a_task_error_is_one_clear_error(cluster, family, tmp_path):
    """A shard task's own error reaches the driver as that MergeError (not retried, no Ray trace)."""
    calls = str(tmp_path / "calls")

    def failing(job, i):
        with open(calls, "a") as f:
            f.write("x")
        raise MergeError(f"tensor 'x' of shard {i}: broken")

    with pytest.raises(MergeError, match=r"^tensor 'x' of shard \d: broken$"):
        G.run_dppa_merge(_config(family, "ties"), str(tmp_path / "out"), executor=RayExecutor(unit=failing,
                                                                                               progress=False))
    assert not os.path.exists(tmp_path / "out")
    with open(calls) as f:
        assert 1 <= len(f.read()) <= 2  # never retried (two shards may have started)


@pytest.mark.parametrize("device, gpus, want", [("cpu", None, 0), ("cuda:1", None, 1), ("cuda", 0.5, 0.5)])
def test_a_cuda_task_asks_for_its_gpus(device, gpus, want):
    """With --device cuda each task asks Ray for ``gpus_per_worker`` GPUs (default 1) and runs on
    the one Ray gives it (``cuda``, whatever index the driver named)."""
    from dppa_kernels.engine.executor import MergeJob
    from dppa_kernels.engine.ray_tasks import worker_job

    job = MergeJob(plan=None, tmp="/x", shard_names=[], device=device, backend="torch")
    assert RayExecutor(gpus_per_worker=gpus, cpus_per_worker=2)._resources(job) == {"num_cpus": 2, "num_gpus": want}
    assert worker_job(job).device == ("cpu" if device == "cpu" else "cuda")


def test_a_statistics_task_returns_its_histograms_once(family, tmp_path):
    """A histogram task's result serialises to about its histograms' bytes (128 KiB per unit and
    model), not once per unit (views of one block would each carry the whole block)."""
    import math
    import pickle

    import torch

    from dppa_kernels.engine.config import load_config
    from dppa_kernels.engine.executor import MergeJob
    from dppa_kernels.engine.inputs import open_inputs
    from dppa_kernels.engine.plan import build_plan
    from dppa_kernels.engine.ray_tasks import statistics_task

    cfg, _ = load_config(_config(family, "dppa"))
    with open_inputs(cfg) as inputs:
        plan = build_plan(cfg, inputs.base, inputs.models, out_dtype=None, shard_size=G.SHARD, truncate_vocab=False)
        names = [t.name for t in plan.tasks if t.unit]
        job = MergeJob(plan, str(tmp_path), [], "cpu", "cpu")
        (k, block), timing = statistics_task(job, 3, names, torch.bfloat16)
    assert k == 3 and timing.kind == "statistics" and len(names) > 10
    assert block.shape == (3, len(names), 32768) and block.dtype == torch.int32
    numel = {t.name: math.prod(t.shape) for t in plan.tasks}
    assert all(int(block[i, j].sum()) == numel[n] for i in range(3) for j, n in enumerate(names))  # every element
    assert len(pickle.dumps((k, block))) < 1.05 * block.numel() * 4
