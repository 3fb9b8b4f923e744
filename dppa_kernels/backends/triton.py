"""Triton backend: the primitives of ``backends.base`` as Triton kernels (``dppa_kernels.kernels``).

Runs on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` was set before triton was
imported (the CI configuration). Kernels launch on the current stream of the tensor's device under
a device guard; the only synchronisations are the copies of results that must reach the host
(select's τ/counts, the histogram, the L1 sums) and, for fp32 keys, whether select's collect pass
finished. No global mutable state.

Extra memory per call (no per-element temporaries): select O(P) int64 + a ≤ 64 K-key sample (fp32
keys: + a candidate buffer of max(64 K, n/512) int32, all of x below 1 M elements);
histogram 256 KB; apply O(P·K + N/BLOCK) int64 of plan metadata; the output. ``della_mask``: the
bool mask only for rows sorted on-chip; for longer rows 2–4 B (bf16/fp16) or about 32 B (fp32) per
element of a row batch (``kernels.della``).
"""

from __future__ import annotations

import contextlib
import os

import torch

from .base import Backend, NonFiniteInput


def _import_kernels():
    from ..kernels import apply as kapply  # noqa: F401  (imports triton)
    from ..kernels import della as kdella
    from ..kernels import histogram as khist
    from ..kernels import select as kselect
    from ..kernels import select_many as kmany

    return kselect, khist, kapply, kdella, kmany


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


class TritonBackend(Backend):
    name = "triton"
    # Its histogram does one global atomic per element, and realistic deltas put most keys into
    # a few hot bins, where the atomics serialise: one exact select per level costs far less.
    levels_from_histogram = False

    def __init__(self):
        self._mods = None
        self._why = ""
        try:
            self._mods = _import_kernels()
        except Exception as exc:  # triton missing or broken: report, never raise at import
            self._why = f"triton is not importable ({exc.__class__.__name__}: {exc}); pip install triton"

    def available(self):
        if self._mods is None:
            return False, self._why
        if not torch.cuda.is_available() and not _interpreting():
            return False, "no CUDA device (set TRITON_INTERPRET=1 before importing triton to run on the CPU)"
        return True, ""

    def supports(self, device):
        device = torch.device(device)
        return device.type == "cuda" or (device.type == "cpu" and _interpreting())

    def select(self, x, k, partition, block_size, key_dtype, *, check_finite=False):
        with _guard(x):
            res = self._mods[0].select(x, k, partition, block_size, key_dtype, check_finite=check_finite)
        if check_finite:
            if int(res[3]):
                raise NonFiniteInput((0,))
            return res[:3]
        return res

    def select_many(self, xs, ks, key_dtype, *, check_finite=False):
        if not xs:
            z = torch.zeros(0, dtype=torch.int64)
            return z, z.clone(), z.clone()
        with _guard(xs[0]):
            res = self._mods[4].select_many(xs, ks, key_dtype)
        if check_finite and bool(res[3].any()):
            raise NonFiniteInput(res[3].nonzero().flatten().tolist())
        return res[0], res[1], res[2]

    def histogram(self, x, stats_dtype):
        with _guard(x):
            return self._mods[1].histogram(x, stats_dtype)

    def apply(self, deltas, base, plans, weights, combine, out_dtype, *, check_finite=()):
        with _guard(deltas[0]):
            res = self._mods[2].apply(deltas, base, plans, weights, combine, out_dtype, check_finite=check_finite)
        if not check_finite:
            return res
        out, counts = res
        bad = [i for i in check_finite if int(counts[i])]
        if bad:
            raise NonFiniteInput(bad)
        return out

    def abs_sums(self, delta, plan):
        with _guard(delta):
            return self._mods[2].abs_sums(delta, plan)

    def della_mask(self, delta, density, epsilon, k1, k2):
        with _guard(delta):
            return self._mods[3].della_mask(delta, density, epsilon, k1, k2)
