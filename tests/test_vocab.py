"""The shared vocabulary: the extensions' codes match Python's (or the loader refuses them), one
partition geometry, and the limits of the compiled code refused at the public boundary."""

from types import SimpleNamespace

import pytest
import torch
from helpers import realistic_delta

import dppa_kernels as dk
from dppa_kernels import vocab
from dppa_kernels._C import Extension, checked_vocab, cpu_extension
from dppa_kernels.backends.registry import availability
from dppa_kernels.plans import _partition_lengths
from dppa_kernels.reference.threshold import partition_view


def test_cpu_extension_exports_the_python_codes():
    ext = cpu_extension()
    if not ext.available:
        # DPPA_SKIP_CPP_BUILD=1 installs: nothing compiled to compare (CI builds it and requires it)
        pytest.skip(f"CPU extension unavailable: {ext.reason}")
    assert ext.module.VOCAB == vocab.extension_vocab()


@pytest.mark.parametrize("change", [
    lambda v: v["dtype"].update(float32=0),  # the old CUDA numbering
    lambda v: v["elect"].update(count=3, frequency=1),
    lambda v: v.update(MAX_BANDS=16),
    lambda v: v.pop("HIST_BINS"),
])
def test_loader_refuses_an_extension_with_other_codes(change):
    exported = vocab.extension_vocab()
    change(exported)
    got = checked_vocab(Extension("_fake", SimpleNamespace(VOCAB=exported), ""))
    assert not got.available and "differ from dppa_kernels.vocab" in got.reason
    assert not checked_vocab(Extension("_fake", SimpleNamespace(), "")).available  # no VOCAB at all
    ok = checked_vocab(Extension("_fake", SimpleNamespace(VOCAB=vocab.extension_vocab()), ""))
    assert ok.available


@pytest.mark.parametrize("shape,partition,block_size,want", [
    ((5, 7), "tensor", None, (35, 1)),
    ((0,), "tensor", None, (0, 1)),
    ((), "row", None, (1, 1)),
    ((4, 0), "row", None, (0, 0)),
    ((3, 2, 9), "row", None, (9, 6)),
    ((100,), "block", 33, (33, 4)),
    ((99,), "block", 33, (33, 3)),
    ((0, 5), "block", 7, (7, 0)),
])
def test_partition_geometry(shape, partition, block_size, want):
    assert vocab.partition_geometry(shape, partition, block_size) == want
    x = torch.zeros(shape)
    lengths = _partition_lengths(x, partition, block_size)
    spans = partition_view(x.reshape(-1), shape, partition, block_size)
    assert lengths.tolist() == [n for _, n in spans]
    assert len(spans) == want[1] and sum(n for _, n in spans) == x.numel()


@pytest.mark.parametrize("partition,block_size", [("rows", None), ("block", None), ("block", 0), ("block", True),
                                                  ("block", 2.0)])
def test_partition_geometry_refuses(partition, block_size):
    with pytest.raises(ValueError, match="partition|block_size"):
        vocab.partition_geometry((4, 4), partition, block_size)


def _backends():
    return ["reference"] + [b for b in ("torch", "cpu") if availability()[b][0]]


@pytest.mark.parametrize("backend", _backends())
def test_band_limit_checked_at_the_boundary(backend):
    """MAX_BANDS bands work on every backend; one more is a ValueError everywhere (the compiled
    CPU pass holds at most MAX_BANDS levels)."""
    x = realistic_delta((33, 65), torch.bfloat16, sigma=2e-3)
    m = vocab.MAX_BANDS
    dens = [0.05 * (j + 1) for j in range(m)]
    alphas = [2.0 - 0.1 * j for j in range(m)]
    got = dk.prune(x, "bands", densities=dens, alphas=alphas, backend=backend)
    assert torch.equal(got, dk.prune(x, "bands", densities=dens, alphas=alphas, backend="reference"))
    with pytest.raises(ValueError, match=f"densities has {m + 1} bands; at most {m}"):
        dk.prune(x, "bands", densities=dens + [0.9], alphas=alphas + [1.0], backend=backend)
    base, deltas = torch.zeros(33, 65, dtype=torch.bfloat16), [x, x]
    with pytest.raises(ValueError, match=f"at most {m}"):
        dk.merge_deltas(deltas, base, method="dppa", densities=dens + [0.9], alphas=alphas + [1.0], backend=backend)


def test_key_mode_codes():
    assert vocab.key_mode(torch.bfloat16, None) == (vocab.KEY_MODE_CODES["native16"], 15)
    assert vocab.key_mode(torch.float16, torch.float32) == (vocab.KEY_MODE_CODES["f32"], 31)
    assert vocab.key_mode(torch.float32, torch.bfloat16) == (vocab.KEY_MODE_CODES["bf16"], 15)
    assert vocab.key_mode(torch.bfloat16, torch.float16) == (vocab.KEY_MODE_CODES["f16"], 15)
    with pytest.raises(TypeError, match="key_dtype"):
        vocab.key_mode(torch.float32, torch.float64)
    with pytest.raises(TypeError, match="dtype must be"):
        vocab.dtype_code(torch.float64)
