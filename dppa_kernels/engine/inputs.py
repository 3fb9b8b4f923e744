"""The open_inputs stage: every model folder a config reads, opened and checked (headers only).

Nothing is written and no tensor is read here: weight files are found (pickles refused unless
allowed), every safetensors header is parsed and checked, config.json files are read, and the
models must share the base model's architecture (unless ``allow_crimes``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from .config import MergeConfig
from .errors import MergeError, brief, clip
from .plan import check_architectures
from .source import ModelSource


@dataclass
class Inputs:
    base: ModelSource
    models: list
    tokenizer: Optional[str]  # the folder tokenizer files are copied from (None: no copy)

    def folders(self) -> list:
        """(label, path) of every folder the merge reads (for the output-overlap check)."""
        out = [(s.label, s.path) for s in [self.base] + self.models]
        if self.tokenizer is not None and self.tokenizer != self.base.path:
            out.append(("tokenizer_source", self.tokenizer))
        return out

    def close(self) -> None:
        for s in [self.base] + self.models:
            s.close()

    def __enter__(self) -> "Inputs":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _tokenizer_folder(cfg: MergeConfig, base: str) -> str:
    if cfg.tokenizer_source in (None, "base"):
        return base
    tok = os.path.abspath(os.path.expanduser(cfg.tokenizer_source))
    if not os.path.isdir(tok):
        raise MergeError(f"tokenizer_source {brief(cfg.tokenizer_source)}: folder {clip(tok)} does not exist")
    return tok


def open_inputs(cfg: MergeConfig, *, allow_pickle: bool = False, allow_crimes: bool = False) -> Inputs:
    """Open the base model and every model of ``cfg``; MergeError names the first bad input."""
    if cfg.tokenizer_source == "union":
        raise MergeError("tokenizer_source: union is not supported (use base or a model path)")
    opened: list = []
    try:
        for ref in [cfg.base_model] + [m.model for m in cfg.models]:
            opened.append(ModelSource(ref, ref, allow_pickle=allow_pickle))
        inputs = Inputs(opened[0], opened[1:], _tokenizer_folder(cfg, opened[0].path))
        check_architectures(inputs.base, inputs.models, allow_crimes)
    except BaseException:
        for s in opened:
            s.close()
        raise
    return inputs
