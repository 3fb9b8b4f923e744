"""The default executor: one process, the shards' tensors streamed in plan order.

A reader thread loads the next tensors while the current one is merged (:mod:`.prefetch`), and
a writer thread writes merged tensors into their shard while the next one is merged
(:mod:`.background_writer`). Memory stays bounded by a few tensors of every model, whatever the
model size. For DPPA on a GPU with room to spare, the statistics pass keeps the unit deltas on
the device for the merge (``resident``).
"""

from __future__ import annotations

from typing import Sequence

import torch
from tqdm import tqdm

from .background_writer import BackgroundWriter
from .dppa_phase import collect, resident_fits
from .executor import Executor, MergeJob, Sink, merge_raw, merge_task
from .prefetch import prefetch
from .shards import ShardWriter
from .workspace import Workspace


class LocalExecutor(Executor):
    def __init__(self, *, prefetch_depth: int = 2, progress: bool = True, resident: str = "auto"):
        self.depth = prefetch_depth
        self.progress = progress
        self.resident_mode = resident
        self._resident: dict = {}  # unit -> (base, deltas) kept on the device by the statistics pass

    def _bar(self, total: int, desc: str):
        return tqdm(total=total, desc=desc, unit="tensor", disable=not self.progress, dynamic_ncols=True, leave=True)

    @staticmethod
    def _loader(job: MergeJob, device: torch.device):
        pin = device.type == "cuda"
        return lambda task: job.read(task, pin=pin)

    def statistics(self, job: MergeJob, units: Sequence, *, sdtype: torch.dtype, keep: set) -> tuple[dict, bool]:
        device = torch.device(job.device)
        resident = resident_fits(job.plan, device, self.resident_mode)
        bar = self._bar(len(units), "phase 1/2 statistics")
        try:
            stream = prefetch(units, self._loader(job, device), device, depth=self.depth, progress=bar)
            hists, kept = collect(job.plan, stream, job.plan.labels, backend=job.backend, sdtype=sdtype,
                                  resident=resident)
        finally:
            bar.close()
        self._resident = {k: v for k, v in kept.items() if k in keep}
        return hists, resident

    def execute(self, job: MergeJob, shards: Sequence[int], sink: Sink) -> None:
        device = torch.device(job.device)
        wanted = set(shards)
        todo = [t for t in job.plan.tasks if t.shard in wanted]
        bar = self._bar(len(todo), "phase 2/2 merge" if any(t.unit for t in job.plan.tasks) else "merge")
        writer = BackgroundWriter(ShardWriter(job.tmp, job.shard_names, job.plan, sink))
        stream = prefetch([t for t in todo if t.name not in self._resident], self._loader(job, device), device,
                          depth=self.depth)
        ws = Workspace(device)
        try:
            for task in todo:
                if task.name in self._resident:
                    base, deltas = self._resident.pop(task.name)
                    out, row = merge_task(job, task, base, deltas)
                    del base, deltas
                else:
                    got, raw = next(stream)
                    assert got is task
                    out, row = merge_raw(job, task, raw, ws)
                    del raw
                writer.add(task, out.cpu(), row)
                del out
                bar.update(1)
            writer.join()  # every shard written and handed to the sink
        except BaseException:
            writer.abort()
            raise
        finally:
            stream.close()
            bar.close()
            self._resident.clear()

