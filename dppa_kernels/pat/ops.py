"""Public HSM op: validate once, then dispatch to the fused Triton kernel or the torch reference.

Backends: ``"triton"`` (``dppa_kernels.kernels.hsm``: CUDA tensors, or CPU tensors when the
kernels are interpreted, i.e. ``TRITON_INTERPRET=1`` was set before triton was imported) and
``"torch"`` (``dppa_kernels.pat.reference.hsm_ref`` under autograd). ``backend="auto"`` (or the
env ``DPPA_KERNELS_BACKEND=triton|torch``) picks Triton when it can run on the tensors' device and
falls back to torch otherwise, with one logged warning when CUDA tensors could not use Triton. A
forced backend that cannot run raises. Importing this module never imports triton.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import torch

from .reference import hsm_ref

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "triton", "torch")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TRITON: dict = {}
_WARNED: set = set()


def triton_status() -> tuple[bool, str]:
    """(available, reason) of the Triton HSM kernels, computed once.
    ``DPPA_KERNELS_DISABLE_TRITON=1`` disables them."""
    if "status" not in _TRITON:
        if os.environ.get("DPPA_KERNELS_DISABLE_TRITON", "0") not in ("", "0"):
            _TRITON["status"] = (False, "disabled by DPPA_KERNELS_DISABLE_TRITON")
        else:
            try:
                from dppa_kernels.kernels import hsm as mod

                _TRITON["module"] = mod
                _TRITON["status"] = (True, "interpreted" if mod.is_interpreted() else "compiled")
            except Exception as exc:  # triton missing or broken: the torch reference serves
                _TRITON["status"] = (False, f"triton is not importable: {exc!r}")
    return _TRITON["status"]


def _triton_runs_on(device: torch.device) -> tuple[bool, str]:
    ok, why = triton_status()
    if not ok:
        return False, why
    if device.type == "cuda" or (device.type == "cpu" and why == "interpreted"):
        return True, ""
    return False, f"the Triton kernels are {why} and cannot run on {device.type} tensors"


def select_backend(backend: str, device: torch.device) -> str:
    """Resolve ``backend`` for tensors on ``device`` (see the module docstring)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        env = os.environ.get("DPPA_KERNELS_BACKEND", "auto").strip().lower()
        backend = env if env in ("triton", "torch") else "auto"
        forced = backend != "auto"
    else:
        forced = True
    if backend == "torch":
        return "torch"
    ok, why = _triton_runs_on(device)
    if ok:
        return "triton"
    if forced:
        raise RuntimeError(f"backend='triton' was requested for the HSM op but {why}; "
                           "pass backend='torch' or 'auto'")
    if device.type == "cuda" and why not in _WARNED:
        _WARNED.add(why)
        logger.warning("HSM op: falling back to the torch reference on CUDA: %s", why)
    return "torch"


def _check(name: str, t: Optional[torch.Tensor], shape: tuple, device: torch.device) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but y is on {device}")


def hsm(y: torch.Tensor, l0: torch.Tensor, l1: torch.Tensor, s: Optional[torch.Tensor],
        m: torch.Tensor, residual: Optional[torch.Tensor] = None, *,
        out_dtype: Optional[torch.dtype] = None, backend: str = "auto") -> torch.Tensor:
    """HSM forward with autograd:

        out = s ⊙ m ⊙ (y + (y L0ᵀ) L1ᵀ)  [+ residual]

    y, residual: [..., d] (same dtype); L0: [r, d]; L1: [d, r]; s: [d] or None (no scale);
    m: [d] gate (differentiable: its gradient flows to the mask proxy). Gradients for y, L0, L1,
    s, m and residual. Output dtype = y's dtype; epilogue math in fp32.
    """
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"y must be a torch.Tensor, got {type(y).__name__}")
    if y.dim() < 1 or y.shape[-1] == 0:
        raise ValueError(f"y must have a non-empty last (hidden) dimension, got shape "
                         f"{tuple(y.shape)}")
    d = y.shape[-1]
    if not isinstance(l0, torch.Tensor) or l0.dim() != 2:
        raise ValueError(f"l0 must be a 2-D tensor [r, d], got {getattr(l0, 'shape', l0)}")
    r = l0.shape[0]
    _check("y", y, tuple(y.shape), y.device)
    _check("l0", l0, (r, d), y.device)
    _check("l1", l1, (d, r), y.device)
    _check("s", s, (d,), y.device)
    _check("m", m, (d,), y.device)
    _check("residual", residual, tuple(y.shape), y.device)
    if out_dtype is not None and out_dtype not in _FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be float32, bfloat16, float16 or None, got {out_dtype}")
    out_dtype = out_dtype or y.dtype
    if residual is not None and residual.dtype != out_dtype:
        raise TypeError(f"residual must have the output dtype {out_dtype}, got {residual.dtype}")
    if r == 0:
        raise ValueError("l0 has rank 0; the HSM needs r >= 1")
    if select_backend(backend, y.device) == "triton":
        return _TRITON["module"].hsm_fused(y, l0, l1, s, m, residual, out_dtype)
    return hsm_ref(y, l0, l1, s, m, residual, out_dtype=out_dtype)
