"""DPPA as a FusionBench method: ``method=dppa`` (``fusion-bench`` 0.2.33).

    fusion_bench hydra.searchpath=[pkg://dppa_kernels.integrations.fusion_bench_config] \\
        method=dppa modelpool=... taskpool=...

:class:`DPPAAlgorithm` takes FusionBench's model pool (its ``_pretrained_`` model and the fine-tuned
models, instantiated, not lazily loaded) and runs :class:`dppa_kernels.dppa.DPPA` on their state
dicts: the statistics pass and the DP allocation once, then the apply / merge with the configured
band factors α. The merged model is the ``_pretrained_`` module with the merged state loaded:

    θ = θ_pre + scaling_factor · combine_i(w_i · Δ'_i),   Δ'_i = DPPA(θ_i − θ_pre; densities, α)

(``combine``: ``sum``, ``mean`` (÷ Σ w_i) or ``ties``; see :meth:`DPPA.merge`).

``alphas: search`` chooses α with :meth:`DPPA.search` before the merge. The evaluator is a
FusionBench task pool (``search.taskpool``, a task pool config, else the program's own task pool),
whose ``evaluate(model)`` report is read at ``search.metric`` (a dotted path, e.g.
``average.accuracy``); or, from Python, ``run(modelpool, evaluate=...)`` with callables that take
the candidate model. The search result is kept in :attr:`DPPAAlgorithm.search_result` and written
as JSON to ``search.report_path`` when given.

Every config key that is ``null`` takes :class:`DPPA`'s default (:mod:`dppa_kernels.dppa.defaults`).
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import numbers
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch

from ._deps import require

require("fusion_bench.method", "fusion-bench", "dppa_kernels.integrations.fusion_bench_dppa")
from fusion_bench.method import BaseAlgorithm  # noqa: E402
from fusion_bench.mixins import auto_register_config  # noqa: E402
from fusion_bench.modelpool import BaseModelPool  # noqa: E402

from ..dppa import DEFAULT_DENSITIES, PRESETS, resolve_alphas  # noqa: E402
from ..dppa.model import COMBINES, DPPA  # noqa: E402
from ..dppa.search import STRATEGIES  # noqa: E402
from ..methods import get_method  # noqa: E402
from .fusion_bench_cli import SEARCH_PATH  # noqa: E402,F401 (where Hydra finds method/dppa.yaml)

__all__ = ["DPPAAlgorithm", "taskpool_evaluator", "metric_of", "SEARCH_PATH"]

LOG = logging.getLogger(__name__)
SEARCH = "search"  # the ``alphas`` value that runs the α search
SEARCH_KEYS = ("strategy", "max_evals", "metric", "higher_is_better", "per_task", "taskpool", "report_path")


def _plain(value: Any) -> Any:
    """Python containers from OmegaConf's (FusionBench instantiates methods without recursion)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - FusionBench depends on omegaconf
        return value
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _short(value: Any, n: int = 60) -> str:
    return repr(value) if len(repr(value)) <= n else repr(value)[:n] + "..."


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(float(x))


def _number_list(value: Any, key: str, n: Optional[int] = None) -> list:
    if not isinstance(value, (list, tuple)) or not value or not all(_is_number(x) for x in value) \
            or (n is not None and len(value) != n):
        size = f"{n} numbers" if n is not None else "a non-empty list of numbers"
        raise ValueError(f"method.{key} must be {size}, got {_short(value)}")
    return [float(x) for x in value]


def metric_of(report: Any, metric: str) -> float:
    """The number at the dotted path ``metric`` of a task pool's report (nested mappings)."""
    node = report
    for i, part in enumerate(metric.split(".")):
        if not isinstance(node, Mapping) or part not in node:
            where = ".".join(metric.split(".")[:i]) or "the report"
            keys = sorted(map(str, node)) if isinstance(node, Mapping) else type(node).__name__
            raise KeyError(f"metric {metric!r}: no key {part!r} in {where} (it has {_short(keys, 120)})")
        node = node[part]
    if isinstance(node, torch.Tensor) and node.numel() == 1:
        node = node.item()
    if hasattr(node, "item") and not isinstance(node, (int, float)):
        node = node.item()  # numpy scalars
    if not _is_number(node):
        raise ValueError(f"metric {metric!r} is {_short(node)}, not a finite number")
    return float(node)


def taskpool_evaluator(taskpool: Any, metric: str, higher_is_better: bool = True) -> Callable[[Any], float]:
    """An evaluator for :meth:`DPPA.search`: ``taskpool.evaluate(model)`` read at ``metric``."""
    if not callable(getattr(taskpool, "evaluate", None)):
        raise TypeError(f"the search's task pool must have an evaluate(model) method, got {type(taskpool).__name__}")
    if not isinstance(metric, str) or not metric:
        raise ValueError(f"method.search.metric must be a dotted path into the task pool's report (e.g. "
                         f"average.accuracy), got {_short(metric)}")

    def evaluate(model: Any) -> float:
        return metric_of(taskpool.evaluate(model), metric)

    evaluate.higher_is_better = bool(higher_is_better)
    evaluate.metric = metric
    return evaluate


@auto_register_config
class DPPAAlgorithm(BaseAlgorithm):
    """DPPA merge of a FusionBench model pool (see the module docstring for the formula).

    ``densities``: the DP levels (non-decreasing, in [0, 1]) shared by every model. ``alphas``: a
    preset name, one factor per level (top band first), or ``"search"``. ``weights``: one per
    fine-tuned model, as a list in the pool's order or a ``{model name: weight}`` mapping.
    ``search``: ``strategy`` (greedy / grid), ``max_evals``, ``metric``, ``higher_is_better``,
    ``per_task``, ``taskpool`` (a task pool config or object), ``report_path``. The other keys are
    :class:`DPPA`'s keyword arguments of the same names.
    """

    def __init__(self, densities: Optional[Sequence[float]] = None, alphas: Union[None, str, Sequence[float]] = None,
                 combine: Optional[str] = None, scaling_factor: Optional[float] = None,
                 weights: Union[None, Sequence[float], Mapping[str, float]] = None,
                 search: Optional[Mapping[str, Any]] = None, tie_mode: Optional[str] = None,
                 count_rule: Optional[str] = None, band_combine: Optional[str] = None,
                 offset_lambda: Optional[float] = None, outlier_mult_layer: Optional[float] = None,
                 outlier_mult_unit: Optional[float] = None, density_clamp: Optional[Sequence[float]] = None,
                 renormalize: Optional[bool] = None, stats_dtype: Optional[str] = None,
                 nonunit_mode: Optional[str] = None, unit_pattern: Optional[str] = None,
                 layer_pattern: Optional[str] = None, backend: Optional[str] = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.search_result = None
        self.dppa = None
        self._check()

    # -- configuration ---------------------------------------------------------------------------

    def _check(self) -> None:
        """Type-level checks of every key before any model is loaded (values: :class:`DPPA`)."""
        densities = None if self.densities is None else _number_list(_plain(self.densities), "densities")
        alphas = _plain(self.alphas)
        if alphas != SEARCH:
            k = len(densities or DEFAULT_DENSITIES)
            if isinstance(alphas, str) and alphas not in PRESETS:
                raise ValueError(f"method.alphas: unknown value {_short(alphas)}; valid: {', '.join(PRESETS)} "
                                 f"or {SEARCH}")
            resolve_alphas(alphas, k, what="method.alphas")
        if self.combine is not None and self.combine not in COMBINES:
            raise ValueError(f"method.combine must be one of {COMBINES}, got {_short(self.combine)}")
        if self.scaling_factor is not None and not _is_number(self.scaling_factor):
            raise ValueError(f"method.scaling_factor must be a finite number, got {_short(self.scaling_factor)}")
        weights = _plain(self.weights)
        if isinstance(weights, Mapping):
            bad = {k: v for k, v in weights.items() if not _is_number(v)}
            if bad:
                raise ValueError(f"method.weights must map model names to finite numbers, got {_short(bad)}")
        elif weights is not None:
            _number_list(weights, "weights")
        for key in NUMBER_KEYS:
            if getattr(self, key) is not None and not _is_number(getattr(self, key)):
                raise ValueError(f"method.{key} must be a finite number, got {_short(getattr(self, key))}")
        for key in TEXT_KEYS:
            if getattr(self, key) is not None and not isinstance(getattr(self, key), str):
                raise ValueError(f"method.{key} must be a string, got {_short(getattr(self, key))}")
        if self.density_clamp is not None:
            _number_list(_plain(self.density_clamp), "density_clamp", 2)
        if self.renormalize is not None and not isinstance(self.renormalize, bool):
            raise ValueError(f"method.renormalize must be true or false, got {_short(self.renormalize)}")
        self._search_options()

    def _search_options(self) -> dict:
        opts = _plain(self.search) or {}
        if not isinstance(opts, Mapping):
            raise ValueError(f"method.search must be a mapping with keys {SEARCH_KEYS}, got {_short(opts)}")
        unknown = sorted(set(opts) - set(SEARCH_KEYS))
        if unknown:
            raise ValueError(f"method.search: unknown key(s) {unknown}; valid: {', '.join(SEARCH_KEYS)}")
        if opts.get("strategy") is not None and opts["strategy"] not in STRATEGIES:
            raise ValueError(f"method.search.strategy must be one of {STRATEGIES}, got {_short(opts['strategy'])}")
        me = opts.get("max_evals")
        if me is not None and (isinstance(me, bool) or not isinstance(me, int) or me < 1):
            raise ValueError(f"method.search.max_evals must be a positive integer, got {_short(me)}")
        for key in ("higher_is_better", "per_task"):
            if opts.get(key) is not None and not isinstance(opts[key], bool):
                raise ValueError(f"method.search.{key} must be true or false, got {_short(opts[key])}")
        if opts.get("metric") is not None and (not isinstance(opts["metric"], str) or not opts["metric"]):
            raise ValueError(f"method.search.metric must be a dotted path into the task pool's report, "
                             f"got {_short(opts['metric'])}")
        return dict(opts)

    def dppa_kwargs(self) -> dict:
        """The :class:`DPPA` keyword arguments this config sets (``null`` keys left to DPPA)."""
        out = {k: _plain(getattr(self, k)) for k in (*NUMBER_KEYS, *TEXT_KEYS, "densities", "density_clamp",
                                                     "renormalize")}
        if out.get("density_clamp") is not None:
            out["density_clamp"] = tuple(out["density_clamp"])
        return {k: v for k, v in out.items() if v is not None}

    def merge_kwargs(self, names: Sequence[str]) -> dict:
        """``combine``, ``weights`` (in the order of ``names``) and ``lam`` for :meth:`DPPA.merge`."""
        out = {}
        if self.combine is not None:
            out["combine"] = self.combine
        if self.scaling_factor is not None:
            out["lam"] = float(self.scaling_factor)
        weights = _plain(self.weights)
        if isinstance(weights, Mapping):
            missing = [n for n in names if n not in weights]
            extra = sorted(set(weights) - set(names))
            if missing or extra:
                raise ValueError(f"method.weights must name every fine-tuned model of the pool {list(names)} once; "
                                 f"missing {missing}, unknown {extra}")
            weights = [weights[n] for n in names]
        if weights is not None:
            if len(weights) != len(names):
                raise ValueError(f"method.weights has {len(weights)} entries; the pool has {len(names)} fine-tuned "
                                 f"models {list(names)}")
            out["weights"] = [float(w) for w in weights]
        return out

    # -- run -------------------------------------------------------------------------------------

    @torch.no_grad()
    def run(self, modelpool: Union[BaseModelPool, Mapping[str, torch.nn.Module]],
            evaluate: Union[None, Callable, Sequence[Callable]] = None) -> torch.nn.Module:
        """The merged model (the pool's ``_pretrained_`` module, its state replaced).

        ``evaluate``: the search's evaluator(s) instead of a task pool (each called with the
        candidate model; one per fine-tuned model for ``search.per_task``).
        """
        if isinstance(modelpool, Mapping):
            modelpool = BaseModelPool(dict(modelpool))
        if not isinstance(modelpool, BaseModelPool):
            raise TypeError(f"modelpool must be a FusionBench BaseModelPool, got {type(modelpool).__name__}")
        if not modelpool.has_pretrained:
            raise ValueError("method=dppa needs the pool's base model under the name _pretrained_")
        names = list(modelpool.model_names)
        if not names:
            raise ValueError("method=dppa needs at least one fine-tuned model in the pool besides _pretrained_")
        merge_kw = self.merge_kwargs(names)
        searching = _plain(self.alphas) == SEARCH
        opts = self._search_options()
        if evaluate is not None and not searching:
            raise ValueError(f"evaluate= is used only with method.alphas: search, got alphas {_short(self.alphas)}")
        if searching and evaluate is None and not opts.get("metric"):
            raise ValueError("method.alphas is search: set method.search.metric (a dotted path into the task "
                             "pool's report, e.g. average.accuracy) or pass evaluate= to run()")
        base_model = self._load(modelpool, "_pretrained_")
        # the search writes candidates into base_model, so the DPPA base must not share its storage
        base = {k: (v.detach().clone() if searching else v.detach()) for k, v in base_model.state_dict().items()}
        fts = [{k: v.detach() for k, v in self._load(modelpool, n).state_dict().items()} for n in names]
        try:
            self.dppa = DPPA.from_models(base, fts, labels=names, **self.dppa_kwargs())
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"method=dppa: {exc}") from exc
        alphas = _plain(self.alphas)
        if searching:
            alphas = self._search(base_model, evaluate, opts, merge_kw)
        merged = self.dppa.merge(alphas, **merge_kw)
        base_model.load_state_dict(merged)
        LOG.info("dppa: merged %d models with alphas %s (mean densities %s)", len(names), alphas,
                 [s["mean_density"] for s in self.dppa.summary])
        return base_model

    @staticmethod
    def _load(modelpool: BaseModelPool, name: str) -> torch.nn.Module:
        model = modelpool.load_model(name)
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"method=dppa needs instantiated models; model {name!r} of the pool loaded as "
                            f"{type(model).__name__} (lazy loading is not supported: enable_lazy_loading: false)")
        return model

    def _search(self, base_model: torch.nn.Module, evaluate, opts: dict, merge_kw: dict) -> list:
        if evaluate is None:
            evaluate = taskpool_evaluator(self._search_taskpool(opts), opts["metric"],
                                          opts.get("higher_is_better") is not False)
        kw = {k: opts[k] for k in ("strategy", "max_evals", "per_task", "higher_is_better") if opts.get(k) is not None}
        self.search_result = self.dppa.search(evaluate, model=base_model, **kw, **merge_kw)
        result = self.search_result
        LOG.info("dppa: search chose alphas %s (score %s, %d evaluations)", result.best, result.best_score,
                 len(result.table))
        if opts.get("report_path"):
            path = Path(opts["report_path"])
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result.to_json(), indent=1))
        return result.best

    def _search_taskpool(self, opts: dict):
        """``search.taskpool`` (a config is instantiated as the program instantiates its own), else
        the program's task pool."""
        pool = opts.get("taskpool")
        program = getattr(self, "_program", None)
        if isinstance(pool, Mapping):
            from omegaconf import OmegaConf

            cfg = OmegaConf.create(dict(pool))
            if program is not None and hasattr(program, "_instantiate_and_setup"):
                return program._instantiate_and_setup(cfg)
            from fusion_bench.utils import instantiate

            return instantiate(cfg, _recursive_=cfg.get("_recursive_", False))
        if pool is not None:
            return pool
        pool = getattr(program, "taskpool", None)
        if pool is None:
            raise ValueError("method.alphas is search but there is no task pool: set method.search.taskpool or the "
                             "program's taskpool, or pass evaluate= to run()")
        return pool


def _dppa_keys(kind: type) -> tuple:
    """The dppa method's global parameters of type ``kind`` (the method registry) that
    :class:`DPPAAlgorithm` takes, passed to :class:`DPPA` under the same names."""
    taken = inspect.signature(DPPAAlgorithm.__init__).parameters
    return tuple(p.name for p in get_method("dppa").params
                 if p.scope == "global" and p.type is kind and p.name in taken)


NUMBER_KEYS = _dppa_keys(float)
TEXT_KEYS = (*_dppa_keys(str), "backend")  # backend: which kernels run, not a merge parameter
