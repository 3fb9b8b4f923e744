"""The plan stage: every output tensor with its inputs checked, its recipe built and its shard fixed.

All checks that do not need tensor values run here, before anything is written: missing keys,
shape and vocabulary mismatches, parameter ranges, the output shard layout. Each floating
tensor's recipe (weights, specs, combine) is built and validated here, once per distinct
parameter set; DPPA's unit tensors get theirs from :meth:`MergePlan.set_unit_densities`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..reference.naming import DEFAULT_LAYER_PATTERN, DEFAULT_UNIT_PATTERN, group_units
from ..vocab import DTYPE_BY_NAME
from .config import MergeConfig, is_dppa
from .errors import MergeError, brief, clip
from .params import ParamResolver
from .recipe import Recipe, RecipeBook
from .source import ModelSource

DTYPES = DTYPE_BY_NAME  # the config's dtype names (search_cli reads them from here)
TENSOR_ORDERS = ("natural", "name")
VOCAB_NAMES = re.compile(r"(embed_tokens|lm_head|wte|word_embeddings|embed_in|embed_out|output)\.weight$")


@dataclass
class TensorTask:
    name: str
    shape: tuple
    layer: Optional[int]
    floating: bool
    work_dtype: torch.dtype
    out_dtype: torch.dtype
    unit: bool = False
    truncate_rows: Optional[int] = None  # fine-tuned vocab rows cut to the base's
    merge_params: dict = field(default_factory=dict)
    dppa_params: dict = field(default_factory=dict)
    shard: int = 0
    recipe: Optional[Recipe] = None  # floating tensors (DPPA units: once the allocation is known)

    @property
    def out_bytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.out_dtype).element_size()


@dataclass
class MergePlan:
    cfg: MergeConfig
    base: ModelSource
    models: list
    tasks: list
    n_shards: int
    n_layers: int
    levels: Optional[list] = None  # DPPA: density levels per model
    recipes: Optional[RecipeBook] = None

    @property
    def labels(self) -> list:
        return [m.label for m in self.models]

    def shard_tasks(self, i: int) -> list:
        return [t for t in self.tasks if t.shard == i]

    def check_backend(self, backend: str) -> None:
        """Refuse a plan that ``backend`` cannot merge, before anything is written: the fast
        backends compute in float32 and take no float64 tensor (the reference does)."""
        if backend == "reference":
            return
        for t in self.tasks:
            if t.floating and t.work_dtype == torch.float64 and (t.unit or t.recipe.mode != "base"):
                raise MergeError(f"tensor {brief(t.name)} merges in float64, which only --backend reference "
                                 f"supports (backend {backend} computes in float32)")

    def set_unit_densities(self, densities: dict) -> None:
        """DPPA: each unit's recipe at its allocated densities ({model index: {unit: levels}})."""
        for t in self.tasks:
            if t.unit:
                t.recipe = self.recipes.for_unit(t, [densities[i][t.name] for i in range(len(self.models))])


def _natural_key(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _n_layers(base: ModelSource, pattern: str) -> int:
    n = (base.config or {}).get("num_hidden_layers")
    found = [int(m.group(1)) for m in (re.search(pattern, k) for k in base.tensors) if m]
    return max(int(n or 0), max(found) + 1 if found else 0)


def _vocab_size(src: ModelSource) -> Optional[int]:
    cfg = src.config or {}
    return cfg.get("vocab_size") or (cfg.get("text_config") or {}).get("vocab_size")


def _architecture(src: ModelSource) -> Optional[tuple]:
    cfg = src.config if isinstance(src.config, dict) else None
    if cfg is None or ("model_type" not in cfg and "architectures" not in cfg):
        return None
    archs = cfg.get("architectures")
    return cfg.get("model_type"), tuple(archs) if isinstance(archs, list) else archs


def check_architectures(base: ModelSource, models: list, allow: bool) -> None:
    """Refuse models whose config.json ``model_type`` or ``architectures`` differ from the base
    model's (mergekit's rule; ``allow``: its ``--allow-crimes`` override)."""
    want = _architecture(base)
    if allow or want is None:
        return
    for m in models:
        got = _architecture(m)
        if got is not None and got != want:
            raise MergeError(f"model {brief(m.label)} is a {brief(got[0])} {brief(got[1])} model, base model "
                             f"{brief(base.label)} a {brief(want[0])} {brief(want[1])} one (config.json model_type / "
                             f"architectures differ); pass --allow-crimes to merge them anyway")


def _check_inputs(base: ModelSource, models: list, truncate_vocab: bool) -> dict:
    """{tensor: rows to keep} for vocabulary tensors that are cut; raises on any mismatch."""
    cuts = {}
    for m in models:
        missing = [k for k in base.tensors if k not in m.tensors]
        if missing:
            raise MergeError(f"model {brief(m.label)}: tensor {brief(missing[0])} (present in base model "
                             f"{brief(base.label)}) is "
                             f"missing" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        extra = [k for k in m.tensors if k not in base.tensors]
        if extra:
            raise MergeError(f"model {brief(m.label)}: tensor {brief(extra[0])} is missing from base model "
                             f"{brief(base.label)}"
                             + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
        for name, bi in base.tensors.items():
            mi = m.tensors[name]
            if mi.shape == bi.shape:
                continue
            vocab = (len(bi.shape) == 2 and len(mi.shape) == 2 and mi.shape[1] == bi.shape[1]
                     and (VOCAB_NAMES.search(name) or mi.shape[0] == _vocab_size(m)))
            if not vocab:
                raise MergeError(f"tensor {brief(name)}: shape {brief(list(mi.shape))} in model {brief(m.label)} "
                                 f"differs from {brief(list(bi.shape))} in base model {brief(base.label)}")
            if not truncate_vocab or mi.shape[0] < bi.shape[0]:
                how = ("pass --truncate-vocab to cut the fine-tuned rows to the base's"
                       if mi.shape[0] > bi.shape[0] else "the fine-tuned model has fewer rows; cannot truncate")
                raise MergeError(f"vocabulary size mismatch in tensor {brief(name)}: {mi.shape[0]} rows in model "
                                 f"{brief(m.label)}, {bi.shape[0]} in base model {brief(base.label)}; {how}")
            cuts[name] = bi.shape[0]
    return cuts


def build_plan(cfg: MergeConfig, base: ModelSource, models: list, *, out_dtype: Optional[str],
               shard_size: int, truncate_vocab: bool, order: str = "natural") -> MergePlan:
    """``order``: output tensor order (and so shard contents): "natural" (layer 2 before layer 10)
    or "name" (plain string order, the order mergekit 0.1.5's executor writes tensors in)."""
    if order not in TENSOR_ORDERS:
        raise MergeError(f"tensor order must be one of {', '.join(TENSOR_ORDERS)}, got {brief(order)}")
    cuts = _check_inputs(base, models, truncate_vocab)
    glob = cfg.parameters or {}
    layer_pat = glob.get("layer_pattern", DEFAULT_LAYER_PATTERN)
    n_layers = _n_layers(base, layer_pat)
    resolver = ParamResolver(cfg, n_layers)
    levels = resolver.dp_levels() if is_dppa(cfg.merge_method) else None
    book = RecipeBook(cfg.merge_method, len(models), levels, [m.label for m in models])
    units = {}
    if is_dppa(cfg.merge_method):
        pats = {"unit_pattern": glob.get("unit_pattern", DEFAULT_UNIT_PATTERN), "layer_pattern": layer_pat}
        units = group_units({k: v.shape for k, v in base.tensors.items()}, **pats)
    work = DTYPES[cfg.dtype] if cfg.dtype else None
    outd = DTYPES[out_dtype] if out_dtype else (DTYPES[cfg.out_dtype] if cfg.out_dtype else None)
    tasks = []
    for name in sorted(base.tensors, key=_natural_key if order == "natural" else None):
        bi = base.tensors[name]
        floating = bi.dtype.is_floating_point
        m = re.search(layer_pat, name)
        layer = int(m.group(1)) if m else None
        wd = work or bi.dtype
        if floating and not work:
            for src in models:
                wd = torch.promote_types(wd, src.tensors[name].dtype)
        task = TensorTask(name, bi.shape, layer, floating, wd if floating else bi.dtype,
                          (outd or wd) if floating else bi.dtype, unit=name in units, truncate_rows=cuts.get(name))
        if floating:
            task.merge_params, task.dppa_params = resolver.for_tensor(name, layer)
            recipe = book.for_task(task)  # validates every tensor's parameters, DPPA units included
            task.recipe = None if task.unit else recipe
        tasks.append(task)
    shard, used = 0, 0
    for t in tasks:  # greedy, in output order, like mergekit's writer
        if used and used + t.out_bytes > shard_size:
            shard, used = shard + 1, 0
        t.shard, used = shard, used + t.out_bytes
    return MergePlan(cfg, base, models, tasks, shard + 1, n_layers, levels, book)
