"""The execute stage's contract: a :class:`MergeJob`, the :class:`Executor` interface, and the unit
of work of one output shard (:func:`execute_shard`).

The driver plans, holds the journal and commits; an executor only turns planned shards into
files in the temporary folder and hands each :class:`~.shards.ShardResult` (file name, SHA-256,
report rows) to the driver's sink, in any order. A job is picklable and names its inputs by
path (an opened model reopens its files on first read), so a worker on another process or
machine can run :func:`execute_shard` from the job alone, provided it sees the same paths.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Optional, Sequence

import torch

from .compute import form_deltas, merge_tensor
from .report import tensor_row
from .shards import ShardResult, ShardWriter
from .workspace import Workspace

if TYPE_CHECKING:
    from .plan import MergePlan

Sink = Callable[[ShardResult], None]


@dataclass
class MergeJob:
    """Everything a shard needs: the plan (recipes included), where and under which names the
    shards go, and the per-run settings resolved once by the driver."""

    plan: "MergePlan"
    tmp: str  # the temporary folder the shards are written into
    shard_names: list  # file name of each output shard (the output layout's)
    device: str  # "cpu" or "cuda[:N]"
    backend: str  # a resolved backend name, never "auto"
    seed: int = 0
    report: bool = True  # per-tensor report rows (realised densities)

    def sources(self) -> list:
        return [self.plan.base] + list(self.plan.models)

    def read(self, task, *, pin: bool = False) -> list:
        """The raw input tensors of ``task`` on the CPU (base first), read from the model folders."""
        return [s.read(task.name, pin=pin, mapped=not pin) for s in self.sources()]


def _checks_in_pass(job: MergeJob, task) -> bool:
    """Whether the merge's own passes find NaN/Inf in ``task``'s deltas (a fast backend merging
    them), so that forming the deltas needs no separate reduction."""
    return job.backend != "reference" and task.recipe.mode != "base"


def merge_task(job: MergeJob, task, base: torch.Tensor, deltas: list, *,
               check_finite: bool = False) -> tuple[torch.Tensor, Optional[dict]]:
    """(output tensor, report row or None) of one floating tensor from its base and deltas;
    ``check_finite``: the merge checks the deltas for NaN/Inf (they were not checked yet)."""
    plans: list = []
    out = merge_tensor(task, base, deltas, task.recipe, seed=job.seed, backend=job.backend,
                       labels=job.plan.labels, check_finite=check_finite, plans_out=plans)
    row = None
    if job.report or task.unit:  # DPPA units always: the realised density counts the applied plans
        row = tensor_row(task.recipe, deltas, plans, seed=job.seed, name=task.name)
    return out, row


def merge_raw(job: MergeJob, task, raw: list, ws: Optional[Workspace]) -> tuple[torch.Tensor, Optional[dict]]:
    """(output tensor, report row or None) of one task from its raw inputs (base first)."""
    if not task.floating:
        return raw[0], None
    in_pass = _checks_in_pass(job, task)
    base, deltas = form_deltas(task, job.plan.labels, raw, ws, check_finite=not in_pass)
    out, row = merge_task(job, task, base, deltas, check_finite=in_pass)
    # the output outlives this call (a writer holds it): it must not live in the workspace
    assert ws is None or not ws.owns(out), f"tensor {task.name!r}: merge output aliases a workspace buffer"
    return out, row


def execute_shard(job: MergeJob, i: int) -> ShardResult:
    """Merge output shard ``i`` of ``job``: read its inputs from the model folders, merge each
    tensor by its recipe, write ``job.tmp/job.shard_names[i]`` (via ``.partial``, fsync-ed);
    returns its :class:`ShardResult`. Needs nothing but the job."""
    device = torch.device(job.device)
    done: list = []
    writer = ShardWriter(job.tmp, job.shard_names, job.plan, done.append)
    ws = Workspace(device)
    try:
        for task in job.plan.shard_tasks(i):
            raw = [t.to(device) for t in job.read(task)]
            out, row = merge_raw(job, task, raw, ws)
            del raw
            writer.add(task, out.cpu(), row)
    except BaseException:
        writer.abort()
        raise
    return done[0]


def _stream(job: MergeJob, tasks: Iterable, device: torch.device) -> Iterator:
    for task in tasks:
        yield task, [t.to(device) for t in job.read(task)]


class Executor(ABC):
    """Turns planned shards into files. Implementations: :class:`~.local_executor.LocalExecutor`
    (one process, a reader thread and a writer thread: the default) and :class:`SerialExecutor`
    (one :func:`execute_shard` call per shard: the reference for distributed executors)."""

    @abstractmethod
    def execute(self, job: MergeJob, shards: Sequence[int], sink: Sink) -> None:
        """Write each listed shard of ``job`` into ``job.tmp``, calling ``sink(result)`` once per
        shard as it is complete (any order, one call at a time). Raises on the first failure."""

    def statistics(self, job: MergeJob, units: Sequence, *, sdtype: torch.dtype, keep: set) -> tuple[dict, bool]:
        """DPPA's statistics pass: ({model: {unit: histogram}}, whether the executor kept the
        ``keep`` units' deltas for its :meth:`execute`). Default: read and count in this process."""
        from .dppa_phase import collect

        device = torch.device(job.device)
        hists, _ = collect(job.plan, _stream(job, units, device), job.plan.labels, backend=job.backend,
                           sdtype=sdtype, resident=False)
        return hists, False


class SerialExecutor(Executor):
    """One :func:`execute_shard` per shard, in order, in this process."""

    def execute(self, job: MergeJob, shards: Sequence[int], sink: Sink) -> None:
        for i in shards:
            sink(execute_shard(job, i))
