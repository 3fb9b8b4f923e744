"""The one place that loads the compiled modules.

Each extension is in one of three states: loaded, not built, or load error. A module whose
exported codes and limits (``VOCAB``) differ from :mod:`dppa_kernels.vocab` (a stale build) counts
as a load error: a backend must never misread a dtype or combine code. Importing this module
never raises; the reason a module is missing is kept and reported when its backend is requested
(and by ``python -m dppa_kernels info``). Set ``DPPA_KERNELS_MORE_DETAILS=1`` for the traceback.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Optional

logger = logging.getLogger(__name__)

_BUILD_INFO_PATH = Path(__file__).with_name("_build_info.json")


def build_info() -> dict:
    """Build metadata written by setup.py (empty when the package was not built by setup.py)."""
    try:
        return json.loads(_BUILD_INFO_PATH.read_text())
    except (OSError, ValueError):
        return {}


@dataclass
class Extension:
    name: str
    module: Optional[ModuleType]
    reason: str  # why it is unavailable ("" when loaded)

    @property
    def available(self) -> bool:
        return self.module is not None


def _load(modname: str, key: str) -> Extension:
    info = build_info()
    try:
        mod = importlib.import_module(f"dppa_kernels.{modname}")
    except ModuleNotFoundError:
        status = info.get(key, "not built (package installed without running setup.py build)")
        if status == "built":
            status = "was configured to build but is missing (its compilation failed; see pip -v)"
        return Extension(modname, None, f"not built: {status}")
    except Exception as exc:  # ABI mismatch, missing shared library, ...
        detail = traceback.format_exc() if os.environ.get("DPPA_KERNELS_MORE_DETAILS") else ""
        built_for = {k: info.get(k) for k in ("torch", "torch_cuda", "python") if k in info}
        reason = f"load error: {exc!r} (built for {built_for or 'unknown'})"
        logger.warning("dppa_kernels.%s could not be loaded: %s%s", modname, reason, detail)
        return Extension(modname, None, reason)
    return checked_vocab(Extension(modname, mod, ""))


def checked_vocab(ext: Extension) -> Extension:
    """``ext`` itself when its exported VOCAB matches :mod:`dppa_kernels.vocab`, else unavailable."""
    from .vocab import vocab_mismatch

    diff = vocab_mismatch(getattr(ext.module, "VOCAB", None))
    if not diff:
        return ext
    reason = (f"load error: its codes and limits differ from dppa_kernels.vocab ({diff[:300]}); "
              "rebuild it: pip install --no-build-isolation -e .")
    logger.warning("dppa_kernels.%s is not used: %s", ext.name, reason)
    return Extension(ext.name, None, reason)


_CACHE: dict[str, Extension] = {}


def cpu_extension() -> Extension:
    if "cpu" not in _CACHE:
        if os.environ.get("DPPA_KERNELS_DISABLE_CPU"):
            _CACHE["cpu"] = Extension("_cpu", None, "disabled by DPPA_KERNELS_DISABLE_CPU")
        else:
            _CACHE["cpu"] = _load("_cpu", "cpu")
    return _CACHE["cpu"]


def cuda_extension() -> Extension:
    if "cuda" not in _CACHE:
        if os.environ.get("DPPA_KERNELS_DISABLE_CUDA"):
            _CACHE["cuda"] = Extension("_cuda", None, "disabled by DPPA_KERNELS_DISABLE_CUDA")
        else:
            _CACHE["cuda"] = _load("_cuda", "cuda")
    return _CACHE["cuda"]
