"""What the integrations share: optional imports with an install hint, and the autograd rule."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Iterable

import torch


def require(module: str, extra: str, what: str) -> ModuleType:
    """Import ``module`` or raise an ImportError naming the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        raise ImportError(
            f"{what} needs {top!r}, which is not installed: pip install 'dppa-kernels[{extra}]' "
            f"(or pip install {top})"
        ) from exc


def records_grad(tensors: Iterable) -> bool:
    """Whether autograd records an op on these inputs: our kernels are not differentiable, so the
    integrations then run differentiable code (the host library's own, or our reference)."""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)
