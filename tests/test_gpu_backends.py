"""CUDA-tensor tests of the ``cuda`` and ``triton`` backends vs the in-package reference.

Skipped on machines without a CUDA device. On a GPU machine (package installed with the
extension: ``pip install --no-build-isolation -e .`` with a CUDA build of torch):

    TRITON_INTERPRET=0 python -m pytest -q tests/test_gpu_backends.py tests/test_triton_backend.py

Thresholds, counts and masks exact; merges byte-equal to the torch backend on the CPU (the one fp32
formula) and within one output ulp of the float64 reference except where fp32 and float64 elect
different TIES signs (`helpers.fp32_unsure_elections`); DARE masks bit-identical to the
CPU torch backend; real shapes (4096×4096) and the large-partition paths; threads on two streams.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (no effect on the cuda backend)

import threading  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import (DTYPE_IDS, DTYPES, assert_merge_close, family, fp32_unsure_elections,  # noqa: E402
                     quantised_delta, realistic_delta)

import dppa_kernels as dk  # noqa: E402
from dppa_kernels.backends.registry import availability, get_backend, resolve  # noqa: E402
from dppa_kernels.reference import rng  # noqa: E402
from dppa_kernels.reference.dppa import histogram_ref  # noqa: E402
from dppa_kernels.reference.threshold import magnitude_mask_ref, magnitude_threshold_ref  # noqa: E402

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


def _ulp_close(a, b, dtype):
    a, b = a.double().cpu(), b.double().cpu()
    scale = b.abs().max() if b.numel() else torch.tensor(0.0)
    tol = torch.finfo(dtype).eps * b.abs() + 8 * torch.finfo(torch.float32).eps * scale + 1e-30
    bad = (a - b).abs() > tol
    assert not bool(bad.any()), (f"{int(bad.sum())} mismatches, first at {bad.nonzero()[:3].tolist()}: "
                                 f"{a[bad][:3].tolist()} vs {b[bad][:3].tolist()}")


def test_auto_dispatch_prefers_cuda_extension():
    name = resolve("auto", torch.device("cuda"))
    expect = "cuda" if availability()["cuda"][0] else ("triton" if availability()["triton"][0] else "torch")
    assert name == expect


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(1,), (7,), (1023,), (4097,), (5, 123, 123), (9, 7, 41), (4096, 4096)], ids=str)
@pytest.mark.parametrize("partition", ["tensor", "row", "block"])
def test_select_matches_reference(backend, dtype, shape, partition):
    x = realistic_delta(shape, dtype, sigma=1e-4)
    n = x.numel()
    be = get_backend(backend)
    for d in (0.0, 1.0 / n, 0.2, 0.5, 0.9, 1.0):
        ref = magnitude_threshold_ref(x, d, partition=partition, block_size=97) if n < 10**6 or partition == "tensor" \
            else None
        k = ref["k"] if ref is not None else dk.ops.keep_counts(dk.ops._partition_lengths(x, partition, 97), d, "floor")
        got = be.select(x.cuda(), k, partition, 97, None)
        if ref is None:  # large per-partition cases: the torch backend is the (vectorised) reference
            ref_t = get_backend("torch").select(x, k, partition, 97, None)
            ref = {"tau_key": ref_t[0], "c_above": ref_t[1], "c_eq": ref_t[2]}
        for g, key in zip(got, ("tau_key", "c_above", "c_eq")):
            assert torch.equal(g, ref[key]), (key, d)


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


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("stats_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_histogram_matches_reference(backend, dtype, stats_dtype):
    for shape in ((1,), (1023,), (4096, 1031)):
        x = realistic_delta(shape, dtype, sigma=1e-3)
        assert torch.equal(get_backend(backend).histogram(x.cuda(), stats_dtype), histogram_ref(x, stats_dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("tie_mode", ["exact_k", "ge", "gt"])
@pytest.mark.parametrize("partition", ["tensor", "row", "block"])
def test_magnitude_prune_masks_identical_with_heavy_ties(backend, dtype, tie_mode, partition):
    x = quantised_delta((33, 7, 411), dtype, levels=5)
    x = torch.where(x == 0, torch.full_like(x, 1 / 128), x)
    for d in (0.0, 1 / x.numel(), 0.2, 0.5, 1.0):
        kw = dict(density=d, tie_mode=tie_mode, partition=partition, block_size=500)
        got = dk.prune(x.cuda(), "magnitude", backend=backend, **kw).cpu()
        mask = magnitude_mask_ref(x, d, tie_mode=tie_mode, partition=partition, block_size=500)
        assert torch.equal(got, torch.where(mask, x, torch.zeros_like(x))), d


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_dare_mask_bit_identical_to_cpu(backend, dtype):
    x = realistic_delta((4096, 1031), dtype, sigma=2e-3)
    x = torch.where(x == 0, torch.ones_like(x), x)
    for seed, name, p in ((0, "", 0.3), (2**40 + 7, "model.layers.0.mlp.up_proj.weight", 0.9)):
        got = dk.prune(x.cuda(), "dare", density=p, seed=seed, name=name, backend=backend).cpu()
        k1, k2 = rng.stream_keys(seed, name, 0)
        assert torch.equal(got != 0, rng.keep_mask(x.numel(), p, k1, k2).reshape(x.shape))
        assert torch.equal(got, dk.prune(x, "dare", density=p, seed=seed, name=name, backend="torch"))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties", "breadcrumbs_ties", "della", "dppa",
                                    "dppa_ties"])
def test_merge_matches_reference(backend, dtype, method):
    base, deltas = family((257, 1031), 3, dtype, sigma=1e-3)
    params = {"density": [0.2, 0.3, 0.5], "weight": [1.0, 0.7, -0.3]}
    if method.startswith("della"):
        params["epsilon"] = 0.1
    if method.startswith("dppa"):
        params = {"weight": [1.0, 0.7, 0.5], "densities": [[0.1, 0.2], [0.15, 0.3], [0.1, 0.1]], "alphas": [1.8, 1.0]}
    ref = dk.merge_deltas(deltas, base, method=method, seed=5, name="t", backend="reference", **params)
    got = dk.merge_deltas([d.cuda() for d in deltas], base.cuda(), method=method, seed=5, name="t",
                          backend=backend, **params)
    assert got.is_cuda and got.dtype == base.dtype
    # the fp32 formula of every fast backend (each op rounded, IEEE division, no fma): same bytes
    fp32 = dk.merge_deltas(deltas, base, method=method, seed=5, name="t", backend="torch", **params)
    diff = got.cpu() != fp32
    assert not bool(diff.any()), f"{int(diff.sum())} elements differ from the torch backend's fp32 formula"
    # the float64 reference: within an ulp, except where fp32 and fp64 may elect different signs
    assert_merge_close(got, ref, dtype, fp32_unsure_elections(deltas, method, params, seed=5, name="t"))


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
