"""The multithreaded C++ CPU backend (``dppa_kernels._cpu``, OpenMP).

A drop-in for :class:`~dppa_kernels.backends.torch_backend.TorchBackend` on CPU tensors: same
primitives, same results (thresholds, counts and masks identical; values computed in fp32 in the
same operation order). The extension takes raw data pointers, sizes and dtype codes; this wrapper
makes inputs contiguous, allocates every output and keeps the buffers alive during the call. It
validates nothing user-facing (``dppa_kernels.ops`` does); internal invariants are asserted.
Threads: ``torch.get_num_threads()`` at call time; calls over fewer than 2^15 elements run on the
calling thread (``kSerialBelow`` in ``csrc/cpu/common.h``).
"""

from __future__ import annotations

import torch

from .._C import cpu_extension
from ..reference.threshold import no_keep_key
from ..vocab import (COMBINE_CODES, DIVISOR_CODES, ELECT_CODES, HIST_BINS, PLAN_KIND_CODES, TIE_MODE_CODES,
                     dtype_code, partition_geometry)
from .base import ApplyPlan, Backend, NonFiniteInput


def _nthreads() -> int:
    """Threads offered to the extension (it uses one for calls below its SERIAL_BELOW elements)."""
    return torch.get_num_threads()


def _int64_cpu(t: torch.Tensor) -> torch.Tensor:
    """t as a contiguous int64 CPU tensor (itself when it already is one)."""
    if t.dtype != torch.int64 or t.device.type != "cpu" or not t.is_contiguous():
        t = t.to(device="cpu", dtype=torch.int64).contiguous()
    return t


def _geometry(shape, partition: str, block_size) -> tuple[int, int]:
    """(L, P) of ``vocab.partition_geometry``, with L >= 1 for the extension (one empty tensor partition)."""
    length, parts = partition_geometry(shape, partition, block_size)
    return max(length, 1) if partition == "tensor" else length, parts


class CpuBackend(Backend):
    name = "cpu"

    def __init__(self):
        self._ext = cpu_extension()

    def available(self):
        if self._ext.available:
            return True, ""
        return False, f"the C++ CPU extension dppa_kernels._cpu is {self._ext.reason}"

    def supports(self, device):
        return torch.device(device).type == "cpu"

    @property
    def _m(self):
        return self._ext.module

    # ------------------------------------------------------------------ select / histogram
    def select(self, x, k, partition, block_size, key_dtype, *, check_finite=False):
        kd = key_dtype or x.dtype
        x = x.contiguous()
        n = x.numel()
        length, parts = _geometry(x.shape, partition, block_size)
        out = torch.zeros(3, parts, dtype=torch.int64)  # one allocation: small calls are common
        tau, above, eq = out[0], out[1], out[2]
        tau.fill_(no_keep_key(kd))
        if n == 0 or parts == 0:
            return tau, above, eq
        k = _int64_cpu(k)
        assert k.numel() == parts, f"k has {k.numel()} entries for {parts} partitions"
        nonfinite = self._m.select(x.data_ptr(), dtype_code(x.dtype), n, length, dtype_code(kd), k.data_ptr(),
                                   tau.data_ptr(), above.data_ptr(), eq.data_ptr(), bool(check_finite), _nthreads())
        if check_finite and nonfinite:
            raise NonFiniteInput((0,))
        return tau, above, eq

    def histogram(self, x, stats_dtype):
        x = x.contiguous()
        out = torch.zeros(HIST_BINS, dtype=torch.int64)
        self._m.histogram(x.data_ptr(), dtype_code(x.dtype), x.numel(), dtype_code(stats_dtype), out.data_ptr(),
                          _nthreads())
        return out

    # ------------------------------------------------------------------ apply / abs_sums
    def _desc(self, delta: torch.Tensor, plan: ApplyPlan, keep: list):
        """PlanDesc of one model; ``keep`` holds the tensors whose pointers it carries."""
        d = self._m.PlanDesc()
        delta = delta.contiguous()
        keep.append(delta)
        n = delta.numel()
        d.kind = PLAN_KIND_CODES[plan.kind]
        d.data = delta.data_ptr()
        d.dtype = dtype_code(delta.dtype)
        d.scale = float(plan.scale)
        if plan.kind == "thresholds":
            length, parts = _geometry(delta.shape, plan.partition, plan.block_size)
            levels = len(plan.factors)
            d.L = length
            d.key_dtype = dtype_code(plan.key_dtype or delta.dtype)
            d.tie_mode = TIE_MODE_CODES[plan.tie_mode]
            d.K = levels
            d.factors = [float(f) for f in plan.factors]
            for field in ("tau_key", "budget", "c_eq") if plan.tie_mode == "exact_k" else ("tau_key",):
                t = _int64_cpu(getattr(plan, field))
                assert t.numel() == parts * levels, f"plan.{field} has {t.numel()} entries, expected {parts}x{levels}"
                keep.append(t)
                setattr(d, "tau" if field == "tau_key" else field, t.data_ptr())
        elif plan.kind == "dare":
            d.k1, d.k2, d.thr32 = int(plan.k1), int(plan.k2), int(plan.thr32)
        elif plan.kind == "mask":
            mask = plan.mask.to(device="cpu", dtype=torch.bool).contiguous()
            assert mask.numel() == n, f"mask has {mask.numel()} elements, delta {n}"
            keep.append(mask)
            d.mask = mask.view(torch.uint8).data_ptr()
        return d

    def abs_sums(self, delta, plan):
        keep: list = []
        d = self._desc(delta, plan, keep)
        before, after = self._m.abs_sums(d, delta.numel(), _nthreads())
        return float(before), float(after)

    def apply(self, deltas, base, plans, weights, combine, out_dtype, *, check_finite=()):
        assert len(deltas) == len(plans) == len(weights) and len(deltas) >= 1
        shape, n = deltas[0].shape, deltas[0].numel()
        keep: list = []
        descs = []
        for delta, plan, w in zip(deltas, plans, weights):
            assert delta.numel() == n, f"deltas differ in size: {delta.numel()} vs {n}"
            d = self._desc(delta, plan, keep)
            d.weight = float(w)
            descs.append(d)
        c = self._m.CombineDesc()
        c.combine = COMBINE_CODES[combine.combine]
        c.elect = ELECT_CODES[combine.elect]
        c.divisor = DIVISOR_CODES[combine.divisor]
        c.normalize = bool(combine.normalize)
        c.lam = float(combine.lam)
        s = float(sum(float(w) for w in weights))  # "sum" combine divides by Σw (1 when ~0)
        c.sum_divisor = 1.0 if abs(s) < 1e-8 else s
        base_ptr, base_code = 0, 0
        if base is not None:
            base = base.contiguous()
            assert base.numel() == n, f"base has {base.numel()} elements, deltas {n}"
            base_ptr, base_code = base.data_ptr(), dtype_code(base.dtype)
        out = torch.empty(shape, dtype=out_dtype)
        # a NaN/Inf result: some checked input is non-finite (the others are known finite), or fp32 overflowed
        if self._m.apply(descs, base_ptr, base_code, c, out.data_ptr(), dtype_code(out_dtype), n, bool(check_finite),
                         _nthreads()):
            raise NonFiniteInput(check_finite)
        return out

    # ------------------------------------------------------------------ DELLA
    def della_mask(self, delta, density, epsilon, k1, k2):
        if density >= 1.0:
            return torch.ones(delta.shape, dtype=torch.bool)
        if density <= 0.0 or delta.numel() == 0:
            return torch.zeros(delta.shape, dtype=torch.bool)
        delta = delta.contiguous()
        cols = delta.shape[-1] if delta.dim() else 1
        out = torch.empty(delta.shape, dtype=torch.bool)
        self._m.della_mask(delta.data_ptr(), dtype_code(delta.dtype), delta.numel(), cols, float(density),
                           float(epsilon), int(k1), int(k2), out.view(torch.uint8).data_ptr(),
                           _nthreads())
        return out
