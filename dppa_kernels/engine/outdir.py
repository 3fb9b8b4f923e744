"""The output folder: safety checks, its lock, the temporary folder next to it, side files, final rename.

Everything is written into ``.<name>.dppa-partial`` beside the output and renamed into place only
when complete, so a failed or interrupted merge never leaves a half-written output. A symlinked
output folder is resolved first: the merge replaces the folder it points to and the link stays.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from typing import Iterator, Optional, Sequence

from .errors import MergeError, brief, clip, write_failed
from .source import inside, model_file

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "vocab.txt")
BASE_FILES = ("config.json", "generation_config.json")
REPORT = "merge_report.json"


def resolve_out(out: str) -> str:
    """The output folder's real path (a symlink to a folder is followed, never replaced)."""
    return os.path.realpath(os.path.expanduser(out))


def _beside(out: str, suffix: str) -> str:
    return os.path.join(os.path.dirname(out), f".{os.path.basename(out)}{suffix}")


def tmp_path(out: str) -> str:
    return _beside(out, ".dppa-partial")


@contextlib.contextmanager
def output_lock(out: str) -> Iterator[str]:
    """Hold an exclusive lock on ``out`` (a lock file beside it) for a whole run: a second merge
    into the same folder, from either CLI, fails at once instead of racing the first one's renames.
    The kernel drops the lock when the process dies, so a killed run never blocks the next."""
    out = resolve_out(out)
    path = _beside(out, ".dppa-lock")
    try:
        os.makedirs(os.path.dirname(out), exist_ok=True)
    except OSError as exc:
        raise MergeError(f"cannot create {clip(os.path.dirname(out))}: {exc.strerror or exc}") from None
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise MergeError(f"cannot create the lock file {clip(path)}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if isinstance(exc, BlockingIOError):
                raise MergeError(f"another merge into {clip(out)} is running (it holds {clip(path)}); wait for it "
                                 f"to finish or choose another output folder") from None
            raise MergeError(f"cannot lock {clip(path)}: {exc.strerror or exc}") from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed the file after we opened it: lock the new one
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # while still locked: nobody can hold the unlinked file afterwards
        os.close(fd)


def check_overlap(out: str, inputs: Sequence[tuple[str, str]]) -> None:
    """Refuse an output that is, contains or lies inside any input folder (label, path)."""
    for label, path in inputs:
        if inside(out, path) or inside(path, out):
            raise MergeError(f"output {clip(out)} overlaps input model {brief(label)} ({clip(path)}); choose "
                             f"another output folder")


def check_output(out: str, inputs: Sequence[tuple[str, str]], *, force: bool, resume: bool,
                 config: Optional[str] = None) -> tuple[str, bool]:
    """(temp folder, whether to resume from it). ``inputs`` are (label, path) of every folder read;
    ``config``: the config file, which must survive ``--force``. Call under :func:`output_lock`."""
    out = resolve_out(out)
    check_overlap(out, inputs)
    if config is not None and inside(config, out):
        raise MergeError(f"config {clip(config)} is inside the output folder {clip(out)}, which the merge "
                         f"replaces; move the config out of it")
    if os.path.exists(out) and not os.path.isdir(out):
        raise MergeError(f"output {clip(out)} exists and is not a folder")
    tmp = tmp_path(out)
    non_empty = os.path.isdir(out) and bool(os.listdir(out))
    if force and resume:
        raise MergeError("--force and --resume exclude each other: --force starts over, --resume continues")
    if non_empty and resume:
        what = "holds a finished merge" if os.path.exists(os.path.join(out, REPORT)) else "is not empty"
        raise MergeError(f"output {clip(out)} {what}; --resume only finishes an interrupted merge into an absent "
                         f"or empty folder and never replaces files (pass --force to start over and replace it)")
    if non_empty and not force:
        raise MergeError(f"output {clip(out)} is not empty; pass --force to replace it or --resume to continue a "
                         f"merge")
    if os.path.isdir(tmp) and not (force or resume):
        raise MergeError(f"an interrupted merge into {clip(out)} was found ({clip(tmp)}); pass --resume to continue "
                         f"it or --force to start over")
    resuming = resume and os.path.isdir(tmp)
    try:
        if force:
            _remove(tmp)
        os.makedirs(tmp, exist_ok=True)
    except OSError as exc:
        raise MergeError(f"cannot create {clip(tmp)}: {exc.strerror or exc}") from None
    return tmp, resuming


def drop_unfinished(tmp: str) -> None:
    """Remove the files that were being written when a previous run died (never journaled)."""
    for fn in os.listdir(tmp):
        if fn.endswith(".partial") or fn.endswith(".tmp"):
            os.remove(os.path.join(tmp, fn))


def side_sources(base_path: str, tokenizer_path: Optional[str]) -> list:
    """(folder, file names) of every side file copied into the output."""
    return [(base_path, BASE_FILES)] + ([(tokenizer_path, TOKENIZER_FILES)] if tokenizer_path else [])


def check_side_files(sources: list) -> None:
    """Refuse escaping symlinks among the side files before anything is merged."""
    for folder, names in sources:
        for fn in names:
            model_file(folder, fn)


def write_text(path: str, text: str) -> None:
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as exc:
        raise write_failed(path, exc) from None


def copy_side_files(tmp: str, base_path: str, tokenizer_path: Optional[str], out_dtype_name: Optional[str]) -> list:
    """config.json (dtype updated), generation_config.json and tokenizer files; returns names copied."""
    copied = []
    for src, names in side_sources(base_path, tokenizer_path):
        for fn in names:
            p = model_file(src, fn)
            if p is None:
                continue
            dst = os.path.join(tmp, fn)
            if fn == "config.json":
                try:
                    with open(p, encoding="utf-8") as f:
                        data = json.load(f)
                except (OSError, ValueError) as exc:
                    raise MergeError(f"cannot read {clip(p)}: {clip(exc)}") from None
                if out_dtype_name:
                    data["torch_dtype"] = out_dtype_name
                write_text(dst, json.dumps(data, indent=2, sort_keys=True))
            else:
                try:
                    shutil.copyfile(p, dst)
                except OSError as exc:
                    raise write_failed(dst, exc) from None
            copied.append(fn)
    return copied


def _remove(path: str) -> None:
    """Remove a file, a symlink (never what it points to) or a folder tree, if present."""
    if os.path.islink(path) or os.path.isfile(path):
        os.unlink(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)


def finalize(tmp: str, out: str, drop: Sequence[str]) -> None:
    """Move the finished temp folder into place (replacing an old output only now)."""
    out = resolve_out(out)
    old = _beside(out, ".dppa-old")
    try:
        for fn in drop:
            p = os.path.join(tmp, fn)
            if os.path.exists(p):
                os.remove(p)
        _remove(old)  # left by a run that died between the two renames below
        if os.path.lexists(out):
            os.replace(out, old)
        os.replace(tmp, out)
    except OSError as exc:
        raise write_failed(out, exc) from None
    with contextlib.suppress(OSError):
        _remove(old)


def discard(tmp: str) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
