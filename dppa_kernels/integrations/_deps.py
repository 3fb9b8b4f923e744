"""Optional dependencies: import on first use, with an install hint when missing."""

from __future__ import annotations

import importlib
from types import ModuleType


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
