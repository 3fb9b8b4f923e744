"""The method registry: each merge method and each sparsifier is defined once, in its own module
of this package, and everything else (config validation, argument checks, mergekit parameter
specs, the fast path's eligibility, the README's parameter table) is derived from it.

A *sparsifier* says what happens to one delta (the ``method`` of a :class:`~dppa_kernels.spec.SparsifySpec`):
its parameters, its check, its plan on a fast backend, its reference factor and how many
elements it kept. A *merge method* (mergekit's names, plus ours) pairs a sparsifier with a combine
rule and default switches. Modules register themselves with :func:`register`; the package's
modules are imported on the first lookup, so adding a method is adding a file (docs/architecture.md).
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from ..spec import SparsifySpec

SCOPES = ("model", "global")  # per-model (set per model or globally) / global only
STAGES = ("merge", "dppa")  # read by the merge presets / by the DPPA statistics pass only


@dataclass(frozen=True)
class Param:
    """One parameter of a merge method.

    ``type``: float, int, bool, str or list (a list of numbers that is a value by nature, never a
    layer gradient). ``low``/``high``: inclusive range of a number (or of each list item).
    ``mergekit``: part of the method's mergekit parameter spec (and so accepted by the fast path);
    ``required``: mergekit requires it (no default there). ``stage``: which part of a merge reads it.
    """

    name: str
    type: type
    default: Any
    scope: str
    doc: str
    low: Optional[float] = None
    high: Optional[float] = None
    choices: tuple = ()
    mergekit: bool = True
    required: bool = False
    stage: str = "merge"

    def check(self, value: Any, where: str) -> Any:
        """``value`` converted to the parameter's type; ValueError naming ``where`` when it is not one."""
        from ..engine.errors import brief  # lazily: the engine is not needed by the ops

        if self.type is bool:  # choices: other values it also takes
            if not isinstance(value, bool) and value not in self.choices:
                alt = "".join(f" or {c}" for c in self.choices)
                raise ValueError(f"{where}: {self.name} must be true or false{alt}, got {brief(value)}")
            return value
        if self.type in (float, int):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value \
                and abs(value) != float("inf")
            if self.type is int and ok and float(value) != int(value):
                ok = False
            if not ok:
                kind = "an integer" if self.type is int else "a finite number"
                raise ValueError(f"{where}: {self.name} must be {kind}, got {brief(value)}")
            self._range(value, where, f"{self.name} = {value}")
            return int(value) if self.type is int else float(value)
        if self.type is list:
            if not isinstance(value, list) or not value or not all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) for x in value):
                raise ValueError(f"{where}: {self.name} must be a non-empty list of numbers, got {brief(value)}")
            for x in value:
                self._range(x, where, f"{self.name} {brief(value)} has a value that")
            return [float(x) for x in value]
        if self.choices and value not in self.choices:
            raise ValueError(f"{where}: {self.name} must be one of {', '.join(map(str, self.choices))}, "
                             f"got {brief(value)}")
        return value

    def _range(self, x: float, where: str, what: str) -> None:
        if (self.low is not None and x < self.low) or (self.high is not None and x > self.high):
            lo = "-inf" if self.low is None else f"{self.low:g}"
            hi = "inf" if self.high is None else f"{self.high:g}"
            raise ValueError(f"{where}: {what} is outside [{lo}, {hi}]")


def per_model(value: Any, m: int, name: str, lists: bool = False) -> list:
    """Broadcast a scalar parameter to M models, or check a per-model list's length. ``lists``:
    the value is itself a list (one for all models, or one list per model)."""
    if isinstance(value, (list, tuple)) and not lists:
        if len(value) != m:
            raise ValueError(f"{name} has {len(value)} values, expected one per model ({m})")
        return list(value)
    if lists and value and isinstance(value[0], (list, tuple)):
        if len(value) != m:
            raise ValueError(f"{name} has {len(value)} per-model lists, expected {m}")
        return [tuple(v) for v in value]
    return [tuple(value) if isinstance(value, (list, tuple)) else value] * m


class Sparsifier:
    """What happens to one delta; subclasses override what they need.

    ``params``: the per-model parameters it reads (beside ``weight``). ``prune``: offered by
    :func:`dppa_kernels.prune`. ``uses_density``: ``SparsifySpec.density`` is its parameter.
    ``joint``: its plans depend on every delta of a merge at once (:meth:`joint_plans`,
    :meth:`joint_factors`) instead of on one delta each.
    """

    name: str = ""
    params: tuple = ()
    prune: bool = True
    uses_density: bool = True
    joint: bool = False
    mergekit: Optional[str] = None  # mergekit's SparsificationMethod value, for its GTA methods

    def spec(self, i: int, p: dict, m: int, common: dict) -> SparsifySpec:
        """Model i's spec from the method's parameters ``p`` (per-model values are scalars or lists
        of M) and the ``common`` fields. The default: each of :attr:`params` (``SparsifySpec``
        fields) at model i, its default where ``p`` does not set it."""
        own = {q.name: q.type(per_model(p.get(q.name, q.default), m, q.name)[i]) for q in self.params}
        return SparsifySpec(self.name, **own, **common)

    def check(self, s: SparsifySpec, argname: str) -> None:
        """Method-specific checks of a spec (the shared fields are checked by ``_validate``)."""

    def plan(self, be, delta: torch.Tensor, spec: SparsifySpec, *, seed: int, name: str, stream: int,
             check_as: Optional[str]):
        """The ApplyPlan of one delta on backend ``be`` (before the rescale)."""
        raise NotImplementedError

    def factor(self, delta: torch.Tensor, spec: SparsifySpec, *, seed: int, name: str, stream: int) -> torch.Tensor:
        """The reference: the per-element factor (float64) of one delta, before the rescale."""
        raise NotImplementedError

    def level_keeps(self, delta: torch.Tensor, spec: SparsifySpec) -> list:
        """A threshold sparsifier's keep count per partition (int64 vector) of each level its plan
        selects, nested levels in order (the counts its :meth:`plan` and :meth:`realised` share)."""
        raise NotImplementedError

    def target(self, spec: SparsifySpec):
        """The density ``spec`` asks for (the merge report's ``target``): a number, or one per level."""
        return spec.density

    def realised(self, delta: torch.Tensor, spec: SparsifySpec, *, seed: int, name: str, stream: int,
                 plan=None, backend: str = "reference") -> float:
        """The fraction of the (non-empty) ``delta``'s elements that survive ``spec``, exact; the
        one rule the merge report counts with. ``plan``: the ApplyPlan the merge applied (None: the
        reference merged); ``backend``: where a count that needs a pass of its own runs.

        The default reads what the plan holds: a dense plan keeps everything, a mask plan its
        mask's nonzeros, a thresholds plan what :func:`thresholds_kept` counts from its select
        results and :meth:`level_keeps`; without a plan, the reference factor's nonzeros."""
        n = delta.numel()
        kind = None if plan is None else plan.kind
        if kind == "dense":
            return 1.0
        if kind == "mask":  # the mask the merge drew: counted, not redrawn
            return int(torch.count_nonzero(plan.mask)) / n
        if kind == "thresholds":
            return thresholds_kept(plan, self.level_keeps(delta, spec)) / n
        f = self.factor(delta.cpu(), spec, seed=seed, name=name, stream=stream)
        return float((f != 0).sum()) / n

    def expected(self, spec: SparsifySpec, plan) -> Optional[float]:
        """The expected fraction kept, for a ``plan`` that holds no outcome, only the terms of a
        random draw (counting it would cost a pass as long as the merge's; the report then marks
        the value as expected). None: :meth:`realised` counts this plan cheaply."""
        return None

    def check_joint(self, specs: Sequence[SparsifySpec], argname: str) -> None:
        """A joint sparsifier's checks across the M specs of one merge."""

    def joint_plans(self, be, deltas: Sequence[torch.Tensor], specs: Sequence[SparsifySpec],
                    weights: Sequence[float]) -> list:
        """A joint sparsifier's M plans (with their rescale)."""
        raise NotImplementedError

    def joint_factors(self, deltas: Sequence[torch.Tensor], specs: Sequence[SparsifySpec],
                      weights: Sequence[float]) -> list:
        """A joint sparsifier's reference: M factors (float64), before the rescale."""
        raise NotImplementedError


def thresholds_kept(plan, keeps: Sequence[torch.Tensor]) -> int:
    """Elements a thresholds plan keeps with a non-zero factor, from its select results alone.

    In level j of partition p, #key > τ = k − budget (τ is the k-th largest key, ``keeps[j][p]``
    = k); ``gt`` keeps those, ``ge`` adds every tie (``c_eq``), ``exact_k`` adds ``budget`` ties:
    k in all. The levels nest, so level j holds the elements it adds to level j − 1, counted when
    its factor is non-zero."""
    kept, prev = 0, 0
    for j, k in enumerate(keeps):
        budget, eq = plan.budget[:, j], plan.c_eq[:, j]
        level = k if plan.tie_mode == "exact_k" else (k - budget) + (eq if plan.tie_mode == "ge" else 0)
        c = int(level.sum())
        kept += (c - prev) if plan.factors[j] != 0 else 0
        prev = c
    return kept


@dataclass(frozen=True)
class MergeMethod:
    """A merge method: out = base + λ · combine(w_i · sparsify(Δ_i)) [/ divisor].

    ``mergekit``: how mergekit knows it: ``"gta"`` (mergekit's own GeneralizedTaskArithmetic
    method, run on our kernels by ``install()``), ``"ours"`` (registered into mergekit by
    ``install()``) or None (not offered there). ``engine``: offered by ``dppa merge`` and the fast
    path. ``dppa``: needs the DPPA statistics pass.
    """

    name: str
    title: str
    sparsifier: str
    combine: str  # "sum" or "ties"
    normalize: bool
    rescale: bool
    params: tuple
    reference: str = ""  # arXiv id
    mergekit: Optional[str] = "gta"
    engine: bool = True
    dppa: bool = False
    defaults: dict = field(default_factory=dict)  # preset defaults beyond the params' own

    def param(self, name: str) -> Param:
        return next(p for p in self.params if p.name == name)

    def names(self, *, scope: Optional[str] = None, stage: Optional[str] = None,
              mergekit: Optional[bool] = None) -> tuple:
        return tuple(p.name for p in self.params if (scope is None or p.scope == scope)
                     and (stage is None or p.stage == stage) and (mergekit is None or p.mergekit == mergekit))


_lock = threading.RLock()
_SPARSIFIERS: dict = {}
_METHODS: dict = {}
_ORDER: dict = {}  # (name, is a method) -> (module, registration count)
_loaded: list = []


def register(*items) -> None:
    """Register sparsifiers (instances) and merge methods; a name is registered once. Listings
    follow the registering module's name, then the order within it, whatever imported it first."""
    module = sys._getframe(1).f_globals.get("__name__", "")
    with _lock:
        for it in items:
            table = _SPARSIFIERS if isinstance(it, Sparsifier) else _METHODS
            if it.name in table:
                raise ValueError(f"{type(it).__name__} {it.name!r} is registered twice")
            table[it.name] = it
            _ORDER[it.name, table is _METHODS] = (module, len(_ORDER))


def _sorted(table: dict) -> dict:
    kind = table is _METHODS
    return dict(sorted(table.items(), key=lambda kv: _ORDER[kv[0], kind]))


def _load() -> None:
    """Import every module of this package once (each registers what it defines)."""
    if _loaded:
        return
    with _lock:
        if _loaded:
            return
        from .. import methods as pkg

        for mod in sorted(m.name for m in pkgutil.iter_modules(pkg.__path__)):
            if not mod.startswith("_") and mod != "registry":
                importlib.import_module(f"{pkg.__name__}.{mod}")
        _loaded.append(True)


def sparsifiers() -> dict:
    _load()
    return _sorted(_SPARSIFIERS)


def methods() -> dict:
    """Every merge method, by name (registration order: module name, then order in the module)."""
    _load()
    return _sorted(_METHODS)


def get_sparsifier(name: str, argname: str = "method") -> Sparsifier:
    _load()
    if name not in _SPARSIFIERS:
        raise ValueError(f"{argname} must be one of {tuple(_SPARSIFIERS)}, got {name!r}")
    return _SPARSIFIERS[name]


def get_method(name: str) -> MergeMethod:
    _load()
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; valid: {sorted(_METHODS)}")
    return _METHODS[name]


def engine_methods() -> tuple:
    """The merge methods of ``dppa merge`` and the mergekit fast path."""
    return tuple(n for n, m in methods().items() if m.engine)
