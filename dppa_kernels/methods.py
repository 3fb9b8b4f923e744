"""Merge-method presets: mergekit's method names and parameters → SparsifySpec / CombineSpec.

Semantics follow mergekit 0.1.5's generalized task arithmetic (PEERS.md §1.3–§1.6):

| method | sparsifier | combine | normalize | rescale |
|---|---|---|---|---|
| task_arithmetic | – | sum | F | F |
| ties | magnitude | ties | T | F |
| dare_ties | dare | ties | F | T (L1) |
| dare_linear | dare | sum | F | T (L1) |
| breadcrumbs | breadcrumbs | sum | F | F |
| breadcrumbs_ties | breadcrumbs | ties | F | F |
| della | della | ties | T | T (L1) |
| della_linear | della | sum | F | T (L1) |
| dppa | bands (DP densities) | sum | F | – |
| dppa_ties | bands (DP densities) | ties | T | – |

``rescale=True`` means mergekit's L1-norm match; ``rescale="inv_density"`` selects 1/density.
mergekit 0.1.5's ``magnitude`` keeps max(1, floor(d·n)) elements: count_rule ``min1``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from .dppa.defaults import DEFAULT_DENSITIES, DEFAULT_TIE_MODE, default_alphas
from .spec import CombineSpec, SparsifySpec

METHODS = {
    # name: (sparsifier, consensus, default normalize, default rescale)
    "task_arithmetic": ("none", False, False, False),
    "linear": ("none", False, True, False),
    "ties": ("magnitude", True, True, False),
    "dare_ties": ("dare", True, False, True),
    "dare_linear": ("dare", False, False, True),
    "breadcrumbs": ("breadcrumbs", False, False, False),
    "breadcrumbs_ties": ("breadcrumbs", True, False, False),
    "della": ("della", True, True, True),
    "della_linear": ("della", False, False, True),
    "dppa": ("bands", False, False, False),
    "dppa_ties": ("bands", True, True, False),
}

PER_MODEL = ("weight", "density", "gamma", "epsilon", "densities", "alphas")
GLOBAL = ("normalize", "rescale", "lambda", "int8_mask", "tie_mode", "count_rule", "partition",
          "block_size", "elect", "divisor", "band_combine", "stats_dtype")
DPPA_DEFAULTS = {"densities": DEFAULT_DENSITIES, "alphas": default_alphas(len(DEFAULT_DENSITIES)),
                 "tie_mode": DEFAULT_TIE_MODE, "count_rule": "dppa",
                 "band_combine": "max", "stats_dtype": "bfloat16"}

_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
           "fp16": torch.float16}


def per_model(value: Any, m: int, name: str) -> list:
    """Broadcast a scalar parameter to M models, or check a per-model list's length."""
    if isinstance(value, (list, tuple)) and name not in ("densities", "alphas"):
        if len(value) != m:
            raise ValueError(f"{name} has {len(value)} values, expected one per model ({m})")
        return list(value)
    if name in ("densities", "alphas") and value and isinstance(value[0], (list, tuple)):
        if len(value) != m:
            raise ValueError(f"{name} has {len(value)} per-model lists, expected {m}")
        return [tuple(v) for v in value]
    return [tuple(value) if isinstance(value, (list, tuple)) else value] * m


def preset(method: str, n_models: int, params: Mapping[str, Any]) -> tuple[list, list, CombineSpec]:
    """(weights, specs, combine) for ``method`` with mergekit-style ``params``.

    ``params`` holds global values or per-model lists (``weight``, ``density``, ``gamma``,
    ``epsilon``, and for DPPA ``densities``/``alphas``).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {sorted(METHODS)}")
    unknown = set(params) - set(PER_MODEL) - set(GLOBAL)
    if unknown:
        raise ValueError(f"unknown parameter(s) {sorted(unknown)} for method {method!r}; "
                         f"valid: {sorted(PER_MODEL + GLOBAL)}")
    sparsifier, consensus, norm_default, rescale_default = METHODS[method]
    p = dict(DPPA_DEFAULTS) if sparsifier == "bands" else {}
    p.update(params)
    m = n_models
    weights = per_model(p.get("weight", 1.0), m, "weight")
    dens = per_model(p.get("density", 1.0), m, "density")
    rescale = p.get("rescale", rescale_default)
    rescale = "l1" if rescale is True else ("none" if rescale in (False, None) else rescale)
    specs = []
    for i in range(m):
        common = dict(tie_mode=p.get("tie_mode", "exact_k"), partition=p.get("partition", "tensor"),
                      block_size=p.get("block_size"), rescale=rescale, density=float(dens[i]))
        if sparsifier == "none":
            specs.append(SparsifySpec("none"))
        elif sparsifier == "magnitude":
            specs.append(SparsifySpec("magnitude", count_rule=p.get("count_rule", "min1"), **common))
        elif sparsifier == "dare":
            specs.append(SparsifySpec("dare", **common))
        elif sparsifier == "breadcrumbs":
            g = per_model(p.get("gamma", 0.01), m, "gamma")[i]
            specs.append(SparsifySpec("breadcrumbs", gamma=float(g), **common))
        elif sparsifier == "della":
            e = per_model(p.get("epsilon", 0.15), m, "epsilon")[i]
            specs.append(SparsifySpec("della", epsilon=float(e), **common))
        else:  # bands
            ds = per_model(p["densities"], m, "densities")[i]
            al = per_model(p["alphas"], m, "alphas")[i]
            sd = p.get("stats_dtype", "bfloat16")
            if sd not in _DTYPES:
                raise ValueError(f"stats_dtype must be one of {sorted(_DTYPES)}, got {sd!r}")
            common.pop("density")
            specs.append(SparsifySpec("bands", densities=tuple(float(x) for x in ds),
                                      alphas=tuple(float(a) for a in al),
                                      band_combine=p.get("band_combine", "max"),
                                      count_rule=p.get("count_rule", "dppa"),
                                      key_dtype=_DTYPES[sd], **common))
    combine = CombineSpec(
        combine="ties" if consensus else "sum",
        elect=p.get("elect", "weighted_sum"),
        divisor=p.get("divisor", "weights"),
        normalize=bool(p.get("normalize", norm_default)),
        lam=float(p.get("lambda", 1.0)),
    )
    return [float(w) for w in weights], specs, combine


def method_names() -> Sequence[str]:
    return tuple(METHODS)


NONUNIT_MODES = ("dense", "official", "base", "prune")


def nonunit_spec(nonunit_mode: str, unit_spec: SparsifySpec, levels: Sequence[float]) -> SparsifySpec:
    """How DPPA treats a non-unit tensor (embeddings, lm_head, norms, biases; DPPA.md §3.3, §7).

    ``dense``: Δ × 1 (default); ``official``: Δ × max α (what the official code does to every
    key); ``base``: Δ dropped; ``prune``: the unit's bands at the uniform levels (no DP offsets),
    same tie rule and factors.
    """
    if nonunit_mode == "dense":
        return SparsifySpec("none")
    if nonunit_mode == "official":
        return SparsifySpec("bands", densities=(1.0,), alphas=(max(unit_spec.alphas or (1.0,)),))
    if nonunit_mode == "base":
        return SparsifySpec("magnitude", density=0.0)
    if nonunit_mode == "prune":
        return unit_spec.with_(densities=tuple(float(x) for x in levels))
    raise ValueError(f"nonunit_mode must be one of {NONUNIT_MODES}, got {nonunit_mode!r}")
