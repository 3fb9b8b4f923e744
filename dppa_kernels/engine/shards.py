"""Sharded safetensors output, streamed tensor by tensor, with a journal for ``--resume``.

Each shard's header is fixed by the plan, so a shard is written front to back as its tensors are
computed (never held in memory), then fsync-ed and renamed from ``*.partial``; the driver records
it with its SHA-256 (and its tensors' report rows) in ``journal.json``. A resumed run verifies
every recorded shard and redoes the rest, so its output is byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

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


@dataclass
class ShardResult:
    """One written output shard: its file name in the temporary folder, the SHA-256 of its bytes
    and the report rows of its tensors ({tensor: row}; empty when the report is off)."""

    file: str
    sha256: str
    tensors: dict = field(default_factory=dict)


class Journal:
    """Which shards of this exact merge (same fingerprint) are complete in the temp folder.

    Held by the driver: executors hand it each :class:`ShardResult` (``record``). With
    ``tmpdir=None`` it lives in memory only (a run that is never resumed)."""

    def __init__(self, tmpdir: Optional[str], fingerprint: str = ""):
        self.path = os.path.join(tmpdir, JOURNAL) if tmpdir else None
        self.fingerprint = fingerprint
        self.done: dict[str, str] = {}
        self.tensors: dict[str, dict] = {}  # shard file -> its tensors' report rows

    def load_verified(self) -> list[str]:
        """Keep recorded shards whose bytes still match; returns the names dropped."""
        if self.path is None or not os.path.exists(self.path):
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
        rows = data.get("tensors") if isinstance(data.get("tensors"), dict) else {}
        for fn, digest in data.get("done", {}).items():
            p = os.path.join(os.path.dirname(self.path), fn)
            if os.path.exists(p) and file_sha256(p) == digest:
                self.done[fn] = digest
                self.tensors[fn] = rows.get(fn) or {}
            else:
                dropped.append(fn)
        return dropped

    def record(self, result: ShardResult) -> None:
        self.done[result.file] = result.sha256
        self.tensors[result.file] = result.tensors
        if self.path is not None:
            write_json_atomic(self.path, {"fingerprint": self.fingerprint, "done": self.done,
                                          "tensors": self.tensors})

    def rows(self) -> dict:
        """{tensor: report row} of every recorded shard (this run's and a resumed run's)."""
        out: dict = {}
        for fn in self.done:
            out.update(self.tensors.get(fn) or {})
        return out


class ShardWriter:
    """Writes planned shards into ``tmpdir``, tensor by tensor in plan order; each finished shard
    is fsync-ed, renamed from ``*.partial`` and handed to ``on_done`` as a :class:`ShardResult`."""

    def __init__(self, tmpdir: str, names: Sequence[str], plan, on_done: Callable[[ShardResult], None]):
        self.tmpdir = tmpdir
        self.names = list(names)
        self.on_done = on_done
        self.by_shard = [plan.shard_tasks(i) for i in range(len(self.names))]
        self.cur: Optional[int] = None
        self.f = None
        self.pos = 0
        self.hash = None
        self.rows: dict = {}
        self.bytes_written = 0

    def _open(self, shard: int) -> None:
        tasks = self.by_shard[shard]
        header, _ = plan_header([(t.name, t.out_dtype, tuple(t.shape)) for t in tasks])
        self.partial = os.path.join(self.tmpdir, self.names[shard] + ".partial")
        self.f = self._io(lambda: open(self.partial, "wb"))
        self.hash = hashlib.sha256(header)
        self._io(lambda: self.f.write(header))
        self.cur, self.pos, self.rows = shard, 0, {}

    def _io(self, fn):
        try:
            return fn()
        except OSError as exc:
            raise write_failed(getattr(self, "partial", self.tmpdir), exc) from None

    def add(self, task, tensor: torch.Tensor, row: Optional[dict] = None) -> None:
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
        if row is not None:
            self.rows[task.name] = row
        self.pos += 1
        if self.pos == len(self.by_shard[task.shard]):
            self._finish()

    def _finish(self) -> None:
        fn = self.names[self.cur]

        def close():
            self.f.flush()
            os.fsync(self.f.fileno())
            self.f.close()
            os.replace(self.partial, os.path.join(self.tmpdir, fn))

        self._io(close)
        self.f, self.cur = None, None
        self.on_done(ShardResult(fn, self.hash.hexdigest(), self.rows))
        if _COMMIT_DELAY_S:  # lets interruption tests stop a merge between shards deterministically
            time.sleep(_COMMIT_DELAY_S)

    def abort(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None


def write_index(tmpdir: str, plan, names: Sequence[str]) -> None:
    """``model.safetensors.index.json`` of the engine's layout (every tensor, sorted keys)."""
    total = sum(t.out_bytes for t in plan.tasks)
    wm = {t.name: names[t.shard] for t in plan.tasks}
    write_json_atomic(os.path.join(tmpdir, INDEX), {"metadata": {"total_size": total}, "weight_map": wm})
