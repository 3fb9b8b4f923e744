"""What a Ray worker runs for :class:`~.ray_executor.RayExecutor` (Ray is imported only to name the node).

Three kinds of task, each needing only the job and the paths in it: the visibility probe of a
node (:func:`probe_node`), DPPA's histograms of some unit tensors (:func:`unit_histograms`), and
one output shard (:func:`shard_task`). Every one reads its inputs from the model folders itself;
only the job (the plan, no tensor) goes to a worker, and only file names, digests, report rows,
histograms and timings come back.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import socket
import time
from typing import Callable, Optional, Sequence

import torch

from .executor import MergeJob, SerialExecutor, execute_shard
from .shards import ShardResult


def worker_job(job: MergeJob) -> MergeJob:
    """The job as a worker runs it: a GPU task uses the GPU Ray gave it (``cuda``, whatever
    index the driver named), and the CPU threads Ray gave it."""
    if job.device.startswith("cuda"):
        return dataclasses.replace(job, device="cuda")
    return job


def node_name() -> str:
    """This node's host name and its address in the Ray cluster."""
    try:
        from ray.util import get_node_ip_address

        ip = get_node_ip_address()
    except Exception:  # noqa: BLE001 (outside a Ray worker)
        ip = "?"
    return f"{socket.gethostname()} ({ip})"


def peak_rss_mib() -> float:
    """This process's peak RSS: VmHWM (ru_maxrss would carry the peak of a process it was exec-ed from)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def probe_node(files: Sequence[tuple[str, str, int]], tmp: str) -> list:
    """The problems of this node with the inputs ``files`` ((model label, path, size the driver
    sees)) and the temporary output folder ``tmp``: every path must be here, with the same size,
    and ``tmp`` writable."""
    problems = []
    for label, path, size in files:
        try:
            got = os.stat(path).st_size
        except OSError as exc:
            problems.append(f"{path} (model {label}): {exc.strerror or exc}")
            continue
        if got != size:
            problems.append(f"{path} (model {label}): {got} bytes here, {size} on the driver")
    if not os.path.isdir(tmp):
        problems.append(f"{tmp} (the temporary output folder): not found")
    elif not os.access(tmp, os.W_OK):
        problems.append(f"{tmp} (the temporary output folder): not writable")
    return problems


def input_files(job: MergeJob) -> list:
    """(model label, path, size) of every weight file the job reads."""
    return [(s.label, p, os.path.getsize(p)) for s in job.sources() for p in s.files()]


def unit_histograms(job: MergeJob, names: Sequence[str], sdtype: torch.dtype) -> torch.Tensor:
    """DPPA's statistics of the unit tensors ``names``: one int32 block [model, unit, bin], counted
    by the in-process pass on a copy of the plan that holds only these units. One contiguous
    tensor goes back (a dict of views would serialise their shared storage once per view)."""
    wanted = set(names)
    units = [t for t in job.plan.tasks if t.name in wanted]
    sub = dataclasses.replace(job, plan=dataclasses.replace(job.plan, tasks=units))
    hists, _ = SerialExecutor().statistics(sub, units, sdtype=sdtype, keep=set())
    return torch.stack([torch.stack([hists[i][n] for n in names]) for i in range(len(job.plan.models))])


@dataclasses.dataclass
class TaskTiming:
    """One task of the timeline: which shard (or statistics group), where, when (Unix seconds)."""

    kind: str  # "shard" or "statistics"
    index: int
    node: str
    pid: int
    start: float
    end: float
    peak_rss_mib: float  # the worker process's peak so far (a worker runs several tasks)
    bytes_written: int = 0


def timed(kind: str, index: int, fn: Callable, *args):
    t0 = time.time()
    out = fn(*args)
    nbytes = 0
    if isinstance(out, ShardResult):
        nbytes = os.path.getsize(os.path.join(args[0].tmp, out.file))
    return out, TaskTiming(kind, index, node_name(), os.getpid(), t0, time.time(), peak_rss_mib(), nbytes)


def shard_task(job: MergeJob, i: int, unit: Optional[Callable] = None) -> tuple[ShardResult, TaskTiming]:
    """Output shard ``i`` written into ``job.tmp`` by ``unit`` (default :func:`~.executor.execute_shard`)."""
    return timed("shard", i, unit or execute_shard, job, i)


def statistics_task(job: MergeJob, k: int, names: Sequence[str], sdtype: torch.dtype) -> tuple[tuple, TaskTiming]:
    """((k, histogram block of the units ``names``), timing): group ``k`` of DPPA's statistics."""
    hist, timing = timed("statistics", k, unit_histograms, job, names, sdtype)
    return (k, hist), timing
