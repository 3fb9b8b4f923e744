"""DPPA end to end: statistics, allocation, band thresholds, apply, and the α search.

:class:`DPPA` is the whole-model, in-memory API; the engine (``dppa merge``) and the mergekit
integration use the same statistics (:mod:`.stats`), allocation (:mod:`.allocation`) and
thresholds (:mod:`.thresholds`). Defaults and presets: :mod:`.defaults` (import-free, so the
method presets can read them; the other names load on first use).
"""

from __future__ import annotations

import importlib

from .defaults import DEFAULT_DENSITIES, PRESETS, default_alphas, resolve_alphas

_LAZY = {"DPPA": "model", "DPSettings": "allocation", "allocate": "allocation", "mean_density": "allocation",
         "SearchError": "search", "SearchResult": "search", "search": "search", "UnitBands": "thresholds",
         "factors_of": "thresholds", "stats": None, "thresholds": None,
         "allocation": None, "model": None}

__all__ = ["DEFAULT_DENSITIES", "PRESETS", "default_alphas", "resolve_alphas", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    mod = importlib.import_module(f".{_LAZY[name] or name}", __name__)
    value = mod if _LAZY[name] is None else getattr(mod, name)
    globals()[name] = value
    return value
