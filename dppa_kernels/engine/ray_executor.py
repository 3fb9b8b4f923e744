"""The Ray executor: each output shard is a Ray task on any node of a cluster.

The driver plans, keeps the journal and commits (as with every executor); a task gets the job
(the plan, no tensor), reads its shard's input tensors from the model folders itself, writes the
shard file into the temporary output folder and returns its name, SHA-256 and report rows.
Tensors never travel through Ray's object store, so every node must see the model folders and
the output folder's parent under the same paths (a shared filesystem): before any shard is
written, one probe per node checks that it does. A worker that dies has its task retried by
Ray; the shard is rewritten from scratch (``.partial`` then rename), so the output is the same.
DPPA's statistics pass runs as one histogram task per output shard holding unit tensors; the
driver gathers the histograms and allocates once. See ``docs/ray.md``.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Optional, Sequence

import torch
from tqdm import tqdm

from .errors import MergeError, brief, clip
from .executor import Executor, MergeJob, Sink
from . import ray_tasks

INSTALL_HINT = "pip install 'dppa-kernels[ray]'"
MAX_RETRIES = 3  # per task, on a worker's or node's death (a task's own error is never retried)


def import_ray():
    try:
        import ray
    except ImportError as exc:
        raise MergeError(f"the ray executor needs the ray package, which is not installed ({clip(exc)}): "
                         f"{INSTALL_HINT}") from None
    return ray


class RayExecutor(Executor):
    """Shards (and DPPA's statistics) as Ray tasks.

    ``address``: the cluster to join (``"auto"``, ``"HOST:PORT"``, ``"ray://HOST:PORT"``); None
    joins the cluster this process is already connected to, else starts a local one (with
    ``workers`` CPUs). ``workers``: at most this many tasks at a time (default: as many as the
    cluster's resources allow). ``gpus_per_worker``: each task's ``num_gpus`` when the job runs
    on CUDA (default 1; 0.5 puts two tasks on a GPU). ``cpus_per_worker``: each task's
    ``num_cpus`` (its CPU backend's threads). ``unit``: the unit of work, ``(job, shard) ->
    ShardResult`` (default :func:`~.executor.execute_shard`); it must be picklable.

    After each run ``timeline`` holds one :class:`~.ray_tasks.TaskTiming` per task.
    """

    def __init__(self, address: Optional[str] = None, *, workers: Optional[int] = None,
                 gpus_per_worker: Optional[float] = None, cpus_per_worker: float = 1, progress: bool = True,
                 max_retries: int = MAX_RETRIES, unit: Optional[Callable] = None):
        if workers is not None and (not isinstance(workers, int) or workers < 1):
            raise MergeError(f"--workers must be a positive integer, got {brief(workers)}")
        if gpus_per_worker is not None and not gpus_per_worker > 0:
            raise MergeError(f"--gpus-per-worker must be positive, got {brief(gpus_per_worker)}")
        if not cpus_per_worker > 0:
            raise MergeError(f"cpus_per_worker must be positive, got {brief(cpus_per_worker)}")
        self.ray = import_ray()
        self.address = address
        self.workers = workers
        self.gpus = gpus_per_worker
        self.cpus = cpus_per_worker
        self.progress = progress
        self.max_retries = max_retries
        self.unit = unit
        self.timeline: list = []
        self.startup_s: Optional[float] = None  # time spent starting or joining the cluster
        self._probed: set = set()  # temporary folders whose visibility every node has confirmed

    # -- the cluster ---------------------------------------------------------------------------

    def connect(self) -> None:
        """Join (or start) the cluster once per process."""
        ray = self.ray
        if ray.is_initialized():
            return
        t = time.perf_counter()
        kw = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True)
        try:
            if self.address is None:  # "local": a new cluster even where `ray start` runs one
                ray.init(address="local", num_cpus=self.workers, **kw)
            else:
                ray.init(address=self.address, **kw)
        except Exception as exc:  # noqa: BLE001 (Ray raises ConnectionError, RuntimeError, ValueError...)
            where = f"the Ray cluster at {brief(self.address)}" if self.address else "a local Ray cluster"
            raise MergeError(f"cannot start or join {where}: {clip(exc)}") from None
        self.startup_s = time.perf_counter() - t

    def _resources(self, job: MergeJob) -> dict:
        gpu = job.device.startswith("cuda")
        return {"num_cpus": self.cpus, "num_gpus": (self.gpus or 1) if gpu else 0}

    def _check_nodes(self, job: MergeJob) -> None:
        """Every node that can run a task sees every input file (same size) and the temporary
        output folder: else a MergeError naming the node and the path, before any shard."""
        if job.tmp in self._probed:
            return
        ray = self.ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        need = "GPU" if job.device.startswith("cuda") else "CPU"
        nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get(need, 0) > 0]
        if not nodes:
            raise MergeError(f"the Ray cluster has no live node with a {need} (a task needs one)")
        files = ray_tasks.input_files(job)
        probe = ray.remote(ray_tasks.probe_node)
        refs = [probe.options(num_cpus=0, max_retries=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
            n["NodeID"], soft=False)).remote(files, job.tmp) for n in nodes]
        for node, problems in zip(nodes, [self._get(r) for r in refs]):
            if problems:
                more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
                name = f"{node.get('NodeManagerHostname', '?')} ({node.get('NodeManagerAddress', '?')})"
                raise MergeError(f"Ray node {name} (node id {node['NodeID'][:12]}) cannot see {clip(problems[0])}"
                                 f"{more}; every node must see the model folders and the output folder under the "
                                 f"same paths (a shared filesystem, see docs/ray.md)")
        self._probed.add(job.tmp)

    # -- running tasks -------------------------------------------------------------------------

    def _run(self, fn, calls: Sequence[tuple], job: MergeJob, on_done: Callable, desc: str) -> None:
        """Run ``fn(job_ref, *call)`` as one task per call, at most ``workers`` at a time; hand
        each result to ``on_done`` as it completes. On any failure the remaining tasks are
        cancelled and the task's own error is raised."""
        ray = self.ray
        remote = ray.remote(fn).options(max_retries=self.max_retries, retry_exceptions=False,
                                        **self._resources(job))
        job_ref = ray.put(ray_tasks.worker_job(job))  # the plan once, never a tensor
        limit = self.workers or len(calls) or 1
        todo = list(calls)
        pending: dict = {}
        bar = tqdm(total=len(calls), desc=desc, unit="task", disable=not self.progress, dynamic_ncols=True)
        try:
            while todo or pending:
                while todo and len(pending) < limit:
                    call = todo.pop(0)
                    pending[remote.remote(job_ref, *call)] = call
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    del pending[ref]
                    out, timing = self._get(ref)
                    self.timeline.append(timing)
                    on_done(out)
                    bar.update(1)
        except BaseException:
            for ref in pending:  # no task may go on writing into a folder the driver discards
                ray.cancel(ref, force=True)
            if pending:
                ray.wait(list(pending), num_returns=len(pending), timeout=10)
            raise
        finally:
            bar.close()

    def _get(self, ref):
        ray = self.ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, MergeError):
                raise MergeError(str(cause)) from None
            raise MergeError(f"a Ray task failed: {clip(cause if cause is not None else exc, 1500)}") from None
        except ray.exceptions.RayError as exc:  # a worker or node lost more often than the retries allow
            raise MergeError(f"a Ray task was lost after {self.max_retries} retries: {clip(exc, 1500)}") from None

    # -- the Executor interface ----------------------------------------------------------------

    def execute(self, job: MergeJob, shards: Sequence[int], sink: Sink) -> None:
        self.connect()
        self._check_nodes(job)
        calls = [(i, self.unit) for i in shards]
        self._run(ray_tasks.shard_task, calls, job, sink, "merge (ray)")

    def statistics(self, job: MergeJob, units: Sequence, *, sdtype: torch.dtype, keep: set) -> tuple[dict, bool]:
        """DPPA's phase 1: one histogram task per output shard holding unit tensors; the driver
        gathers the per-unit histograms (each unit's counted once, by one task)."""
        self.connect()
        self._check_nodes(job)
        groups: dict = {}
        for t in units:
            groups.setdefault(t.shard, []).append(t.name)
        calls = [(k, names, sdtype) for k, names in sorted(groups.items())]
        # one block for every histogram, as in the in-process pass; each task's block is copied in
        names = [n for _, group, _ in calls for n in group]
        first, j = {}, 0
        for k, group, _ in calls:
            first[k], j = j, j + len(group)
        block = torch.zeros((len(job.plan.models), len(names), 32768), dtype=torch.int32)

        def gather(part: tuple) -> None:
            k, hist = part
            block[:, first[k]:first[k] + hist.shape[1]].copy_(hist)

        self._run(ray_tasks.statistics_task, calls, job, gather, "phase 1/2 statistics (ray)")
        hists = {i: {n: block[i, j] for j, n in enumerate(names)} for i in range(len(job.plan.models))}
        return hists, False
