"""safetensors files read per tensor and written as streams.

Pages touched through a memory map count towards the process's RSS until the map is closed, so
mapping whole shards makes RSS grow with the model. Each tensor is therefore either read with
``readinto`` into a fresh (optionally pinned) buffer, or mapped on its own (``map_tensor``) and
unmapped as soon as its last user drops it: RSS stays bounded by the tensors in flight either way,
and the map skips a copy of every input byte and the page faults of a fresh buffer. The writer
streams tensors into a shard whose header is known in advance, so no shard is ever held in memory.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import struct
import sys
import warnings
from dataclasses import dataclass
from typing import BinaryIO, Iterable, Sequence

import torch

from .errors import MergeError

DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: str
    dtype: torch.dtype
    shape: tuple
    begin: int  # absolute byte offset in the file
    end: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def read_header(path: str) -> dict[str, TensorInfo]:
    """Parse and check a safetensors header: every tensor's bytes must lie inside the file."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise MergeError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER or 8 + n > size:
                raise MergeError(f"{path}: corrupt or truncated safetensors header (header length {n}, "
                                 f"file size {size})")
            header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MergeError(f"{path}: corrupt safetensors header ({exc})") from None
    except OSError as exc:
        raise MergeError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not isinstance(header, dict):
        raise MergeError(f"{path}: corrupt safetensors header (not a JSON object)")
    start = 8 + n
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[meta["dtype"]]
            shape = tuple(int(s) for s in meta["shape"])
            b, e = (int(x) for x in meta["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise MergeError(f"{path}: tensor {name!r} has an unsupported or corrupt header entry {meta!r}") from None
        info = TensorInfo(name, path, dtype, shape, start + b, start + e)
        want = info.numel * torch.empty((), dtype=dtype).element_size()
        if e - b != want or b < 0:
            raise MergeError(f"{path}: tensor {name!r} has {e - b} data bytes, expected {want} for "
                             f"shape {list(shape)} {meta['dtype']}")
        if start + e > size:
            raise MergeError(f"{path}: truncated shard: tensor {name!r} ends at byte {start + e}, "
                             f"file has {size} bytes")
        out[name] = info
    return out


def read_tensor(f: BinaryIO, info: TensorInfo, *, pin: bool = False) -> torch.Tensor:
    """Read one tensor's bytes from an open file into a new (pinned when asked) CPU tensor."""
    t = torch.empty(info.shape, dtype=info.dtype, pin_memory=pin)
    nbytes = info.end - info.begin
    if nbytes:
        buf = t.view(-1).view(torch.uint8).numpy()
        f.seek(info.begin)
        got = f.readinto(memoryview(buf))
        if got != nbytes:
            raise MergeError(f"{info.file}: short read of tensor {info.name!r} ({got} of {nbytes} bytes)")
    return t


_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux >= 5.14


def _libc_madvise():
    """libc's madvise through ctypes, which releases the GIL during the call (mmap.madvise does
    not, and populating a large map would stall the merging thread); None where unavailable."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


_madvise = _libc_madvise() if sys.platform.startswith("linux") else None


def _prefault(m: mmap.mmap) -> None:
    """Map the pages now, on the calling (reader) thread, instead of on first touch by the merge.

    ``MADV_POPULATE_READ`` fills the page tables from the page cache (reading the file if cold)
    without copying anything, even for a private writable map; where the kernel lacks it,
    ``MADV_WILLNEED`` at least starts the read-ahead.
    """
    if _madvise is not None:
        anchor = ctypes.c_char.from_buffer(m)  # the map's address (page-aligned: it starts the map)
        addr = ctypes.addressof(anchor)
        del anchor  # release the buffer export at once
        if _madvise(addr, len(m), _MADV_POPULATE_READ) == 0:
            return
    if hasattr(m, "madvise") and hasattr(mmap, "MADV_WILLNEED"):
        m.madvise(mmap.MADV_WILLNEED)


def map_tensor(f: BinaryIO, info: TensorInfo) -> torch.Tensor:
    """A CPU tensor over a private copy-on-write map of just this tensor's bytes.

    Private: a write (none is intended) would change only this process's pages, never the file.
    The map lives as long as the tensor (or any view of it) and is unmapped with it; its pages are
    mapped from the page cache here (``_prefault``), so the merge never takes their page faults.
    """
    nbytes = info.end - info.begin
    if nbytes == 0:
        return torch.empty(info.shape, dtype=info.dtype)
    start = info.begin - info.begin % mmap.ALLOCATIONGRANULARITY
    m = mmap.mmap(f.fileno(), info.end - start, access=mmap.ACCESS_COPY, offset=start)
    _prefault(m)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flat = torch.frombuffer(m, dtype=info.dtype, count=info.numel, offset=info.begin - start)
    return flat.view(info.shape)


def plan_header(entries: Sequence[tuple[str, torch.dtype, tuple]]) -> tuple[bytes, list[tuple[int, int]]]:
    """Header bytes (padded to 8) and data offsets for tensors written in the given order."""
    header, offsets, pos = {"__metadata__": {"format": "pt"}}, [], 0
    for name, dtype, shape in entries:
        n = 1
        for s in shape:
            n *= s
        size = n * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [pos, pos + size]}
        offsets.append((pos, pos + size))
        pos += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets


def tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().contiguous().cpu()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(-1).view(torch.uint8).numpy())


def write_all(f: BinaryIO, chunks: Iterable[memoryview]) -> None:
    for c in chunks:
        f.write(c)
