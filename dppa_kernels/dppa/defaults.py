"""DPPA's default settings and the named band-factor presets (one home for both).

A preset names the amplification factors α of the bands, highest band first, for the two-level
setting (densities (0.1, 0.2)); for K levels each preset is extended as stated below.

| preset | α (K = 2) | keeps | what it is |
|---|---|---|---|
| ``plain`` (default) | (1.0, 1.0) | the outer density (20 %), values unchanged | plain DP at the outer level |
| ``top_only`` | (1.0, 0.0) | the inner density (10 %), values unchanged | plain DP at the inner level |
| ``official_start`` | (1.8, 0.0) | the inner density (10 %), × 1.8 | the official search's starting point |
| ``amplified`` | (1.8, 1.0) | the outer density (20 %); top band × 1.8 | DPPA with the top band amplified |
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence, Union

from ..vocab import DTYPE_NAMES, STATS_DTYPES

DEFAULT_DENSITIES = (0.1, 0.2)
DEFAULT_PRESET = "plain"
# exact_k: every level keeps exactly its count, so "density 0.2" realises 0.2 even with the many
# ties of bf16 deltas; the official rule ("gt", prune every tie at the threshold) undershoots by
# the tie share (a few % on the demo family) and stays available as tie_mode: gt.
DEFAULT_TIE_MODE = "exact_k"

# The settings that ``compat`` decides, with their defaults and their values under
# ``compat="official"`` (the official code's rules; docs/dppa.md lists what each changes).
COMPAT_MODES = ("none", "official")
DEFAULT_SETTINGS = {"tie_mode": DEFAULT_TIE_MODE, "nonunit_mode": "dense", "count_rule": "dppa",
                    "band_combine": "max", "stats_dtype": "bfloat16"}
OFFICIAL_SETTINGS = {"tie_mode": "gt", "nonunit_mode": "official", "count_rule": "dppa",
                     "band_combine": "max", "stats_dtype": "bfloat16"}


def check_compat(compat) -> Optional[str]:
    """``"official"`` or None (for None and ``"none"``); ValueError for anything else."""
    if compat is None or compat == "none":
        return None
    if compat != "official":
        raise ValueError(f"compat must be one of {', '.join(COMPAT_MODES)}, got {str(compat)[:40]!r}")
    return compat


def resolve_settings(compat, given: Mapping) -> dict:
    """The settings of :data:`DEFAULT_SETTINGS` for ``compat``: each given (not None) value, the
    default (or, under ``compat="official"``, the official value) for the rest. Under
    ``compat="official"`` a given value that contradicts the official one is a ValueError."""
    official = check_compat(compat) == "official"
    base = OFFICIAL_SETTINGS if official else DEFAULT_SETTINGS
    out = dict(base)
    for key, value in given.items():
        if key not in base or value is None:
            continue
        name = (DTYPE_NAMES[STATS_DTYPES[value]] if value in STATS_DTYPES else value) if isinstance(value, str) \
            else str(value).removeprefix("torch.")
        if official and name != base[key]:
            raise ValueError(f"compat official needs {key} {base[key]!r}, got {str(value)[:40]!r} "
                             f"(leave it unset or drop compat)")
        out[key] = value
    return out


def _plain(k: int) -> tuple:
    return (1.0,) * k


def _top_only(k: int) -> tuple:
    return (1.0,) + (0.0,) * (k - 1)


def _official_start(k: int) -> tuple:
    return (1.8,) + (0.0,) * (k - 1)


def _amplified(k: int) -> tuple:
    return (1.8,) + (1.0,) * (k - 1)


PRESETS = {"plain": _plain, "top_only": _top_only, "official_start": _official_start, "amplified": _amplified}


def default_alphas(k: int) -> tuple:
    """The factors used when none are given: the ``plain`` preset (1.0 on every band, so the
    realised density is the outermost level's)."""
    return PRESETS[DEFAULT_PRESET](k)


def resolve_alphas(alphas: Union[None, str, Sequence[float]], k: int, *, what: str = "alphas") -> tuple:
    """One factor per level from a preset name, explicit factors or None (the default preset).

    Factors must be finite and >= 0 and there must be ``k`` of them (``ValueError`` otherwise).
    """
    if alphas is None:
        return default_alphas(k)
    if isinstance(alphas, str):
        if alphas not in PRESETS:
            raise ValueError(f"{what}: unknown preset {alphas[:40]!r}; valid: {', '.join(PRESETS)}")
        return PRESETS[alphas](k)
    try:
        out = tuple(float(a) for a in alphas)
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be a preset name or a list of numbers, got {str(alphas)[:80]!r}") from None
    if len(out) != k:
        raise ValueError(f"{what} {out} must have one factor per density level ({k})")
    if any(not (a >= 0.0 and a < float("inf")) for a in out):
        raise ValueError(f"{what} {out}: factors must be finite and >= 0")
    return out
