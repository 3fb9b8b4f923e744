"""Triton-specific properties (CPU tensors under the Triton interpreter on CI); the properties
every backend shares (select, histogram, masks, DARE, prune, merge, L1 sums) are in
tests/test_backend_parity.py. Odd shapes, every dtype, heavy ties,
edge densities; thresholds, counts and masks exact, values within one output ulp (the interpreter
truncates fp32 -> bf16 stores), DARE masks bit-identical to the reference RNG.
On a GPU machine the same file runs on CUDA tensors: ``TRITON_INTERPRET=0 pytest tests/test_triton_backend.py``.
Shapes are small and kernels use large blocks under the interpreter (~1 ms per program instance).
"""

import pytest
import torch
from backends import assert_triton_runs, compile_check, triton_target
from helpers import DTYPE_IDS, DTYPES, family, quantised_delta, realistic_delta

import dppa_kernels as dk
from dppa_kernels.backends.base import ApplyPlan
from dppa_kernels.backends.torch_backend import TorchBackend
from dppa_kernels.reference import rng
from dppa_kernels.reference.dppa import histogram_ref
from dppa_kernels.reference.threshold import magnitude_mask_ref, magnitude_threshold_ref
from dppa_kernels.spec import CombineSpec

INTERPRET, DEVICE = triton_target()

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from dppa_kernels.backends.triton import TritonBackend  # noqa: E402
from dppa_kernels.kernels import apply as kapply  # noqa: E402
from dppa_kernels.kernels import histogram as khist  # noqa: E402
from dppa_kernels.kernels import select as kselect  # noqa: E402
from dppa_kernels.kernels.common import hash_bits  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _really_triton():
    assert_triton_runs(kselect._window_count_kernel)
    assert TritonBackend().supports(torch.device(DEVICE))


def _dev(t):
    return t.to(DEVICE)


# ---------------------------------------------------------------- select


@pytest.mark.parametrize("dtype,key_dtype", [(torch.float32, torch.bfloat16), (torch.float32, torch.float16),
                                             (torch.bfloat16, torch.float16), (torch.float16, torch.bfloat16),
                                             (torch.bfloat16, torch.float32)], ids=str)
def test_select_key_dtype_rounding(dtype, key_dtype):
    # values exactly halfway between two bf16 / fp16 numbers exercise round-to-nearest-even
    x = realistic_delta((4097,), dtype, sigma=2e-3)
    if dtype == torch.float32:
        x[:64] = (torch.arange(64, dtype=torch.int32) * 0x10000 + 0x3C008000).view(torch.float32)
    for d in (0.1, 0.7):
        ref = magnitude_threshold_ref(x, d, key_dtype=key_dtype)
        got = TritonBackend().select(_dev(x), ref["k"], "tensor", None, key_dtype)
        assert [int(t) for t in got] == [int(ref[k]) for k in ("tau_key", "c_above", "c_eq")]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("density", [0.001, 0.3, 0.999])
def test_select_sample_bracket_path(dtype, density):
    # force the sample-bracket window on a small tensor (hits, and misses for extreme densities)
    x = _dev(quantised_delta((16411,), dtype, levels=50) + realistic_delta((16411,), dtype, sigma=1e-3))
    ref = magnitude_threshold_ref(x.cpu(), density)
    got = kselect.select(x, ref["k"], "tensor", None, None, sample=512, sample_min_n=4096)
    assert [int(t) for t in got] == [int(ref[k]) for k in ("tau_key", "c_above", "c_eq")]


class _Launches:
    """Counts the launches of a Triton kernel (``kernel[grid](...)``)."""

    def __init__(self, kernel):
        self.kernel, self.n = kernel, 0

    def __getitem__(self, grid):
        self.n += 1
        return self.kernel[grid]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("density", [0.001, 0.3, 0.999, 1.0])
@pytest.mark.parametrize("path", ["sampled", "unsampled", "over_capacity"])
def test_select_fp32_keys_in_two_passes(dtype, density, path, monkeypatch):
    # 31-bit keys: one count pass, one collect pass, then the window's keys finish on the device;
    # a window holding more keys than the capacity goes on with the count passes (still exact)
    x = _dev(quantised_delta((16411,), dtype, levels=50) + realistic_delta((16411,), dtype, sigma=1e-3))
    x[5:900] = 0  # a heavy tie at key 0
    count = _Launches(kselect._window_count_kernel)
    collect = _Launches(kselect._collect_kernel)
    monkeypatch.setattr(kselect, "_window_count_kernel", count)
    monkeypatch.setattr(kselect, "_collect_kernel", collect)
    kw = dict(unsampled={}, sampled=dict(sample=512, sample_min_n=4096),
              over_capacity=dict(sample=512, sample_min_n=4096, candidate_cap=4))[path]
    ref = magnitude_threshold_ref(x.cpu(), density, key_dtype=torch.float32)
    got = kselect.select(x, ref["k"], "tensor", None, torch.float32, **kw)
    assert [int(t) for t in got] == [int(ref[k]) for k in ("tau_key", "c_above", "c_eq")]
    assert collect.n == 1
    if path != "over_capacity":
        assert count.n == 1
    elif density == 0.3:
        assert count.n > 1  # the window around the median holds more than 4 keys


def test_select_fp32_keys_check_finite_and_k0():
    x = realistic_delta((5000,), torch.float32, sigma=1e-3)
    ref = magnitude_threshold_ref(x, 0.0)
    got = kselect.select(_dev(x), ref["k"], "tensor", None, None, check_finite=True)
    assert [int(t) for t in got] == [int(ref[k]) for k in ("tau_key", "c_above", "c_eq")] + [0]
    x[4321] = float("nan")
    assert int(kselect.select(_dev(x), torch.tensor([7]), "tensor", None, None, check_finite=True)[3]) == 1


def test_select_all_equal_and_all_zero():
    for x in (torch.full((3000,), 0.5), torch.zeros(3000)):
        ref = magnitude_threshold_ref(x, 0.4)
        got = TritonBackend().select(_dev(x), ref["k"], "tensor", None, None)
        assert [int(t) for t in got] == [int(ref[k]) for k in ("tau_key", "c_above", "c_eq")]


# ---------------------------------------------------------------- histogram


def test_histogram_runs_across_tiles_and_programs():
    # few distinct keys: every tile adds long runs, one atomic each, from several programs
    x = quantised_delta((5, 123, 123), torch.bfloat16, levels=5)
    x[0] = realistic_delta((123, 123), torch.bfloat16, sigma=1e-3)
    got = khist.histogram(_dev(x), torch.bfloat16, tiles_per_program=1)
    assert torch.equal(got, histogram_ref(x, torch.bfloat16))


# ---------------------------------------------------------------- apply: masks exact


def test_exact_k_tie_ranks_across_chunks_and_partitions():
    # one tie group spanning many apply chunks and partitions that straddle chunk borders
    x = torch.full((2, 40001), 0.25)
    x[:, ::7] = 0.5
    for partition, bs in (("tensor", None), ("row", None), ("block", 30011)):
        for d in (0.05, 0.6):
            got = dk.prune(_dev(x), "magnitude", density=d, tie_mode="exact_k", partition=partition,
                           block_size=bs, backend="triton").cpu()
            mask = magnitude_mask_ref(x, d, tie_mode="exact_k", partition=partition, block_size=bs)
            assert torch.equal(got != 0, mask), (partition, d)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_bands_codes_exact(dtype):
    # power-of-two band factors keep values exact, so the band of every element is checked
    x = quantised_delta((37, 129), dtype, levels=9)
    x = torch.where(x == 0, torch.full_like(x, -1 / 256), x)
    for tie_mode, partition in (("gt", "tensor"), ("exact_k", "tensor"), ("exact_k", "row"), ("ge", "block")):
        kw = dict(densities=(0.1, 0.3, 0.6), alphas=(4.0, 2.0, 1.0), band_combine="direct", tie_mode=tie_mode,
                  partition=partition, block_size=300)
        got = dk.prune(_dev(x), "bands", backend="triton", **kw).cpu()
        assert torch.equal(got, dk.prune(x, "bands", backend="reference", **kw)), (tie_mode, partition)


def test_bands_of_a_large_tensor_select_per_level(monkeypatch):
    # Triton plans the levels of a large bf16 tensor with one select each, not a histogram
    x = realistic_delta((257, 300), torch.bfloat16, sigma=2e-3)  # above plans._HIST_LEVELS_MIN
    monkeypatch.setattr(TritonBackend, "histogram", lambda *a, **k: pytest.fail("histogram used"))
    for tie_mode in ("exact_k", "gt"):
        kw = dict(densities=(0.1, 0.4), alphas=(2.0, 1.0), band_combine="direct", tie_mode=tie_mode)
        got = dk.prune(_dev(x), "bands", backend="triton", **kw).cpu()
        assert torch.equal(got, dk.prune(x, "bands", backend="reference", **kw)), tie_mode


@triton.jit
def _bits_kernel(OUT, offset, k1, k2, BLOCK: tl.constexpr):
    i = offset + tl.arange(0, BLOCK).to(tl.int64)
    tl.store(OUT + tl.arange(0, BLOCK), hash_bits(i, k1.to(tl.uint32), k2.to(tl.uint32)).to(tl.int64))


def test_dare_hash_high_index_bits():
    # flat indices >= 2**32 use the hi32 word: check the kernel's hash there without a 4 G tensor
    k1, k2 = rng.stream_keys(123, "embed", 3)
    out = torch.zeros(256, dtype=torch.int64, device=DEVICE)
    off = (1 << 32) + 12345
    _bits_kernel[(1,)](out, off, k1, k2, BLOCK=256)
    assert torch.equal(out.cpu(), rng.random_bits(256, k1, k2, offset=off))


# ---------------------------------------------------------------- apply: values


@pytest.mark.parametrize("elect", ["weighted_sum", "count", "sum", "frequency"])
@pytest.mark.parametrize("divisor", ["weights", "count", "none"])
def test_combine_rules_match_torch_backend(elect, divisor):
    # every TIES election x divisor, and sum, vs the torch backend (same fp32 formula)
    base, deltas = family((4097,), 4, torch.float32, sigma=1e-3)
    plans = [ApplyPlan("dense", scale=s) for s in (1.0, 0.5, 2.0, 1.0)]
    w = [1.0, -0.7, 0.3, 0.0]
    for comb in ("ties", "sum"):
        spec = CombineSpec(combine=comb, elect=elect, divisor=divisor, normalize=True, lam=0.8)
        ref = TorchBackend().apply(deltas, base, plans, w, spec, torch.float32)
        got = TritonBackend().apply([_dev(d) for d in deltas], _dev(base), plans, w, spec, torch.float32).cpu()
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-9)


def test_apply_writes_nothing_out_of_bounds():
    n = 1023
    base, deltas = family((n,), 2, torch.bfloat16)
    sentinel = torch.full((n + 4096,), 7.0, dtype=torch.bfloat16, device=DEVICE)
    plans = [ApplyPlan("dare", k1=1, k2=2, thr32=2**31), ApplyPlan("dense")]
    kapply.apply([_dev(d) for d in deltas], _dev(base), plans, [1.0, 1.0], CombineSpec(), torch.bfloat16,
                 out=sentinel[:n])
    assert bool((sentinel[n:] == 7.0).all())


# ---------------------------------------------------------------- GPU compile (no GPU needed)


def test_kernels_compile_for_sm90():
    """Lower every kernel through triton's GPU pipeline to cubin (the interpreter accepts code the
    compiler rejects, e.g. non-constexpr globals); no driver needed."""
    assert "compiled" in compile_check("90")
