"""Per-tensor parameter values from a mergekit config: precedence, gradients and filters.

Precedence: per model > global > method default. A list of numbers is a gradient interpolated
over layer depth (t = layer / (L − 1) for block tensors, t = 0 elsewhere, as mergekit's planner
does for a ``models:`` config); a list of ``{filter, value}`` picks the first condition whose
filter is a substring of the tensor name (``*`` or no filter matches all). Lists that are values
by nature (``densities``, ``alphas``, ``density_clamp``) are never gradients.
"""

from __future__ import annotations

from typing import Any, Optional

from ..dppa.defaults import DEFAULT_DENSITIES
from ..methods import LEVEL_PARAMS, get_method
from .config import MergeConfig
from .errors import MergeError, brief


def _scalar(v: Any) -> bool:
    return isinstance(v, (bool, int, float, str))


def evaluate(setting: Any, name: str, t: float, literal_list: bool = False) -> Any:
    """mergekit's ``evaluate_setting`` for one tensor (None when no condition matches)."""
    if isinstance(setting, dict):
        setting = [setting]
    if setting is None or _scalar(setting):
        return setting
    if all(isinstance(c, dict) for c in setting):
        for cond in setting:
            f = cond.get("filter")
            if f is None or f == "*" or (name and str(f) in name):
                return evaluate(cond["value"], name, t, literal_list)
        return None
    if literal_list:
        return list(setting)
    if not setting:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting):
        return setting[int(t * (len(setting) - 1))]
    scaled = t * (len(setting) - 1)
    i0 = int(scaled)
    i1 = min(len(setting) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * setting[i0] + frac * setting[i1]


def depth_t(layer: Optional[int], n_layers: int) -> float:
    if layer is None:
        return 0.0
    return layer / (n_layers - 1) if n_layers > 1 else 1.0


def _check_value(param, v: Any, where: str) -> Any:
    try:
        return param.check(v, where)
    except ValueError as exc:
        raise MergeError(str(exc)) from None


class ParamResolver:
    """Resolves every parameter of ``cfg`` for one tensor (name, layer) at a time."""

    def __init__(self, cfg: MergeConfig, n_layers: int):
        self.cfg = cfg
        self.method = cfg.merge_method
        self.spec = get_method(cfg.merge_method)
        self.n_layers = n_layers
        self.glob = dict(cfg.parameters or {})
        self.models = [dict(m.parameters or {}) for m in cfg.models]

    def _eval(self, key: str, setting: Any, name: str, t: float, where: str) -> Any:
        param = self.spec.param(key)
        v = evaluate(setting, name, t, literal_list=param.type is list)
        return None if v is None else _check_value(param, v, where)

    def per_model(self, key: str, name: str, layer: Optional[int]) -> list:
        """One value per model (None where neither the model nor the global parameters set it)."""
        t = depth_t(layer, self.n_layers)
        out = []
        for i, mp in enumerate(self.models):
            where = f"model {brief(self.cfg.models[i].model)}, tensor {brief(name)}"
            v = self._eval(key, mp[key], name, t, where) if key in mp else None
            if v is None and key in self.glob:
                v = self._eval(key, self.glob[key], name, t, where)
            out.append(v)
        return out

    def global_value(self, key: str, name: str, layer: Optional[int]) -> Any:
        if key not in self.glob:
            return None
        return self._eval(key, self.glob[key], name, depth_t(layer, self.n_layers), f"tensor {brief(name)}")

    def for_tensor(self, name: str, layer: Optional[int]) -> tuple[dict, dict]:
        """(parameters for ``methods.preset``, DPPA allocation parameters) of one tensor."""
        merge, dppa = {}, {}
        for p in self.spec.params:
            if p.scope == "model":
                if p.stage != "merge":  # DPPA's density levels: read once per model (dp_levels)
                    continue
                vals = self.per_model(p.name, name, layer)
                if all(v is None for v in vals):
                    continue
                if p.default is not None:  # alphas have none: the DPPA engine fills them per model's levels
                    vals = [p.default if v is None else v for v in vals]
                merge[p.name] = vals
            else:
                v = self.global_value(p.name, name, layer)
                if v is not None:
                    (merge if p.stage == "merge" else dppa)[p.name] = v
        return merge, dppa

    def dp_levels(self) -> list[list[float]]:
        """The DP density levels of each model (from densities, density or sparsity)."""
        out = []
        for i, mp in enumerate(self.models):
            label = self.cfg.models[i].model
            found = {}
            for key in LEVEL_PARAMS:
                src = mp if key in mp else (self.glob if key in self.glob else None)
                if src is not None:
                    setting = src[key]
                    if not (_scalar(setting) or key == "densities"):
                        raise MergeError(f"model {brief(label)}: {key} for {self.method} is a whole-model allocation "
                                         f"level and cannot be a gradient or filter list, got {brief(setting)}")
                    param = self.spec.param(key)
                    found[key] = _check_value(param, evaluate(setting, "", 0.0, param.type is list),
                                              f"model {brief(label)}")
            own = [k for k in LEVEL_PARAMS if k in mp]
            if len(own) > 1:
                raise MergeError(f"model {brief(label)}: set only one of {', '.join(LEVEL_PARAMS)} (got {brief(own)})")
            key = own[0] if own else next((k for k in LEVEL_PARAMS if k in found), None)
            if key is None:
                out.append(list(DEFAULT_DENSITIES))
            elif key == "densities":
                out.append(found[key])
            elif key == "density":
                out.append([found[key]])
            else:
                out.append([1.0 - found[key]])
            if any(b < a for a, b in zip(out[-1], out[-1][1:])):
                raise MergeError(f"model {brief(label)}: densities {brief(out[-1])} must be non-decreasing so the bands nest")
        return out
