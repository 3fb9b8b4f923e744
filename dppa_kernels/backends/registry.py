"""Backend registry: availability (computed once), ``auto`` selection and forced backends.

``backend="auto"`` picks, for the tensor's device: CUDA → the CUDA extension, else Triton, else
torch; CPU → the C++ extension, else torch. A forced backend that is unavailable raises a
``RuntimeError`` with the reason; an auto-selected fallback logs one warning per backend.
The environment variable ``DPPA_KERNELS_BACKEND`` replaces ``"auto"``.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading

import torch

from .base import Backend

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "reference", "torch", "cpu", "triton", "cuda")
_MODULES = {
    "torch": ("dppa_kernels.backends.torch_backend", "TorchBackend"),
    "cpu": ("dppa_kernels.backends.cpu", "CpuBackend"),
    "triton": ("dppa_kernels.backends.triton", "TritonBackend"),
    "cuda": ("dppa_kernels.backends.cuda", "CudaBackend"),
}
_lock = threading.Lock()
_instances: dict[str, object] = {}
_warned: set[str] = set()


class _Unavailable:
    def __init__(self, reason: str):
        self.reason = reason

    def available(self):
        return False, self.reason


def get_backend(name: str):
    """The backend object for ``name`` (an object whose ``available()`` says why when not)."""
    with _lock:
        if name not in _instances:
            mod, cls = _MODULES[name]
            try:
                _instances[name] = getattr(importlib.import_module(mod), cls)()
            except Exception as exc:  # missing module or dependency: record why
                _instances[name] = _Unavailable(f"{mod} could not be imported: {exc!r}")
        return _instances[name]


def availability() -> dict[str, tuple[bool, str]]:
    """{backend: (available, reason)} for every concrete backend."""
    out = {"reference": (True, "")}
    for name in _MODULES:
        try:
            out[name] = tuple(get_backend(name).available())
        except Exception as exc:
            out[name] = (False, repr(exc))
    return out


def requested(backend: str) -> str:
    """The request ``backend``, checked, with ``"auto"`` replaced by ``DPPA_KERNELS_BACKEND`` when
    that is set: the variable means "pass this backend to every op" (merge ops and PAT alike)."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get("DPPA_KERNELS_BACKEND", "auto")
        if backend not in BACKENDS:
            raise ValueError(f"DPPA_KERNELS_BACKEND must be one of {BACKENDS}, got {backend!r}")
    return backend


def resolve(backend: str, device: torch.device) -> str:
    """Name of the backend that will run on ``device`` for the request ``backend``."""
    backend = requested(backend)
    if backend == "reference":
        return "reference"
    if backend != "auto":
        b = get_backend(backend)
        ok, why = b.available()
        if not ok:
            raise RuntimeError(
                f"backend {backend!r} is not available: {why}. Reinstall with the extension built "
                f"(pip install --no-build-isolation -e .) or pass backend='auto'."
            )
        if not b.supports(device):
            raise RuntimeError(f"backend {backend!r} does not run on device {device}")
        return backend
    chain = ("cuda", "triton", "torch") if device.type == "cuda" else ("cpu", "torch")
    for name in chain:
        b = get_backend(name)
        ok, why = b.available()
        if ok and b.supports(device):
            return name
        if name not in _warned and name != "torch":
            _warned.add(name)
            logger.warning("dppa_kernels: %s backend unavailable (%s); falling back", name, why)
    return "torch"
