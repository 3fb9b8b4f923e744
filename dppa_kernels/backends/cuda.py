"""CUDA backend: the select and histogram primitives as CUDA C++ kernels (``dppa_kernels._cuda``).

* ``select``, one large partition (``tensor``, or a few blocks of >= 1 M elements): grid-wide radix
  select driven on the device; 16-bit keys: one pass with a 32768-bin shared-memory histogram per
  CTA (≈ one read); fp32 keys: three passes (11/11/9-bit digits). Extra memory: 256 KB + 40 B.
* ``select``, many partitions (rows, blocks): one CTA per partition, 8-bit-digit radix in shared
  memory (2 passes for 16-bit keys, 4 for fp32 keys, re-reading the partition from L2). Extra memory:
  the 4 × P int64 output and k on the device.
* NaN/Inf (``check_finite``): both selects count the non-finite keys in their first pass (from the
  histogram, or one compare per element read) and return the count with the result.
* ``histogram``: the same one-pass 32768-bin kernel (256 KB output).
* ``apply`` / ``abs_sums``: the fused Triton kernels when triton is available, else the torch backend
  (the merge pass is elementwise: CUDA C++ would not beat the Triton kernel by much).
* ``della_mask``: the Triton kernel (``kernels.della``) when triton is available; otherwise the
  attribute is None and ``ops`` uses the reference's mask. ``select_many`` likewise
  (``kernels.select_many``).

The extension takes raw pointers, sizes and the current CUDA stream as an integer; tensors are
validated and allocated here (torch's caching allocator, on the current stream). Launches happen
under a device guard on ``torch.cuda.current_stream(device)``; the only synchronisation is the copy
of the result to the host. No global mutable state.
"""

from __future__ import annotations

import threading

import torch

from .._C import cuda_extension
from ..vocab import HIST_BINS, dtype_code, key_mode, partition_geometry
from .base import Backend, NonFiniteInput

_BIG_PART = 1 << 20  # partitions at least this long use the grid-wide kernel, one launch chain each
_MAX_BIG_PARTS = 8


class CudaBackend(Backend):
    name = "cuda"

    def __init__(self):
        self._fallback = None
        self._lock = threading.Lock()

    def _ext(self):
        return cuda_extension().module

    def available(self):
        ext = cuda_extension()
        if not ext.available:
            return False, f"the CUDA extension dppa_kernels._cuda is {ext.reason}"
        if not torch.cuda.is_available():
            return False, "no CUDA device is visible"
        return True, ""

    def supports(self, device):
        return torch.device(device).type == "cuda"

    # -- select / histogram: CUDA C++ -------------------------------------------------------

    def select(self, x, k, partition, block_size, key_dtype, *, check_finite=False):
        mode, nbits = key_mode(x.dtype, key_dtype)
        part_len, n_parts = partition_geometry(x.shape, partition, block_size)
        n = x.numel()
        if n_parts == 0 or n == 0:
            z = torch.zeros(n_parts, dtype=torch.int64)
            return torch.full((n_parts,), 1 << nbits, dtype=torch.int64), z, z.clone()
        ext = self._ext()
        k = k.to(torch.int64).cpu()
        with torch.cuda.device(x.device):
            stream = torch.cuda.current_stream(x.device).cuda_stream
            if n_parts <= _MAX_BIG_PARTS and (n_parts == 1 or part_len >= _BIG_PART):
                # rows: τ, c_above, c_eq, NaN/Inf keys (counted by the select's first pass)
                out = torch.zeros(n_parts, 4, dtype=torch.int64, device=x.device)
                hist = torch.zeros(HIST_BINS, dtype=torch.int64, device=x.device)  # read as uint64
                state = torch.zeros(5, dtype=torch.int64, device=x.device)
                esize = x.element_size()
                for p in range(n_parts):
                    start = p * part_len
                    length = min(part_len, n - start)
                    kp = int(k[p])
                    if kp <= 0 and not check_finite:
                        out[p, 0] = 1 << nbits
                        continue
                    # k = 0 under the check: a k = 1 select reads the partition; only its count is kept
                    ext.select_tensor(x.data_ptr() + start * esize, length, dtype_code(x.dtype), mode, max(kp, 1),
                                      hist.data_ptr(), state.data_ptr(), out[p].data_ptr(), stream)
                    if kp <= 0:
                        out[p, :3] = torch.tensor([1 << nbits, 0, 0], device=x.device)
                res = out.cpu().t()  # the result must reach the host
            else:
                kd = k.to(x.device)
                out = torch.empty(4, n_parts, dtype=torch.int64, device=x.device)
                ext.select_partitions(x.data_ptr(), n, part_len, n_parts, dtype_code(x.dtype), mode, kd.data_ptr(),
                                      bool(check_finite), out.data_ptr(), stream)
                res = out.cpu()
        if check_finite and bool(res[3].any()):
            raise NonFiniteInput((0,))
        return res[0].contiguous(), res[1].contiguous(), res[2].contiguous()

    def histogram(self, x, stats_dtype):
        mode, nbits = key_mode(x.dtype, stats_dtype)
        if nbits != 15:
            raise ValueError(f"stats_dtype must be bfloat16 or float16, got {stats_dtype}")
        with torch.cuda.device(x.device):
            hist = torch.zeros(HIST_BINS, dtype=torch.int64, device=x.device)
            if x.numel():
                self._ext().histogram15(x.data_ptr(), x.numel(), dtype_code(x.dtype), mode, hist.data_ptr(),
                                        torch.cuda.current_stream(x.device).cuda_stream)
            return hist.cpu()

    # -- apply / abs_sums: the Triton kernels (or torch) ------------------------------------

    def _elementwise(self):
        with self._lock:
            if self._fallback is None:
                from .triton import TritonBackend

                tb = TritonBackend()
                if tb.available()[0]:
                    self._fallback = tb
                else:
                    from .torch_backend import TorchBackend

                    self._fallback = TorchBackend()
            return self._fallback

    def apply(self, deltas, base, plans, weights, combine, out_dtype, *, check_finite=()):
        return self._elementwise().apply(deltas, base, plans, weights, combine, out_dtype, check_finite=check_finite)

    def abs_sums(self, delta, plan):
        return self._elementwise().abs_sums(delta, plan)

    @property
    def select_many(self):
        """The Triton backend's one-launch ``select_many``, or None without triton."""
        fb = self._elementwise()
        return fb.select_many if fb.name == "triton" else None

    @property
    def della_mask(self):
        """The Triton backend's ``della_mask`` (bit-identical to every backend), or None without triton."""
        fb = self._elementwise()
        return fb.della_mask if fb.name == "triton" else None
