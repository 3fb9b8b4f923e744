"""A local Hugging Face model folder opened read-only: tensor names, shapes, dtypes, and reads.

Layouts: ``model.safetensors.index.json`` + shards, or one ``model.safetensors``. Pickle
checkpoints (``pytorch_model*.bin``) are refused unless ``allow_pickle`` (they can run code).
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch

from .errors import MergeError
from .st_format import TensorInfo, map_tensor, read_header, read_tensor

ST_INDEX, ST_SINGLE = "model.safetensors.index.json", "model.safetensors"
PT_INDEX, PT_SINGLE = "pytorch_model.bin.index.json", "pytorch_model.bin"


class ModelSource:
    """One input model. ``label`` names it in every error (its path as written in the config)."""

    def __init__(self, path: str, label: Optional[str] = None, *, allow_pickle: bool = False):
        self.label = label or path
        self.path = os.path.abspath(os.path.expanduser(path))
        if not os.path.isdir(self.path):
            what = "is not a folder" if os.path.exists(self.path) else "does not exist"
            raise MergeError(f"model {self.label!r}: path {self.path} {what} (only local model folders are supported)")
        self.pickle = False
        self._files: dict[str, object] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self._pt_map: dict[str, str] = {}
        self._pt_cache: dict[str, dict] = {}
        files = self._weight_files()
        if self.pickle:
            if not allow_pickle:
                raise MergeError(f"model {self.label!r}: only pickle checkpoints ({', '.join(files)}) found; "
                                 f"pickle files can execute code when loaded: convert to safetensors or "
                                 f"pass --allow-pickle if you trust them")
            self._open_pickle(files)
        else:
            for fn in files:
                for name, info in read_header(os.path.join(self.path, fn)).items():
                    if name in self.tensors:
                        raise MergeError(f"model {self.label!r}: tensor {name!r} appears in both "
                                         f"{os.path.basename(self.tensors[name].file)} and {fn}")
                    self.tensors[name] = info
        if not self.tensors:
            raise MergeError(f"model {self.label!r}: no tensors found in {self.path}")
        self.config = self._read_json("config.json")

    def _read_json(self, fn: str) -> Optional[dict]:
        p = os.path.join(self.path, fn)
        if not os.path.exists(p):
            return None
        try:
            with open(p) as f:
                return json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise MergeError(f"model {self.label!r}: cannot parse {p}: {exc}") from None

    def _weight_files(self) -> list[str]:
        for index, single, is_pickle in ((ST_INDEX, ST_SINGLE, False), (PT_INDEX, PT_SINGLE, True)):
            idx = self._read_json(index)
            if idx is not None:
                wm = idx.get("weight_map")
                if not isinstance(wm, dict) or not wm:
                    raise MergeError(f"model {self.label!r}: {index} has no weight_map")
                files = sorted(set(wm.values()))
                for fn in files:
                    if not os.path.isfile(os.path.join(self.path, fn)):
                        raise MergeError(f"model {self.label!r}: shard {fn} listed in {index} is missing")
                self.pickle = is_pickle
                self._pt_map = dict(wm) if is_pickle else {}
                return files
            if os.path.isfile(os.path.join(self.path, single)):
                self.pickle = is_pickle
                return [single]
        raise MergeError(f"model {self.label!r}: no {ST_INDEX}, {ST_SINGLE}, {PT_INDEX} or {PT_SINGLE} "
                         f"in {self.path}")

    def _open_pickle(self, files: list[str]) -> None:
        for fn in files:
            sd = self._load_pickle(fn)
            for name, t in sd.items():
                self.tensors[name] = TensorInfo(name, os.path.join(self.path, fn), t.dtype, tuple(t.shape), 0, 0)

    def _load_pickle(self, fn: str) -> dict:
        if fn not in self._pt_cache:
            p = os.path.join(self.path, fn)
            try:  # mmap keeps the tensors file-backed; weights_only refuses arbitrary objects
                self._pt_cache[fn] = torch.load(p, map_location="cpu", mmap=True, weights_only=True)
            except Exception as exc:
                raise MergeError(f"model {self.label!r}: cannot load pickle checkpoint {p}: {exc}") from None
        return self._pt_cache[fn]

    def files(self) -> list[str]:
        return sorted({i.file for i in self.tensors.values()})

    def read(self, name: str, *, pin: bool = False, mapped: bool = False) -> torch.Tensor:
        """A CPU tensor with the bytes of ``name``: a fresh (pinned if ``pin``) copy, or with
        ``mapped`` a private map of the file's bytes (no copy; writes never reach the file)."""
        info = self.tensors.get(name)
        if info is None:
            raise MergeError(f"model {self.label!r}: tensor {name!r} is missing")
        if self.pickle:
            t = self._load_pickle(os.path.basename(info.file))[name]
            out = torch.empty(t.shape, dtype=t.dtype, pin_memory=pin)
            return out.copy_(t)
        f = self._files.get(info.file)
        if f is None:
            try:
                f = self._files[info.file] = open(info.file, "rb")
            except OSError as exc:
                raise MergeError(f"model {self.label!r}: cannot open {info.file}: {exc.strerror}") from None
        try:
            if mapped and not pin:
                return map_tensor(f, info)
            return read_tensor(f, info, pin=pin)
        except OSError as exc:
            raise MergeError(f"model {self.label!r}: reading tensor {name!r} from {info.file} failed: "
                             f"{exc.strerror or exc}") from None

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
        self._pt_cache.clear()

    def fingerprint(self) -> list:
        """Paths, sizes and mtimes of the weight files: a resume must see the same inputs."""
        out = []
        for p in self.files():
            st = os.stat(p)
            out.append([p, st.st_size, st.st_mtime_ns])
        return out
