"""The output folder: safety checks, the temporary folder next to it, side files, final rename.

Everything is written into ``.<name>.dppa-partial`` beside the output and renamed into place only
when complete, so a failed or interrupted merge never leaves a half-written output.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Optional, Sequence

from .errors import MergeError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "vocab.txt")
REPORT = "merge_report.json"


def tmp_path(out: str) -> str:
    return os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.dppa-partial")


def _inside(a: str, b: str) -> bool:
    """Whether path a is b or inside b."""
    a, b = os.path.realpath(a), os.path.realpath(b)
    return a == b or a.startswith(b.rstrip(os.sep) + os.sep)


def check_output(out: str, inputs: Sequence[tuple[str, str]], *, force: bool, resume: bool) -> tuple[str, bool]:
    """(temp folder, whether to resume from it). ``inputs`` are (label, path) of every model."""
    out = os.path.abspath(os.path.expanduser(out))
    for label, path in inputs:
        if _inside(out, path) or _inside(path, out):
            raise MergeError(f"output {out} overlaps input model {label!r} ({path}); choose another output folder")
    if os.path.exists(out) and not os.path.isdir(out):
        raise MergeError(f"output {out} exists and is not a folder")
    tmp = tmp_path(out)
    non_empty = os.path.isdir(out) and bool(os.listdir(out))
    if force and resume:
        raise MergeError("--force and --resume exclude each other: --force starts over, --resume continues")
    if non_empty and not (force or resume):
        raise MergeError(f"output {out} is not empty; pass --force to replace it or --resume to continue a merge")
    if non_empty and resume and not os.path.exists(os.path.join(out, REPORT)) and not os.path.isdir(tmp):
        raise MergeError(f"output {out} is not empty and holds no dppa merge to resume; use --force to replace it")
    if os.path.isdir(tmp) and not (force or resume):
        raise MergeError(f"an interrupted merge into {out} was found ({tmp}); pass --resume to continue it or "
                         f"--force to start over")
    if force and os.path.isdir(tmp):
        shutil.rmtree(tmp)
    parent = os.path.dirname(out)
    try:
        os.makedirs(parent, exist_ok=True)
        resuming = resume and os.path.isdir(tmp)
        os.makedirs(tmp, exist_ok=True)
    except OSError as exc:
        raise MergeError(f"cannot create {tmp}: {exc.strerror}") from None
    for fn in os.listdir(tmp):  # a shard that was being written when the process died
        if fn.endswith(".partial") or fn.endswith(".tmp"):
            os.remove(os.path.join(tmp, fn))
    return tmp, resuming


def copy_side_files(tmp: str, base_path: str, tokenizer_path: Optional[str], out_dtype_name: Optional[str]) -> list:
    """config.json (dtype updated), generation_config.json and tokenizer files; returns names copied."""
    copied = []
    cfg = os.path.join(base_path, "config.json")
    if os.path.exists(cfg):
        with open(cfg) as f:
            data = json.load(f)
        if out_dtype_name:
            data["torch_dtype"] = out_dtype_name
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
        copied.append("config.json")
    srcs = [(base_path, ("generation_config.json",))]
    if tokenizer_path:
        srcs.append((tokenizer_path, TOKENIZER_FILES))
    for src, names in srcs:
        for fn in names:
            p = os.path.join(src, fn)
            if os.path.isfile(p):
                shutil.copyfile(p, os.path.join(tmp, fn))
                copied.append(fn)
    return copied


def finalize(tmp: str, out: str, drop: Sequence[str]) -> None:
    """Move the finished temp folder into place (replacing an old output only now)."""
    out = os.path.abspath(os.path.expanduser(out))
    for fn in drop:
        p = os.path.join(tmp, fn)
        if os.path.exists(p):
            os.remove(p)
    old = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.dppa-old")
    if os.path.exists(old):
        shutil.rmtree(old)
    if os.path.exists(out):
        os.replace(out, old)
    os.replace(tmp, out)
    if os.path.exists(old):
        shutil.rmtree(old, ignore_errors=True)


def discard(tmp: str) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
