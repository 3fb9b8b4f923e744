"""Sharded safetensors output, streamed tensor by tensor, with a journal for ``--resume``.

Each shard's header is fixed by the plan, so a shard is written front to back as its tensors are
computed (never held in memory), then fsync-ed, renamed from ``*.partial`` and recorded with its
SHA-256 in ``journal.json``. A resumed run verifies every recorded shard and redoes the rest, so
its output is byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Optional

import torch

from .errors import MergeError, clip, write_failed
from .st_format import plan_header, tensor_bytes

JOURNAL = "journal.json"
INDEX = "model.safetensors.index.json"
_COMMIT_DELAY_S = float(os.environ.get("DPPA_KERNELS_SHARD_DELAY_S", "0") or 0)


def shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def write_json_atomic(path: str, obj) -> None:
    tmp = path + ".tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise write_failed(tmp, exc) from None


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


class Journal:
    """Which shards of this exact merge (same fingerprint) are complete in the temp folder."""

    def __init__(self, tmpdir: str, fingerprint: str):
        self.path = os.path.join(tmpdir, JOURNAL)
        self.fingerprint = fingerprint
        self.done: dict[str, str] = {}

    def load_verified(self) -> list[str]:
        """Keep recorded shards whose bytes still match; returns the names dropped."""
        if not os.path.exists(self.path):
            return []
        try:
            with open(self.path) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError):
            return ["journal.json (unreadable)"]
        if data.get("fingerprint") != self.fingerprint:
            raise MergeError(f"{clip(os.path.dirname(self.path))} holds an interrupted merge of a different config, "
                             f"inputs or options (it is kept); rerun with --force to start over")
        dropped = []
        for fn, digest in data.get("done", {}).items():
            p = os.path.join(os.path.dirname(self.path), fn)
            if os.path.exists(p) and file_sha256(p) == digest:
                self.done[fn] = digest
            else:
                dropped.append(fn)
        return dropped

    def record(self, fn: str, digest: str) -> None:
        self.done[fn] = digest
        write_json_atomic(self.path, {"fingerprint": self.fingerprint, "done": self.done})


class ShardWriter:
    """Writes the planned shards into ``tmpdir``; ``add`` must follow the plan's tensor order."""

    def __init__(self, tmpdir: str, plan, journal: Journal):
        self.tmpdir = tmpdir
        self.plan = plan
        self.journal = journal
        self.n = plan.n_shards
        self.by_shard = [plan.shard_tasks(i) for i in range(self.n)]
        self.cur: Optional[int] = None
        self.f = None
        self.pos = 0
        self.hash = None
        self.bytes_written = 0

    def is_done(self, shard: int) -> bool:
        return shard_name(shard, self.n) in self.journal.done

    def _open(self, shard: int) -> None:
        tasks = self.by_shard[shard]
        header, _ = plan_header([(t.name, t.out_dtype, tuple(t.shape)) for t in tasks])
        self.partial = os.path.join(self.tmpdir, shard_name(shard, self.n) + ".partial")
        self.f = self._io(lambda: open(self.partial, "wb"))
        self.hash = hashlib.sha256(header)
        self._io(lambda: self.f.write(header))
        self.cur, self.pos = shard, 0

    def _io(self, fn):
        try:
            return fn()
        except OSError as exc:
            raise write_failed(getattr(self, "partial", self.tmpdir), exc) from None

    def add(self, task, tensor: torch.Tensor) -> None:
        if self.cur != task.shard:
            self._open(task.shard)
        expect = self.by_shard[task.shard][self.pos]
        if expect.name != task.name or tensor.dtype != task.out_dtype or tuple(tensor.shape) != tuple(task.shape):
            raise RuntimeError(f"internal error: got {task.name} {tensor.dtype} {tuple(tensor.shape)}, "
                               f"planned {expect.name} {task.out_dtype} {tuple(task.shape)}")
        data = tensor_bytes(tensor)
        self._io(lambda: self.f.write(data))
        self.hash.update(data)
        self.bytes_written += len(data)
        self.pos += 1
        if self.pos == len(self.by_shard[task.shard]):
            self._finish()

    def _finish(self) -> None:
        fn = shard_name(self.cur, self.n)

        def close():
            self.f.flush()
            os.fsync(self.f.fileno())
            self.f.close()
            os.replace(self.partial, os.path.join(self.tmpdir, fn))
            self.journal.record(fn, self.hash.hexdigest())

        self._io(close)
        self.f, self.cur = None, None
        if _COMMIT_DELAY_S:  # lets interruption tests stop a merge between shards deterministically
            time.sleep(_COMMIT_DELAY_S)

    def abort(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None

    def write_index(self) -> None:
        total = sum(t.out_bytes for t in self.plan.tasks)
        wm = {t.name: shard_name(t.shard, self.n) for t in self.plan.tasks}
        self._io(lambda: write_json_atomic(os.path.join(self.tmpdir, INDEX),
                                           {"metadata": {"total_size": total}, "weight_map": wm}))
