"""Prompt/answer pairs and their JSONL form (one ``{"prompt": ..., "answer": ...}`` object a line)."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Union

PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class Example:
    """One prompt and the answer a model should generate after it."""

    prompt: str
    answer: str


def write_jsonl(examples: Iterable[Example], path: PathLike) -> Path:
    """Write ``examples`` to ``path`` as JSONL (atomically: a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for ex in examples:
                f.write(json.dumps({"prompt": ex.prompt, "answer": ex.answer}, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def read_jsonl(path: PathLike) -> list[Example]:
    """Read prompt/answer pairs; a line that is not an object with string ``prompt`` and ``answer``
    raises ValueError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file {str(path)[:200]!r} does not exist")
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{i}: not valid JSON ({exc.msg}): {line.strip()[:80]!r}") from None
            if not isinstance(obj, dict) or not all(isinstance(obj.get(k), str) for k in ("prompt", "answer")):
                raise ValueError(f"{path}:{i}: expected an object with string fields 'prompt' and 'answer', "
                                 f"got {line.strip()[:80]!r}")
            out.append(Example(obj["prompt"], obj["answer"]))
    if not out:
        raise ValueError(f"data file {str(path)[:200]!r} holds no examples")
    return out
