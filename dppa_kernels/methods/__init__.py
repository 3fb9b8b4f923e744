"""Merge methods and sparsifiers, one module each, and the presets built from them.

:mod:`.registry` holds the definitions' types and the lookup; each other module defines one
family (its sparsifier and the merge methods that use it). :func:`preset` turns a method's name
and mergekit-style parameters into what :func:`dppa_kernels.merge_deltas` runs.
"""

from __future__ import annotations

from typing import Any, Mapping

from ..spec import CombineSpec
from .registry import MergeMethod, Param, Sparsifier, engine_methods, get_method, get_sparsifier, methods, \
    per_model, register, sparsifiers


def preset(method: str, n_models: int, params: Mapping[str, Any]) -> tuple[list, list, CombineSpec]:
    """(weights, specs, combine) for ``method`` with mergekit-style ``params``.

    ``params`` holds the method's parameters (:attr:`MergeMethod.params` of stage ``merge``):
    global values, or per-model lists for per-model ones.
    """
    from . import _common as C

    mm = get_method(method)
    valid = mm.names(stage="merge") + tuple(mm.defaults)
    unknown = set(params) - set(valid)
    if unknown:
        raise ValueError(f"unknown parameter(s) {sorted(unknown)} for method {method!r}; valid: {sorted(valid)}")
    p = dict(mm.defaults)
    p.update(params)
    m = n_models
    weights = per_model(p.get("weight", 1.0), m, "weight")
    rescale = p.get("rescale")
    rescale = mm.rescale if rescale is None else rescale
    rescale = "l1" if rescale is True else ("none" if rescale in (False, None) else rescale)
    sp = get_sparsifier(mm.sparsifier)
    # a method without one of these parameters takes the shared parameter's default
    common = dict(tie_mode=p.get("tie_mode", C.TIE_MODE.default), partition=p.get("partition", C.PARTITION.default),
                  block_size=p.get("block_size", C.BLOCK_SIZE.default), rescale=rescale)
    specs = [sp.spec(i, p, m, common) for i in range(m)]
    combine = CombineSpec(
        combine=mm.combine,
        elect=p.get("elect", C.ELECT.default),
        divisor=p.get("divisor", C.DIVISOR.default),
        normalize=bool(p.get("normalize", mm.normalize)),
        lam=float(p.get("lambda", C.LAMBDA.default)),
    )
    return [float(w) for w in weights], specs, combine


def __getattr__(name: str):
    # the DPPA method's own names, from its module (imported on first use)
    if name in ("DPPA_DEFAULTS", "LEVEL_PARAMS", "NONUNIT_MODES", "nonunit_spec"):
        from . import dppa

        return getattr(dppa, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["MergeMethod", "Param", "Sparsifier", "engine_methods", "get_method", "get_sparsifier", "methods",
           "preset", "register", "sparsifiers"]
