"""The fallback of ``dppa-mergekit-yaml``: mergekit's own pipeline with our backend, under the
same safety rules as the fast path.

Left alone, mergekit writes into the output folder as it goes, unpickles ``.bin`` checkpoints,
copies side files through symbolic links and writes the NaNs it is given. Here it runs

* after the refusals that need no tensor: an output overlapping a referenced model folder (a
  tokenizer source included), side files of the donor model that link out of its folder;
* under the output folder's lock, into a staging folder beside it that is moved in only once
  complete (into an existing folder file by file, as mergekit writes into it);
* with guards on mergekit's loaders and writer: pickle checkpoints refused unless
  ``--allow-pickle`` (and then only where torch loads them safely), shard paths of an index kept
  inside the model folder, safetensors headers checked as the engine checks them, a merged
  tensor holding NaN/Inf refused.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from typing import Iterator

from ..engine.errors import MergeError, brief, clip, write_failed
from . import mergekit_layout as L


def _local_folders(config) -> list:
    """(label, path) of every local folder the config reads: models, LoRAs, tokenizer sources."""
    refs = list(config.referenced_models())
    for src in (config.tokenizer_source, getattr(config.tokenizer, "source", None)):
        if src is not None and not isinstance(src, str):
            refs.append(src)
    out = []
    for ref in refs:
        for part in (ref.model, ref.lora):
            path = getattr(part, "path", None)
            if isinstance(path, str) and os.path.isdir(path):
                out.append((path, os.path.abspath(path)))
    return out


def _check(config, out: str) -> None:
    """The refusals that need no tensor (nothing has been written yet)."""
    from ..engine.outdir import check_overlap, check_side_files

    check_overlap(out, _local_folders(config))
    donor = config.base_model or (config.referenced_models() or [None])[0]
    path = getattr(getattr(donor, "model", None), "path", None)
    if donor is not None and donor.lora is None and isinstance(path, str) and os.path.isdir(path):
        check_side_files([(path, L.TOKENIZER_COPY)])  # mergekit copies these files as they are


def _refuse_pickle(label: str, files: list, allow: bool) -> None:
    from ..engine.source import pickle_error

    refusal = pickle_error(label, files, allow)
    if refusal:
        raise MergeError(refusal)


@contextlib.contextmanager
def _guards(allow_pickle: bool) -> Iterator[None]:
    """mergekit's model index, shard loader and tensor writer, checked for the block."""
    import torch
    from mergekit.io.lazy_tensor_loader import ShardedTensorIndex
    from mergekit.io.loader import TensorLoader
    from mergekit.io.tensor_writer import TensorWriter

    from ..engine.source import find_weights
    from ..engine.st_format import read_header

    from_disk, from_file = ShardedTensorIndex.__dict__["from_disk"], ShardedTensorIndex.__dict__["from_file"]
    get, save = TensorLoader.__dict__["get"], TensorWriter.save_tensor

    def guarded_from_disk(cls, base_path: str):
        files, is_pickle, _ = find_weights(base_path, base_path)  # index shard paths checked here
        if is_pickle:
            _refuse_pickle(base_path, files, allow_pickle)
        for fn in [] if is_pickle else files:  # the engine's header checks: errors name file and tensor
            read_header(os.path.join(base_path, fn))
        return from_disk.__func__(cls, base_path)

    def guarded_from_file(cls, file_path: str):
        if not str(file_path).lower().endswith(".safetensors"):
            _refuse_pickle(file_path, [os.path.basename(file_path)], allow_pickle)
        return from_file.__func__(cls, file_path)

    def guarded_get(cls, shard_path: str, *args, **kwargs):
        if not str(shard_path).lower().endswith(".safetensors"):
            _refuse_pickle(shard_path, [os.path.basename(shard_path)], allow_pickle)
        return get.__func__(cls, shard_path, *args, **kwargs)

    def guarded_save(self, name: str, tensor, *args, **kwargs):
        # one fp32 reduction finds NaN/Inf (as the engine's delta check); the count only when it fires
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor.sum(dtype=torch.float32))):
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                raise MergeError(f"merged tensor {brief(name)} holds {bad} NaN/Inf value(s) (an input model "
                                 f"holds NaN/Inf); refused, nothing was written")
        return save(self, name, tensor, *args, **kwargs)

    ShardedTensorIndex.from_disk = classmethod(guarded_from_disk)
    ShardedTensorIndex.from_file = classmethod(guarded_from_file)
    TensorLoader.get = classmethod(guarded_get)
    TensorWriter.save_tensor = guarded_save
    try:
        yield
    finally:
        ShardedTensorIndex.from_disk, ShardedTensorIndex.from_file = from_disk, from_file
        TensorLoader.get, TensorWriter.save_tensor = get, save


def _load(config_file: str):
    """(mergekit's validated config, the YAML text); errors are one-line MergeErrors."""
    from mergekit.config import MergeConfiguration
    from pydantic import ValidationError

    from ..engine.config import read_yaml

    data, source = read_yaml(config_file)
    try:
        return MergeConfiguration.model_validate(data), source
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or "top level"
        raise MergeError(f"config {clip(config_file)}: {clip(loc)}: {clip(err['msg'])}") from None


def run_fallback(config_file: str, out_path: str, options, *, allow_pickle: bool = False) -> None:
    """mergekit's ``run_merge`` with our backend (DPPA pre-pass included), run safely (see above)."""
    from ..engine.outdir import output_lock, resolve_out
    from .mergekit import run_merge

    config, source = _load(config_file)
    out = resolve_out(out_path)
    _check(config, out)
    parent, name = os.path.split(out)
    staging = os.path.join(parent, f".{name}.dppa-fallback")
    staged = os.path.join(staging, name)  # same folder name: mergekit's model card names it
    with output_lock(out), _guards(allow_pickle):
        shutil.rmtree(staging, ignore_errors=True)
        try:
            run_merge(config, staged, options=options, config_source=source)
            try:
                L.move_into(staged, out)
            except OSError as exc:
                raise write_failed(exc.filename or out, exc) from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
