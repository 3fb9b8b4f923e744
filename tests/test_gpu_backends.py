"""GPU-only properties of the ``cuda`` and ``triton`` backends on CUDA tensors: auto dispatch,
repeatable selects over many small partitions, 2^20-element blocks with every key dtype, and
threads on side streams. What every backend computes against the reference, GPU sizes included
(4096×4096 selects, 4 Mi-element histograms and DARE masks, 257×1031 merges), is in
tests/test_backend_parity.py.

Skipped on machines without a CUDA device. On a GPU machine (package installed with the
extension: ``pip install --no-build-isolation -e .`` with a CUDA build of torch):

    TRITON_INTERPRET=0 python -m pytest -q tests/test_gpu_backends.py tests/test_backend_parity.py
"""

import os
import threading

import pytest
import torch
from helpers import realistic_delta

import dppa_kernels as dk
from dppa_kernels.backends.registry import availability, get_backend, resolve

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: GPU backend tests skipped")
GPU_BACKENDS = ["cuda", "triton"]


@pytest.fixture(params=GPU_BACKENDS)
def backend(request):
    if request.param == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        # Interpreted Triton on CPU tensors is tested by test_triton_backend.py; here only the GPU.
        pytest.skip("TRITON_INTERPRET=1: run with TRITON_INTERPRET=0 to test Triton on the GPU")
    ok, why = availability()[request.param]
    if not ok:
        # No GPU (or extension) on this machine: these tests need a CUDA device by definition.
        pytest.skip(f"{request.param} backend not available: {why}")
    return request.param


def test_auto_dispatch_prefers_cuda_extension():
    name = resolve("auto", torch.device("cuda"))
    expect = "cuda" if availability()["cuda"][0] else ("triton" if availability()["triton"][0] else "torch")
    assert name == expect


def test_select_many_small_partitions_repeatable(backend):
    """172 961 blocks of 97, fp32 keys (six window passes in Triton): every repeat exact. The Triton
    window update once let a warp read the per-partition counts after another warp had reset them,
    which gave a wrong τ for a few partitions in some runs only."""
    x = realistic_delta((4096, 4096), torch.float32, sigma=1e-4)
    xc = x.cuda()
    for d in (0.2, 0.5, 0.9):
        k = dk.ops.keep_counts(dk.ops._partition_lengths(x, "block", 97), d, "floor")
        want = get_backend("torch").select(x, k, "block", 97, None)
        for rep in range(4):
            got = get_backend(backend).select(xc, k, "block", 97, None)
            for g, w, key in zip(got, want, ("tau_key", "c_above", "c_eq")):
                bad = g != w
                assert not bool(bad.any()), (key, d, rep, int(bad.sum()), bad.nonzero()[:5].reshape(-1).tolist())


@pytest.mark.parametrize("dtype,key_dtype", [(torch.float32, torch.bfloat16), (torch.float32, torch.float16),
                                             (torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16)], ids=str)
def test_select_key_dtype_and_big_blocks(backend, dtype, key_dtype):
    x = realistic_delta((3 * (1 << 20) + 5,), dtype, sigma=2e-3)  # 4 blocks of 2^20: grid-wide path per block
    for partition, bs in (("tensor", None), ("block", 1 << 20)):
        for d in (0.1, 0.7):
            k = dk.ops.keep_counts(dk.ops._partition_lengths(x, partition, bs), d, "floor")
            ref = get_backend("torch").select(x, k, partition, bs, key_dtype)
            got = get_backend(backend).select(x.cuda(), k, partition, bs, key_dtype)
            for g, r in zip(got, ref):
                assert torch.equal(g, r), (partition, d)


def test_threads_on_side_streams(backend):
    """mergekit drives GPUs from threads on side streams: results must not depend on it."""
    xs = [realistic_delta((1024, 1031), torch.bfloat16, sigma=1e-3, seed=s).cuda() for s in range(4)]
    want = [dk.prune(x, "magnitude", density=0.3, backend=backend) for x in xs]
    torch.cuda.synchronize()
    got, errors = [None] * len(xs), []

    def work(i):
        try:
            s = torch.cuda.Stream()
            with torch.cuda.stream(s):
                for _ in range(3):
                    got[i] = dk.prune(xs[i], "magnitude", density=0.3, backend=backend)
            s.synchronize()
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_forced_backend_names_reason_when_unavailable():
    for name in GPU_BACKENDS:
        ok, why = availability()[name]
        if not ok:
            with pytest.raises(RuntimeError, match=name):
                dk.prune(torch.ones(8, device="cuda"), "magnitude", density=0.5, backend=name)
