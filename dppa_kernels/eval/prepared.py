"""What an evaluator prepares from its files once and reuses on every later call.

A search calls one evaluator on many candidates with the same data file and tokenizer. The
tokenizer loaded from a folder, the parsed data file and its padded token batches are built on
the first call and reused while the files (path, size and modification time) and the settings are
unchanged, so a candidate costs only the model's forward passes. The cache holds the last few
entries (least recently used dropped first).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

T = TypeVar("T")
MAX_ENTRIES = 8
_cache: "OrderedDict[tuple, tuple]" = OrderedDict()


def data_file(data: Any) -> Path:
    """``data`` as a path to an existing file, else a ValueError naming it."""
    path = Path(data)
    if not path.is_file():
        raise ValueError(f"data file {str(path)[:200]!r} does not exist")
    return path


def file_version(path: Path) -> tuple:
    """(resolved path, modification time, size): changes when the file is rewritten."""
    st = path.stat()
    return str(path.resolve()), st.st_mtime_ns, st.st_size


def folder_version(path: Path) -> tuple:
    """The folder's resolved path and the version of each file directly in it."""
    with os.scandir(path) as it:
        files = sorted((e.name, e.stat().st_mtime_ns, e.stat().st_size) for e in it if e.is_file())
    return (str(path.resolve()), *files)


def cached(key: tuple, build: Callable[[], T], pin: Optional[object] = None) -> T:
    """``build()``'s value for ``key``, built on the first call. ``pin``: an object the value
    depends on (a tokenizer object): the entry is reused only for that same object, and holding
    it keeps its ``id`` (part of the caller's key) from being reused."""
    hit = _cache.get(key)
    if hit is not None and hit[0] is pin:
        _cache.move_to_end(key)
        return hit[1]
    value = build()
    _cache[key] = (pin, value)
    _cache.move_to_end(key)
    while len(_cache) > MAX_ENTRIES:
        _cache.popitem(last=False)
    return value


def clear() -> None:
    """Drop every prepared entry."""
    _cache.clear()


def load_tokenizer(folder: Path):
    """``AutoTokenizer.from_pretrained(folder)``, loaded once per version of the folder."""
    def build():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder))
    return cached(("tokenizer", folder_version(folder)), build)
