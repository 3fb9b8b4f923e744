"""The execute stage as both drivers run it (``dppa merge`` and ``dppa-mergekit-yaml``'s fast path).

A run is ``open_inputs`` (:mod:`.inputs`) → ``plan`` (:mod:`.plan`) → ``execute`` (here: the
method's stage hook, then the executor on every shard the journal lacks) → ``commit`` (each
driver's own output layout). The driver holds the journal; the executor hands it each finished
shard.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from . import dppa_phase
from .config import is_dppa
from .executor import Executor, MergeJob
from .shards import Journal


@dataclass
class Executed:
    tensors: dict  # per-tensor report rows: this run's, a resumed run's and DPPA's units
    dppa: Optional[dict] = None  # the DPPA allocation report
    timings: dict = field(default_factory=dict)


def stage_hook(method: str) -> Optional[Callable]:
    """What ``method`` runs between the plan and the shards, or None. DPPA: its statistics pass
    and allocation, which give the unit tensors their recipes (:func:`.dppa_phase.prepare`)."""
    return dppa_phase.prepare if is_dppa(method) else None


def execute(job: MergeJob, executor: Executor, journal: Journal, *, resuming: bool = False,
            cache_dir: Optional[str] = None) -> Executed:
    """Merge every shard of ``job`` that ``journal`` lacks, after the method's stage hook
    (``cache_dir``: where the hook may keep its results for a resume)."""
    todo = [i for i, fn in enumerate(job.shard_names) if fn not in journal.done]
    out = Executed({})
    hook = stage_hook(job.plan.cfg.merge_method)
    if hook is not None:
        names = {t.name for t in job.plan.tasks if t.shard in set(todo)}
        out.dppa, unit_rows, out.timings = hook(job, executor, names, cache_dir=cache_dir, resuming=resuming)
        out.tensors.update(unit_rows)
    t = time.perf_counter()
    executor.execute(job, todo, journal.record)
    out.timings["merge_s"] = time.perf_counter() - t
    for name, row in journal.rows().items():  # a DPPA unit's row adds to its statistics row
        if row and (job.report or name in out.tensors):
            out.tensors[name] = {**out.tensors.get(name, {}), **row}
    return out
