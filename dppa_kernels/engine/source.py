"""A local Hugging Face model folder opened read-only: tensor names, shapes, dtypes, and reads.

Layouts: ``model.safetensors.index.json`` + shards, or one ``model.safetensors``. Pickle
checkpoints (``pytorch_model*.bin``) are refused unless ``allow_pickle`` (they can run code),
and even then only where torch loads them safely (:func:`pickle_refusal`).
"""

from __future__ import annotations

import json
import os
import posixpath
from typing import Optional

import torch

from .errors import MergeError, brief, clip
from .st_format import TensorInfo, content_digest, map_tensor, read_header, read_tensor

ST_INDEX, ST_SINGLE = "model.safetensors.index.json", "model.safetensors"
PT_INDEX, PT_SINGLE = "pytorch_model.bin.index.json", "pytorch_model.bin"
# torch < 2.6 runs code from a crafted pickle even with weights_only=True (CVE-2025-32434)
PICKLE_MIN_TORCH = "2.6"
_TORCH_TRUE = ("1", "y", "yes", "true")  # torch.serialization's reading of its switches


def pickle_refusal() -> Optional[str]:
    """Why pickle checkpoints cannot be loaded safely in this process (None: they can)."""
    from torch.torch_version import TorchVersion

    if TorchVersion(torch.__version__) < PICKLE_MIN_TORCH:
        return (f"torch {torch.__version__} can run code from a pickle checkpoint even with weights_only "
                f"(CVE-2025-32434); loading pickle checkpoints needs torch >= {PICKLE_MIN_TORCH}")
    if os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "0").lower() in _TORCH_TRUE:
        return ("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set, so torch.load would unpickle arbitrary objects; "
                "unset it to load pickle checkpoints")
    return None


def check_shard_name(label: str, index: str, fn) -> None:
    """A shard named by an index must be a relative path inside the model folder."""
    parts = fn.replace("\\", "/").split("/") if isinstance(fn, str) else None
    if not parts or not fn or posixpath.isabs(fn) or os.path.isabs(fn) or ".." in parts:
        raise MergeError(f"model {brief(label)}: {index} names shard {brief(fn)}: shard paths must be relative "
                         f"paths inside the model folder (no absolute path, no '..')")


def find_weights(path: str, label: str) -> tuple[list, bool, dict]:
    """(weight files, whether they are pickles, the index's weight_map or {}) of a model folder."""
    for index, single, is_pickle in ((ST_INDEX, ST_SINGLE, False), (PT_INDEX, PT_SINGLE, True)):
        idx = read_json(path, index, label)
        if idx is not None:
            wm = idx.get("weight_map") if isinstance(idx, dict) else None
            if not isinstance(wm, dict) or not wm:
                raise MergeError(f"model {brief(label)}: {index} has no weight_map")
            for fn in wm.values():
                check_shard_name(label, index, fn)
            files = sorted(set(wm.values()))
            for fn in files:
                if not os.path.isfile(os.path.join(path, fn)):
                    raise MergeError(f"model {brief(label)}: shard {brief(fn)} listed in {index} is missing")
            return files, is_pickle, dict(wm)
        if os.path.isfile(os.path.join(path, single)):
            return [single], is_pickle, {}
    raise MergeError(f"model {brief(label)}: no {ST_INDEX}, {ST_SINGLE}, {PT_INDEX} or {PT_SINGLE} "
                     f"in {clip(path)}")


def inside(a: str, b: str) -> bool:
    """Whether path a is b or inside b (symbolic links resolved)."""
    a, b = os.path.realpath(a), os.path.realpath(b)
    return a == b or a.startswith(b.rstrip(os.sep) + os.sep)


def _model_root(folder: str) -> str:
    """The folder a model's files may link into: the model folder, or for a Hugging Face cache
    snapshot (``<repo>/snapshots/<rev>``, files linking to ``<repo>/blobs``) the repository folder."""
    real = os.path.realpath(folder)
    snapshots = os.path.dirname(real)
    repo = os.path.dirname(snapshots)
    if os.path.basename(snapshots) == "snapshots" and os.path.isdir(os.path.join(repo, "blobs")):
        return repo
    return real


def model_file(folder: str, fn: str) -> Optional[str]:
    """The real path of file ``fn`` of a model folder; None when absent or not a regular file.
    A symbolic link that leaves the model folder (``tokenizer.model -> /etc/shadow``) is refused:
    its target would be read, or copied into the output as an ordinary file."""
    p = os.path.join(folder, fn)
    if not os.path.lexists(p):
        return None
    real = os.path.realpath(p)
    if not inside(real, _model_root(folder)):
        raise MergeError(f"{clip(p)} is a symbolic link to {clip(real)}, outside the model folder; refused (files "
                         f"are read and copied only from inside the model folder: replace the link by the file)")
    return real if os.path.isfile(real) else None


def read_json(folder: str, fn: str, label: str):
    """A JSON file of a model folder (None when absent)."""
    p = model_file(folder, fn)
    if p is None:
        return None
    try:
        with open(p, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as exc:  # ValueError: JSON and UTF-8 errors, which name no content
        raise MergeError(f"model {brief(label)}: cannot parse {clip(p)}: {clip(exc)}") from None


def pickle_error(label: str, files: list, allow: bool) -> Optional[str]:
    """The refusal for a pickle-only model (None when allowed and safe to load)."""
    if not allow:
        return (f"model {brief(label)}: only pickle checkpoints ({clip(', '.join(files))}) found; pickle files "
                f"can execute code when loaded: convert to safetensors or pass --allow-pickle if you trust them")
    why = pickle_refusal()
    return f"model {brief(label)}: {why}" if why else None


class ModelSource:
    """One input model. ``label`` names it in every error (its path as written in the config)."""

    def __init__(self, path: str, label: Optional[str] = None, *, allow_pickle: bool = False):
        self.label = label or path
        self.path = os.path.abspath(os.path.expanduser(path))
        if not os.path.isdir(self.path):
            what = "is not a folder" if os.path.exists(self.path) else "does not exist"
            raise MergeError(f"model {brief(self.label)}: path {clip(self.path)} {what} (only local model folders are "
                             f"supported)")
        self._files: dict[str, object] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self._pt_cache: dict[str, dict] = {}
        files, self.pickle, _ = find_weights(self.path, self.label)
        if self.pickle:
            refusal = pickle_error(self.label, files, allow_pickle)
            if refusal:
                raise MergeError(refusal)
            self._open_pickle(files)
        else:
            for fn in files:
                for name, info in read_header(os.path.join(self.path, fn)).items():
                    if name in self.tensors:
                        raise MergeError(f"model {brief(self.label)}: tensor {brief(name)} appears in both "
                                         f"{os.path.basename(self.tensors[name].file)} and {clip(fn)}")
                    self.tensors[name] = info
        if not self.tensors:
            raise MergeError(f"model {brief(self.label)}: no tensors found in {clip(self.path)}")
        self.config = read_json(self.path, "config.json", self.label)
        if self.config is not None and not isinstance(self.config, dict):
            raise MergeError(f"model {brief(self.label)}: config.json is not a JSON object")

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
                raise MergeError(f"model {brief(self.label)}: cannot load pickle checkpoint {clip(p)}: "
                                 f"{clip(exc)}") from None
        return self._pt_cache[fn]

    def files(self) -> list[str]:
        return sorted({i.file for i in self.tensors.values()})

    def read(self, name: str, *, pin: bool = False, mapped: bool = False) -> torch.Tensor:
        """A CPU tensor with the bytes of ``name``: a fresh (pinned if ``pin``) copy, or with
        ``mapped`` a private map of the file's bytes (no copy; writes never reach the file)."""
        info = self.tensors.get(name)
        if info is None:
            raise MergeError(f"model {brief(self.label)}: tensor {brief(name)} is missing")
        if self.pickle:
            t = self._load_pickle(os.path.basename(info.file))[name]
            out = torch.empty(t.shape, dtype=t.dtype, pin_memory=pin)
            return out.copy_(t)
        f = self._files.get(info.file)
        if f is None:
            try:
                f = self._files[info.file] = open(info.file, "rb")
            except OSError as exc:
                raise MergeError(f"model {brief(self.label)}: cannot open {clip(info.file)}: {exc.strerror}") from None
        try:
            if mapped and not pin:
                return map_tensor(f, info)
            return read_tensor(f, info, pin=pin)
        except (OSError, ValueError) as exc:  # ValueError: mmap of a file that shrank
            raise MergeError(f"model {brief(self.label)}: reading tensor {brief(name)} from {clip(info.file)} "
                             f"failed: {clip(getattr(exc, 'strerror', None) or exc)}") from None

    def __getstate__(self) -> dict:
        """Picklable (a worker of a distributed executor reopens the files on its first read)."""
        state = dict(self.__dict__)
        state["_files"], state["_pt_cache"] = {}, {}
        return state

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
        self._pt_cache.clear()

    def fingerprint(self) -> list:
        """Paths and content digests of the weight files: a resume must see the same inputs
        (the same bytes, whatever their modification times)."""
        return [[p, content_digest(p)] for p in self.files()]
