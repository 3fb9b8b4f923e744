"""DELLA keep masks of the Triton kernel (``kernels.della``) vs the C++ CPU backend and the reference.

Masks must be bit-identical to ``reference.sparsify.della_factor`` (and hence to the CPU backend)
for every dtype, odd and 1-D rows, heavy ties (equal magnitudes ranked by column), -0/+0, edge
densities and epsilons, the long-row (ranked) path, and float64 thresholds that an fma would round
differently. Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors; with
``TRITON_INTERPRET=0`` on a GPU machine the same tests run on CUDA tensors, plus the large-shape
test at the end. Shapes are small: the interpreter costs about 1 ms per program and per sort stage.
"""

import math
from fractions import Fraction

import pytest
import torch
from backends import assert_triton_runs, compile_check, record_launches, triton_target
from helpers import DTYPE_IDS, DTYPES, assert_ulp_close, family, quantised_delta, realistic_delta

import dppa_kernels as dk
from dppa_kernels.backends.cpu import CpuBackend
from dppa_kernels.reference import rng
from dppa_kernels.reference import sparsify as SP

INTERPRET, DEVICE = triton_target()

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from dppa_kernels.backends.cuda import CudaBackend  # noqa: E402
from dppa_kernels.backends.triton import TritonBackend  # noqa: E402
from dppa_kernels.kernels import della as kdella  # noqa: E402

CPU = CpuBackend()
CPU_OK, CPU_WHY = CPU.available()
TRITON = TritonBackend()
# (density, epsilon): typical, tiny, near 1, ε = 0, density = ε (lowest p exactly 0)
CASES = [(0.4, 0.15), (0.002, 0.001), (0.998, 0.0015), (0.3, 0.0), (0.2, 0.2)]


@pytest.fixture(scope="module", autouse=True)
def _really_triton():
    assert_triton_runs(kdella._della_sort_kernel)


def _ref_mask(x, density, epsilon, seed, name, stream=0):
    return SP.della_factor(x.cpu(), density, epsilon, seed, name, stream) > 0


def _check(x, density, epsilon, seed=0, name="w", stream=0, **kw):
    """Triton mask == reference mask == CPU backend mask, bit for bit."""
    k1, k2 = rng.stream_keys(seed, name, stream)
    if kw:
        got = kdella.della_mask(x.to(DEVICE), density, epsilon, k1, k2, **kw)
    else:
        got = TRITON.della_mask(x.to(DEVICE), density, epsilon, k1, k2)
    assert got.dtype == torch.bool and got.shape == x.shape and got.device.type == DEVICE
    ref = _ref_mask(x, density, epsilon, seed, name, stream)
    bad = got.cpu() != ref
    assert not bool(bad.any()), f"{int(bad.sum())} mask bits differ, first at {bad.nonzero()[:3].tolist()}"
    if CPU_OK:
        assert torch.equal(CPU.della_mask(x.cpu(), density, epsilon, k1, k2), ref)
    return got


# ---------------------------------------------------------------- masks: sort path


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(), (1,), (2,), (7,), (1023,), (9, 7, 41), (5, 3, 1), (3, 4097)], ids=str)
def test_mask_bit_identical(dtype, shape):
    x = realistic_delta(shape, dtype, sigma=1e-3) if shape else torch.tensor(3e-3).to(dtype)
    for i, (d, eps) in enumerate(CASES):
        _check(x, d, eps, seed=i, name=f"layers.{i}.w")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_heavy_ties_ranked_by_column(dtype):
    # a few magnitude levels, both signs and ±0: nearly every rank is decided by the column order
    x = quantised_delta((6, 333), dtype, levels=3)
    x[1] = 0.0
    x[2, ::2] = -0.0  # same key as +0
    x[3] = torch.where(torch.arange(333) % 3 == 0, -0.25, 0.25).to(dtype)
    x[4] = 0.5
    for d, eps in ((0.5, 0.45), (0.1, 0.05)):
        got = _check(x, d, eps, seed=7, name="ties")
    # the ranks really are by column: the all-equal row keeps like the ramp p_r of its columns
    k1, k2 = rng.stream_keys(7, "ties", 0)
    cols = 333
    p = (0.1 - 0.05) + (torch.arange(cols, dtype=torch.float64) / (cols - 1)) * (2 * 0.05)
    thr = torch.floor(p * 4294967296.0).to(torch.int64)
    bits = rng.random_bits(cols, k1, k2, offset=4 * cols)
    assert torch.equal(got[4].cpu(), bits < thr)


def test_distinct_and_reversed_magnitudes():
    # ascending |x| per column (rank = column), then descending (rank = cols − 1 − column)
    for cols in (129, 4096):
        up = (torch.arange(1, cols + 1, dtype=torch.float32) * (-1) ** torch.arange(cols)).reshape(1, -1)
        _check(torch.cat([up, up.flip(1)]), 0.5, 0.3, seed=3)


def test_probabilities_outside_unit_interval_clamp():
    # the backend API does not validate ε: p < 0 keeps nothing, p > 1 keeps everything (as the reference)
    x = realistic_delta((4, 77), torch.bfloat16, sigma=1e-3)
    for d, eps in ((0.9, 0.3), (0.1, 0.3), (0.05, 0.5)):
        _check(x, d, eps, seed=1)


def test_density_edges_and_empty():
    x = realistic_delta((3, 50), torch.float16)
    assert bool(TRITON.della_mask(x.to(DEVICE), 1.0, 0.1, 1, 2).all())
    assert not bool(TRITON.della_mask(x.to(DEVICE), 0.0, 0.1, 1, 2).any())
    for shape in ((0,), (0, 5), (5, 0)):
        e = torch.zeros(shape, device=DEVICE)
        assert TRITON.della_mask(e, 0.4, 0.1, 1, 2).shape == shape


def test_key_scalars_not_specialised():
    # k1/k2 of 0 or 1 (which triton would otherwise turn into constants) and keys with the top bit set
    x = realistic_delta((2, 300), torch.float32, sigma=1e-3)
    for k1, k2 in ((1, 0), (0, 1), (0xFFFFFFFF, 0x80000000)):
        got = TRITON.della_mask(x.to(DEVICE), 0.4, 0.15, k1, k2)
        p = SP.della_probabilities(x, 0.4, 0.15).reshape(-1)
        thr = torch.floor(p * 4294967296.0).clamp(0, 4294967296.0).to(torch.int64)
        assert torch.equal(got.cpu().reshape(-1), rng.random_bits(x.numel(), k1, k2) < thr)


def test_non_contiguous_input():
    x = realistic_delta((64, 33), torch.bfloat16, sigma=1e-3)
    k1, k2 = rng.stream_keys(0, "t", 0)
    got = TRITON.della_mask(x.to(DEVICE).t(), 0.3, 0.1, k1, k2)
    assert torch.equal(got.cpu(), _ref_mask(x.t().contiguous(), 0.3, 0.1, 0, "t"))


# ---------------------------------------------------------------- masks: ranked path (long rows)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_ranked_path_matches(dtype):
    # rows longer than max_sort: fp32 through torch.sort + the ranked kernel, in batches of rows;
    # bf16/fp16 through the counting path
    x = quantised_delta((5, 3, 301), dtype, levels=40) + realistic_delta((5, 3, 301), dtype, sigma=1e-3)
    _check(x, 0.4, 0.15, seed=2, max_sort=256, ranked_batch=1000)  # 3 rows per batch
    _check(x.reshape(-1), 0.6, 0.1, seed=3, max_sort=256)  # one long 1-D row


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("segment,tile", [(None, None), (1024, 1024), (2048, 512)], ids=str)
def test_counting_path_matches_without_sorting_rows(dtype, segment, tile, monkeypatch):
    # long 16-bit rows: ranks from per-segment key counts and tile sorts (several tiles per
    # segment, several segments per row), ties across tiles and segments ranked by column
    x = quantised_delta((3, 5001), dtype, levels=40) + realistic_delta((3, 5001), dtype, sigma=1e-3)
    x[1, :3000] = 0.25
    x[2, ::7] = -0.0
    ref = [_ref_mask(x, 0.4, 0.15, 2, "w"), _ref_mask(x[2], 0.6, 0.1, 3, "w")]

    def no_sort(*a, **k):
        raise AssertionError("the counting path sorted a row with torch.sort")

    monkeypatch.setattr(torch, "sort", no_sort)
    k1, k2 = rng.stream_keys(2, "w", 0)
    got = kdella.della_mask(x.to(DEVICE), 0.4, 0.15, k1, k2, max_sort=256, segment=segment, tile=tile)
    assert torch.equal(got.cpu(), ref[0])
    k1, k2 = rng.stream_keys(3, "w", 0)  # one 1-D row
    got = kdella.della_mask(x[2].to(DEVICE), 0.6, 0.1, k1, k2, max_sort=256, segment=segment, tile=tile)
    assert torch.equal(got.cpu(), ref[1])


def test_counting_path_plan():
    from dppa_kernels.kernels import della_long as L

    lb, seg, n_seg, rows = L.plan(40000, 10_000, tile=2048)
    assert (lb, seg, n_seg) == (11, L.SEGMENT_MIN, 1) and rows * n_seg * L.KEYS * 4 <= L.SCRATCH_BYTES
    lb, seg, n_seg, rows = L.plan(1 << 30, 1, tile=2048)
    assert n_seg <= L.MAX_SEGMENTS and seg % 2048 == 0 and n_seg * seg >= 1 << 30 and rows == 1


def test_shared_memory_budget_selects_ranked_path(monkeypatch):
    x = realistic_delta((3, 1000), torch.float32, sigma=1e-3)
    assert kdella.sort_smem(1000, 3, 31) == 1024 * 8 * (4 if INTERPRET else 2)
    assert kdella.sort_smem(32768, 1, 15) == 32768 * 4 and kdella.sort_smem(16384, 1, 31) == 16384 * 8
    monkeypatch.setattr(kdella, "_smem_budget", lambda device: 0)
    calls = record_launches(monkeypatch, kdella, "_della_ranked_kernel")
    _check(x, 0.3, 0.1, seed=4, max_sort=1 << 15)
    assert calls, "a tile over the shared-memory budget must take the ranked path"


# ---------------------------------------------------------------- float64 arithmetic and hash


def _fmix32_inv(h):
    inv1, inv2 = pow(0x85EBCA6B, -1, 1 << 32), pow(0xC2B2AE35, -1, 1 << 32)
    h ^= h >> 16
    h = (h * inv2) & 0xFFFFFFFF
    h ^= (h >> 13) ^ (h >> 26)
    h = (h * inv1) & 0xFFFFFFFF
    return h ^ (h >> 16)


def _fma_sensitive(density, epsilon, cols):
    """(rank, floor(p·2^32) as the reference rounds, the same with lo + rn·span fused) where they differ."""
    lo, span = density - epsilon, 2.0 * epsilon
    out = []
    for r in range(cols):
        rn = r / (cols - 1)
        t = math.floor((lo + rn * span) * 4294967296.0)
        t_fma = math.floor(float(Fraction(rn) * Fraction(span) + Fraction(lo)) * 4294967296.0)
        if t != t_fma:
            out.append((r, t, t_fma))
    return out


def test_thresholds_that_an_fma_would_round_differently():
    """Elements whose hash lies exactly between the two roundings of p: kept iff p is rounded twice.

    |x| grows with the column, so rank = column; k2 is solved (fmix32 is invertible) so that the
    element of a sensitive rank hashes to min(t, t_fma). A kernel whose lo + rn·span became an fma
    (triton's default fp fusion on the GPU) flips exactly that element.
    """
    cols, d, eps = 4097, 0.3, 0.1
    sens = _fma_sensitive(d, eps, cols)
    assert len(sens) > 10  # the configuration really discriminates
    x = torch.arange(1, cols + 1, dtype=torch.float32).reshape(1, cols) * 1e-4
    k1 = 0x12345678
    for r, t, t_fma in sens[:: max(1, len(sens) // 4)][:4]:
        target = min(t, t_fma)
        k2 = _fmix32_inv(target) ^ rng.fmix32_int(r ^ k1)
        assert int(rng.random_bits(1, k1, k2, offset=r)) == target
        got = TRITON.della_mask(x.to(DEVICE), d, eps, k1, k2).cpu()
        assert bool(got[0, r]) == (target < t), (r, t, t_fma)
        if CPU_OK:
            assert torch.equal(CPU.della_mask(x, d, eps, k1, k2), got)


@triton.jit
def _keep_probe_kernel(OUT, E, R, cols, lo_bits, span_bits, k1, k2, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    keep = kdella._keep_bits(tl.load(E + i), tl.load(R + i), cols, lo_bits, span_bits, k1, k2)
    tl.store(OUT + i, keep)


def test_keep_bits_high_indices_and_long_rows():
    # flat indices >= 2^32 (hi32 word of the hash) and ranks of rows of 2^31 − 1 without the memory
    k1, k2 = rng.stream_keys(99, "embed_tokens", 2)
    for cols in (3, 28672, (1 << 31) - 1):
        ranks = torch.randint(0, cols, (256,), dtype=torch.int64)
        ranks[:2] = torch.tensor([0, cols - 1])
        e = (1 << 32) + 977 + torch.arange(256, dtype=torch.int64) * 7919
        out = torch.zeros(256, dtype=torch.uint8, device=DEVICE)
        _keep_probe_kernel[(1,)](out, e.to(DEVICE), ranks.to(DEVICE), cols, kdella._f64_bits(0.25),
                                 kdella._f64_bits(0.3), k1, k2, BLOCK=256, enable_fp_fusion=False)
        p = 0.25 + (ranks.to(torch.float64) / (cols - 1)) * 0.3
        thr = torch.floor(p * 4294967296.0).to(torch.int64)
        bits = torch.stack([rng.random_bits(1, k1, k2, offset=int(v))[0] for v in e])
        assert torch.equal(out.cpu().bool(), bits < thr), cols


# ---------------------------------------------------------------- ops and backends wiring


needs_cpu = pytest.mark.skipif(not CPU_OK, reason=f"CPU extension not built ({CPU_WHY}): nothing to compare with")


@needs_cpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_prune_equals_cpu_backend(dtype):
    x = realistic_delta((37, 129), dtype, sigma=2e-3)
    x = torch.where(x == 0, torch.full_like(x, 1e-3), x)  # no zeros: the mask is visible in the output
    kw = dict(density=0.4, epsilon=0.15, seed=11, name="model.layers.3.mlp.down_proj.weight")
    for rescale in ("none", "l1"):
        got = dk.prune(x.to(DEVICE), "della", rescale=rescale, backend="triton", **kw).cpu()
        want = dk.prune(x, "della", rescale=rescale, backend="cpu", **kw)
        assert torch.equal(got != 0, want != 0), rescale
        if rescale == "none":
            assert torch.equal(got, want)
        else:
            assert_ulp_close(got, want, dtype)
    mask = dk.ops.make_plan(TRITON, x.to(DEVICE), dk.ops.sparsify_spec("della", density=0.4, epsilon=0.15),
                            seed=11, name="w", stream=2).mask
    want = dk.ops.make_plan(CPU, x, dk.ops.sparsify_spec("della", density=0.4, epsilon=0.15), seed=11, name="w",
                            stream=2).mask
    assert torch.equal(mask.cpu(), want)


@needs_cpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_merge_equals_cpu_backend(dtype, method):
    base, deltas = family((33, 65), 3, dtype, sigma=1e-3)
    params = {"density": [0.2, 0.5, 0.8], "weight": [1.0, 0.7, -0.3], "epsilon": [0.1, 0.15, 0.05]}
    want = dk.merge_deltas(deltas, base, method=method, seed=5, name="t", backend="cpu", **params)
    got = dk.merge_deltas([d.to(DEVICE) for d in deltas], base.to(DEVICE), method=method, seed=5, name="t",
                          backend="triton", **params).cpu()
    assert got.dtype == want.dtype
    assert_ulp_close(got, want, dtype)
    ref = dk.merge_deltas(deltas, base, method=method, seed=5, name="t", backend="reference", **params)
    assert_ulp_close(got, ref, dtype)


def test_backends_expose_della_mask():
    assert TritonBackend.della_mask is not None
    cb = CudaBackend()
    # the CUDA backend delegates to the Triton kernel when triton runs (here: the interpreter or a GPU)
    assert cb.della_mask is not None and cb.della_mask.__func__ is TritonBackend.della_mask
    from dppa_kernels.backends.torch_backend import TorchBackend

    cb._fallback = TorchBackend()  # no triton: no della_mask, ops falls back to the reference mask
    assert cb.della_mask is None


def test_della_kernels_compile_for_sm90_without_fma():
    """Lower the DELLA kernels to sm_90 cubin and check their PTX rounds every fp64 op (no fma);
    also report that triton's default fp fusion would have produced fmas."""
    out = compile_check("90", "della")
    assert "compiled 8 Triton kernels" in out
    assert "as launched: 0" in out


# ---------------------------------------------------------------- GPU only: real shapes


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: large-shape DELLA GPU test skipped")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_large_shapes_bit_identical(backend):
    from dppa_kernels.backends.registry import availability, get_backend

    ok, why = availability()[backend]
    if not ok:
        # GPU-only sizes: without a CUDA device (CI) the interpreter tests above cover the kernel.
        pytest.skip(f"{backend} backend not available: {why}")
    if INTERPRET:
        # Interpreted Triton runs on CPU tensors; these shapes are for the compiled kernel on a GPU.
        pytest.skip("TRITON_INTERPRET=1: run with TRITON_INTERPRET=0 to test Triton on the GPU")
    be = get_backend(backend)
    assert be.della_mask is not None
    cases = [((4096, 4096), torch.bfloat16), ((4096, 4096), torch.float32), ((512, 14336), torch.bfloat16),
             ((256, 14336), torch.float32), ((64, 28672), torch.bfloat16), ((128, 28672), torch.float16),
             ((3, 40000), torch.float32), ((1 << 21,), torch.bfloat16), ((37, 5, 129), torch.float16)]
    for shape, dtype in cases:
        x = realistic_delta(shape, dtype, sigma=1e-3)
        k1, k2 = rng.stream_keys(42, f"layers.0.{shape}", 1)
        got = be.della_mask(x.cuda(), 0.35, 0.1, k1, k2).cpu()
        want = CPU.della_mask(x, 0.35, 0.1, k1, k2) if CPU_OK else _ref_mask(x, 0.35, 0.1, 42, f"layers.0.{shape}", 1)
        bad = got != want
        assert not bool(bad.any()), (shape, dtype, int(bad.sum()))
    # end to end through ops
    x = realistic_delta((1024, 4096), torch.bfloat16, sigma=1e-3)
    got = dk.prune(x.cuda(), "della", density=0.3, epsilon=0.1, seed=1, name="w", backend=backend).cpu()
    assert torch.equal(got, dk.prune(x, "della", density=0.3, epsilon=0.1, seed=1, name="w", backend="reference"))
