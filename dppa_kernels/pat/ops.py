"""Public HSM op: validate once, then dispatch to the fused Triton kernel or the torch reference.

The backend is chosen like every other op's (``dppa_kernels.backends.registry``): ``backend``
takes the same names, and ``"auto"`` is replaced by ``DPPA_KERNELS_BACKEND`` when that is set.
The HSM has two implementations: ``"triton"`` (``dppa_kernels.kernels.hsm``: CUDA tensors, or CPU
tensors when the kernels are interpreted, i.e. ``TRITON_INTERPRET=1`` was set before triton was
imported) and the torch reference under autograd (``dppa_kernels.pat.reference.hsm_ref``), which
``"torch"`` and ``"reference"`` select. ``"auto"`` picks Triton when the registry's Triton
backend runs on the tensors' device and the HSM kernels import, else the reference, with one
logged warning when CUDA tensors could not use Triton. A forced backend that cannot run raises;
``"cpu"`` and ``"cuda"`` (the C++/CUDA extensions, which have no HSM kernel) raise a ValueError
naming where the request came from. Importing this module never imports triton.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from ..backends.registry import BACKENDS, get_backend, requested
from .reference import hsm_ref

logger = logging.getLogger(__name__)

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TRITON: dict = {}
_WARNED: set = set()


def triton_status() -> tuple[bool, str]:
    """(available, reason) of the Triton HSM kernels, computed once."""
    if "status" not in _TRITON:
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
    be = get_backend("triton")
    ok, reason = be.available()
    if not ok:
        return False, reason
    if not be.supports(device):
        return False, f"the Triton kernels are {why} and cannot run on {device.type} tensors"
    return True, ""


def select_backend(backend: str, device: torch.device) -> str:
    """``"triton"`` or ``"torch"`` (the reference) for tensors on ``device`` (module docstring)."""
    req = requested(backend)
    source = "DPPA_KERNELS_BACKEND" if backend == "auto" else "backend"
    if req in ("torch", "reference"):
        return "torch"
    if req in ("cpu", "cuda"):
        raise ValueError(f"{source}={req!r}: the HSM op has no {req} kernel; it runs on 'triton' or 'torch' "
                         "(or pass backend='auto' with DPPA_KERNELS_BACKEND unset)")
    ok, why = _triton_runs_on(device)
    if ok:
        return "triton"
    if req == "triton":
        raise RuntimeError(f"{source}='triton' was requested for the HSM op but {why}; "
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
