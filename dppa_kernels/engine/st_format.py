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
import hashlib
import json
import mmap
import os
import struct
import sys
import warnings
from dataclasses import dataclass
from typing import BinaryIO, Sequence

import torch

from .errors import MergeError, brief, clip

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


class _Duplicate(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _no_duplicates(pairs: list) -> dict:
    out = {}
    for k, v in pairs:
        if k in out:
            raise _Duplicate(k)
        out[k] = v
    return out


def _header_length(f: BinaryIO, path: str, size: int) -> int:
    """The header's byte length; never echoes the file's bytes (it may be any file)."""
    raw = f.read(8)
    if len(raw) < 8:
        raise MergeError(f"{clip(path)}: not a safetensors file ({size} bytes, too short for a header)")
    (n,) = struct.unpack("<Q", raw)
    if n > MAX_HEADER or 8 + n > size:
        raise MergeError(f"{clip(path)}: not a safetensors file, or a corrupt or truncated one (its header "
                         f"length field does not fit the file's {size} bytes)")
    return n


def _parse_header(path: str, raw: bytes) -> dict:
    if not raw.startswith(b"{"):
        raise MergeError(f"{clip(path)}: not a safetensors file, or a corrupt one (the header is not a JSON object)")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except _Duplicate as exc:
        raise MergeError(f"{clip(path)}: corrupt safetensors header: key {brief(exc.key)} appears twice") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise MergeError(f"{clip(path)}: not a safetensors file, or a corrupt one (the header is not UTF-8 "
                         f"JSON)") from None
    if not isinstance(header, dict):
        raise MergeError(f"{clip(path)}: corrupt safetensors header (not a JSON object)")
    return header


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _entry(path: str, name: str, meta, start: int) -> TensorInfo:
    """One tensor's header entry, every field checked (as strictly as the safetensors library)."""
    where = f"{clip(path)}: tensor {brief(name)}"
    if not isinstance(meta, dict) or not {"dtype", "shape", "data_offsets"} <= set(meta):
        raise MergeError(f"{where}: header entry {brief(meta)} needs dtype, shape and data_offsets")
    dtype = DTYPES.get(meta["dtype"]) if isinstance(meta["dtype"], str) else None
    if dtype is None:
        raise MergeError(f"{where}: unknown or unsupported dtype {brief(meta['dtype'])} "
                         f"(supported: {', '.join(DTYPES)})")
    shape = meta["shape"]
    if not isinstance(shape, list) or not all(_count(s) for s in shape):
        raise MergeError(f"{where}: shape {brief(shape)} is not a list of non-negative integers")
    offs = meta["data_offsets"]
    if not isinstance(offs, list) or len(offs) != 2 or not all(_count(x) for x in offs) or offs[0] > offs[1]:
        raise MergeError(f"{where}: data_offsets {brief(offs)} is not a [begin, end] pair of byte offsets "
                         f"with 0 <= begin <= end")
    info = TensorInfo(name, path, dtype, tuple(shape), start + offs[0], start + offs[1])
    want = info.numel * torch.empty((), dtype=dtype).element_size()
    if offs[1] - offs[0] != want:
        raise MergeError(f"{where}: data_offsets {offs} hold {offs[1] - offs[0]} bytes, but shape "
                         f"{brief(shape)} {meta['dtype']} needs {want}")
    return info


def _check_layout(path: str, infos: list, start: int, size: int) -> None:
    """The tensors' bytes must tile the data section exactly: contiguous, no overlap, no gap,
    nothing after the last tensor (safetensors' own rule)."""
    pos = start
    prev = None
    for info in sorted(infos, key=lambda i: (i.begin, i.end)):
        if info.end > size:
            raise MergeError(f"{clip(path)}: truncated shard: tensor {brief(info.name)} ends at byte {info.end}, "
                             f"file has {size} bytes")
        if info.begin != pos:
            what = (f"overlaps tensor {brief(prev.name)}" if info.begin < pos and prev is not None
                    else f"starts {info.begin - pos} bytes after the previous tensor's end")
            raise MergeError(f"{clip(path)}: corrupt safetensors header: the data of tensor {brief(info.name)} "
                             f"{what} (data_offsets must be contiguous)")
        pos, prev = info.end, info
    if pos != size:
        raise MergeError(f"{clip(path)}: corrupt safetensors file: {size - pos} bytes after the last tensor are "
                         f"not described by the header")


def read_header(path: str) -> dict[str, TensorInfo]:
    """Parse and check a safetensors header: every field valid, the tensors' bytes tiling the
    data section exactly. Errors name the file and the tensor, never the file's raw bytes."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            n = _header_length(f, path, size)
            raw = f.read(n)
    except OSError as exc:
        raise MergeError(f"{clip(path)}: cannot read ({exc.strerror or exc})") from None
    header = _parse_header(path, raw)
    start = 8 + n
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise MergeError(f"{clip(path)}: corrupt safetensors header: __metadata__ must map names to strings")
    out = {name: _entry(path, name, m, start) for name, m in header.items()}
    _check_layout(path, list(out.values()), start, size)
    return out


def content_digest(path: str, blocks: int = 16, block: int = 4096) -> str:
    """A cheap content fingerprint of a weight file: its size, its safetensors header (or first
    64 KiB) and ``blocks`` blocks sampled evenly across the rest. Reads a few dozen KiB, however
    large the file; unlike a modification time it survives ``touch`` and copies."""
    h = hashlib.sha256()
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8).ljust(8, b"\0"))
            head = 8 + n if n <= MAX_HEADER and 8 + n <= size else min(size, 1 << 16)
            f.seek(0)
            h.update(str(size).encode() + b"|" + f.read(head))
            span = max(size - head - block, 0)
            for i in range(blocks):
                f.seek(head + span * i // max(blocks - 1, 1))
                h.update(f.read(block))
    except OSError as exc:
        raise MergeError(f"{clip(path)}: cannot read ({exc.strerror or exc})") from None
    return h.hexdigest()


def _check_still_there(f: BinaryIO, info: TensorInfo) -> None:
    """A shard cut short after its header was read (another process rewriting it) must be an
    error here: mapping bytes past the end of a file fails, and touching them would be SIGBUS."""
    size = os.fstat(f.fileno()).st_size
    if size < info.end:
        raise MergeError(f"{clip(info.file)}: the file changed during the merge: tensor {brief(info.name)} ends at "
                         f"byte {info.end}, the file now has {size} bytes")


def read_tensor(f: BinaryIO, info: TensorInfo, *, pin: bool = False) -> torch.Tensor:
    """Read one tensor's bytes from an open file into a new (pinned when asked) CPU tensor."""
    t = torch.empty(info.shape, dtype=info.dtype, pin_memory=pin)
    nbytes = info.end - info.begin
    if nbytes:
        buf = t.view(-1).view(torch.uint8).numpy()
        f.seek(info.begin)
        got = f.readinto(memoryview(buf))
        if got != nbytes:
            _check_still_there(f, info)
            raise MergeError(f"{clip(info.file)}: short read of tensor {brief(info.name)} ({got} of {nbytes} bytes)")
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
    _check_still_there(f, info)
    start = info.begin - info.begin % mmap.ALLOCATIONGRANULARITY
    try:
        m = mmap.mmap(f.fileno(), info.end - start, access=mmap.ACCESS_COPY, offset=start)
    except ValueError:  # the file shrank between the check and the map
        _check_still_there(f, info)
        raise
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
