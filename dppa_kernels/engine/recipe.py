"""Each tensor's merge recipe, built and validated once in the plan stage.

A recipe is what the merge of one tensor needs beyond its values: one weight and one
``SparsifySpec`` per model, the ``CombineSpec``, and whether the tensor is merged or the base is
copied. Tensors with the same resolved parameters share one recipe (a :class:`RecipeBook`
memoises them), so the merge loop builds no preset and validates no spec. DPPA's unit tensors
get theirs once the allocation is known (:meth:`RecipeBook.for_unit`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional, Sequence

from .. import _validate as V
from ..dppa.allocation import resolve_options
from ..dppa.defaults import resolve_alphas
from ..methods import nonunit_spec, preset
from ..spec import CombineSpec
from .config import is_dppa
from .errors import MergeError, brief, clip


@dataclass(frozen=True)
class Recipe:
    weights: tuple
    specs: tuple  # one SparsifySpec per model
    combine: CombineSpec
    mode: str = "merge"  # or "base": the output is the base tensor (DPPA nonunit_mode base)


def dppa_alphas(task, levels: list, labels: Sequence[str]) -> list:
    """Each model's band factors: its ``alphas`` (factors or a preset name), else the default preset."""
    given = task.merge_params.get("alphas") or [None] * len(levels)
    return [list(resolve_alphas(a, len(lv), what=f"model {brief(label)}: alphas"))
            for lv, a, label in zip(levels, given, labels)]


def _specs(task, method: str, n: int, levels, unit_densities, labels) -> tuple:
    """(weights, specs, combine, mode) of one tensor, before validation."""
    p = dict(task.merge_params)
    if not is_dppa(method):
        w, specs, combine = preset(method, n, p)
        return w, specs, combine, "merge"
    alphas = dppa_alphas(task, levels, labels)
    opts = resolve_options({**p, **task.dppa_params})
    p.update(opts.spec)
    p["alphas"] = alphas
    p["densities"] = unit_densities if task.unit else levels
    w, specs, combine = preset(method, n, p)
    if task.unit:
        if opts.official:  # a unit at density 1 still drops its minima
            specs = [s.with_(density1_prunes_min=True) for s in specs]
        return w, specs, combine, "merge"
    if opts.nonunit_mode == "base":
        return w, specs, combine, "base"  # the base tensor itself, bit for bit
    return w, [nonunit_spec(opts.nonunit_mode, s, lv) for s, lv in zip(specs, levels)], combine, "merge"


def build_recipe(task, method: str, n: int, *, levels=None, unit_densities=None, labels=()) -> Recipe:
    """The validated recipe of one tensor; MergeError names the tensor and the bad value."""
    try:
        w, specs, combine, mode = _specs(task, method, n, levels, unit_densities, labels)
        for i, s in enumerate(specs):
            V.check_sparsify_spec(s, f"model {i}")
        V.check_combine_spec(combine)
    except (ValueError, TypeError) as exc:
        raise MergeError(f"tensor {brief(task.name)}: invalid parameters for {method}: {clip(exc)}") from None
    if len(w) != n:
        raise MergeError(f"tensor {brief(task.name)}: {len(w)} weights for {n} models")
    return Recipe(tuple(float(x) for x in w), tuple(specs), combine, mode)


class RecipeBook:
    """One :class:`Recipe` per distinct parameter set of a merge (memoised)."""

    def __init__(self, method: str, n_models: int, levels: Optional[list], labels: Sequence[str]):
        self.method, self.n, self.levels, self.labels = method, n_models, levels, list(labels)
        self._memo: dict = {}

    def for_task(self, task) -> Recipe:
        """The recipe of a floating tensor. For a DPPA unit this validates the parameters at the
        uniform levels; the unit's own recipe comes from :meth:`for_unit` after the allocation."""
        key = (json.dumps(task.merge_params, sort_keys=True, default=repr),
               json.dumps(task.dppa_params, sort_keys=True, default=repr), task.unit)
        got = self._memo.get(key)
        if got is None:
            got = self._memo[key] = build_recipe(task, self.method, self.n, levels=self.levels,
                                                 unit_densities=self.levels, labels=self.labels)
        return got

    def for_unit(self, task, densities: list) -> Recipe:
        """A DPPA unit's recipe at its allocated densities (one list of levels per model)."""
        return build_recipe(task, self.method, self.n, levels=self.levels, unit_densities=densities,
                            labels=self.labels)
