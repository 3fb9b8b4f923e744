"""Per-tensor reads of input shards (copied or privately mapped) and the delta workspace."""

from __future__ import annotations

import gc
import hashlib

import pytest
import torch
from safetensors.torch import save_file

from dppa_kernels.engine.source import ModelSource
from dppa_kernels.engine.st_format import read_header
from dppa_kernels.engine.workspace import Workspace

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.int64]


def _digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture
def model_dir(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {f"t{i}.{str(dt)[6:]}": (torch.randn(shape, generator=g) * 100).to(dt)
               for i, (dt, shape) in enumerate((dt, s) for dt in DTYPES for s in [(7, 13), (1,), (0, 4), (300, 257)])}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return tmp_path, tensors


def test_mapped_read_equals_copied_read_and_file(model_dir):
    root, tensors = model_dir
    src = ModelSource(str(root))
    for name, want in tensors.items():
        copied = src.read(name)
        mapped = src.read(name, mapped=True)
        assert mapped.dtype == want.dtype and mapped.shape == want.shape
        assert torch.equal(copied, want) and torch.equal(mapped, want), name
    src.close()


def test_mapped_tensor_is_private_and_outlives_its_source(model_dir):
    root, tensors = model_dir
    path = root / "model.safetensors"
    before = _digest(path)
    src = ModelSource(str(root))
    name = next(n for n in tensors if n.endswith("float32") and tensors[n].numel() > 1000)
    t = src.read(name, mapped=True)
    src.close()  # the file is closed; the map stays valid while the tensor lives
    t.mul_(0.0)  # a write changes this process's private pages only
    assert int(t.count_nonzero()) == 0
    assert _digest(path) == before
    assert torch.equal(ModelSource(str(root)).read(name, mapped=True), tensors[name])
    del t
    gc.collect()


def test_header_offsets_are_absolute(model_dir):
    root, tensors = model_dir
    infos = read_header(str(root / "model.safetensors"))
    assert set(infos) == set(tensors)
    assert all(i.end - i.begin == tensors[n].numel() * tensors[n].element_size() for n, i in infos.items())


def test_workspace_reuses_and_grows_buffers():
    ws = Workspace()
    a = ws.view(0, (4, 5), torch.bfloat16)
    a.fill_(1)
    b = ws.view(0, (2, 3), torch.float32)  # smaller: same buffer
    assert b.untyped_storage().data_ptr() == a.untyped_storage().data_ptr()
    c = ws.view(0, (100, 100), torch.float32)  # larger: grown
    assert c.shape == (100, 100) and c.dtype == torch.float32 and ws.owns(c)
    d = ws.view(1, (3,), torch.float16)
    assert d.untyped_storage().data_ptr() != c.untyped_storage().data_ptr() and ws.owns(d)
    assert not ws.owns(torch.empty(3))
    assert ws.view(2, (0, 7), torch.bfloat16).shape == (0, 7)
