"""mergekit YAML configs, validated with pydantic.

Supported: ``merge_method``, ``base_model``, ``models[].model``, ``models[].parameters``, global
``parameters``, ``dtype``, ``out_dtype``, ``tokenizer_source``. Parameter values are scalars,
gradients (lists interpolated over layer depth) or conditional lists ``[{filter, value}, ...]``
(PEERS.md §1.2). Every unknown or unsupported key is an error naming it and the valid ones.
"""

from __future__ import annotations

import difflib
from typing import Any, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from ..methods import GLOBAL, METHODS
from .errors import MergeError

TOP_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source")
MODEL_KEYS = ("model", "parameters")
MERGEKIT_UNSUPPORTED = ("slices", "modules", "tokenizer", "chat_template")
SUPPORTED_METHODS = tuple(m for m in METHODS if m != "linear")
DTYPE_NAMES = ("float32", "bfloat16", "float16", "float64", "fp32", "bf16", "fp16")

BASE_PER_MODEL = ("weight", "density")
BASE_GLOBAL = ("normalize", "rescale", "lambda", "int8_mask")
EXTRA_PER_MODEL = {"breadcrumbs": ("gamma",), "breadcrumbs_ties": ("gamma",), "della": ("epsilon",),
                   "della_linear": ("epsilon",)}
DPPA_PER_MODEL = ("densities", "alphas", "sparsity")
DPPA_GLOBAL = ("offset_lambda", "outlier_mult_layer", "outlier_mult_unit", "density_clamp", "nonunit_mode",
               "compat", "unit_pattern", "layer_pattern")
# Our advanced knobs (methods.GLOBAL): accepted for every method, checked by the presets.
ADVANCED_GLOBAL = tuple(k for k in GLOBAL if k not in BASE_GLOBAL)
# Values that are lists by nature, never gradients.
LIST_VALUED = ("densities", "alphas", "density_clamp")


def is_dppa(method: str) -> bool:
    return method in ("dppa", "dppa_ties")


def per_model_keys(method: str) -> tuple:
    keys = BASE_PER_MODEL + EXTRA_PER_MODEL.get(method, ())
    return keys + DPPA_PER_MODEL if is_dppa(method) else keys


def global_only_keys(method: str) -> tuple:
    return BASE_GLOBAL + ADVANCED_GLOBAL + (DPPA_GLOBAL if is_dppa(method) else ())


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    parameters: Optional[dict[str, Any]] = None


class MergeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    merge_method: str
    base_model: str
    models: list[ModelEntry]
    parameters: Optional[dict[str, Any]] = None
    dtype: Optional[str] = None
    out_dtype: Optional[str] = None
    tokenizer_source: Optional[str] = None

    @field_validator("merge_method")
    @classmethod
    def _method(cls, v: str) -> str:
        if v not in SUPPORTED_METHODS:
            raise ValueError(f"unknown merge_method {v!r}{_hint(v, SUPPORTED_METHODS)}; valid: "
                             f"{', '.join(SUPPORTED_METHODS)}")
        return v

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _dtype(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and v not in DTYPE_NAMES:
            raise ValueError(f"unsupported dtype {v!r}; valid: {', '.join(DTYPE_NAMES)}")
        return v

    @field_validator("models")
    @classmethod
    def _models(cls, v: list) -> list:
        if not v:
            raise ValueError("models must list at least one model besides base_model")
        return v


def _hint(key: str, valid) -> str:
    close = difflib.get_close_matches(str(key), list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_keys(d: dict, valid: tuple, where: str, src: str) -> None:
    for k in d:
        if k in valid:
            continue
        if where == "top level" and k in MERGEKIT_UNSUPPORTED:
            raise MergeError(f"{src}: key {k!r} is not supported by dppa merge (only models: lists); "
                             f"valid top-level keys: {', '.join(valid)}")
        raise MergeError(f"{src}: unknown key {k!r} at {where}{_hint(k, valid)}; valid keys: {', '.join(valid)}")


def _check_setting(name: str, value: Any, where: str, src: str) -> None:
    """A scalar, a gradient list, or a list of {filter, value} conditions."""
    scalar = (bool, int, float, str)
    if value is None or isinstance(value, scalar):
        return
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list):
        for item in value:
            if isinstance(item, dict):
                bad = set(item) - {"filter", "value"}
                if bad or "value" not in item:
                    raise MergeError(f"{src}: parameter {name!r} at {where}: a condition must have keys "
                                     f"'value' and optional 'filter', got {sorted(item)}")
                _check_setting(name, item["value"], where, src)
            elif not isinstance(item, scalar + (list,)):
                raise MergeError(f"{src}: parameter {name!r} at {where}: unsupported value {item!r}")
        return
    raise MergeError(f"{src}: parameter {name!r} at {where}: unsupported value {value!r}")


def _check_params(params: Optional[dict], method: str, where: str, src: str, per_model: bool) -> None:
    if not params:
        return
    if not isinstance(params, dict):
        raise MergeError(f"{src}: parameters at {where} must be a mapping, got {params!r}")
    pm, gl = per_model_keys(method), global_only_keys(method)
    valid = pm if per_model else pm + gl
    for k, v in params.items():
        if k not in valid:
            if per_model and k in gl:
                raise MergeError(f"{src}: parameter {k!r} at {where} is global for {method}; set it under "
                                 f"the top-level parameters (per-model parameters: {', '.join(pm)})")
            raise MergeError(f"{src}: unknown parameter {k!r} at {where} for merge_method {method}"
                             f"{_hint(k, valid)}; valid: {', '.join(valid)}")
        _check_setting(k, v, where, src)


def parse_config(data: Any, src: str = "config") -> MergeConfig:
    """Validate a loaded YAML document; raise MergeError naming the first bad key or value."""
    if not isinstance(data, dict):
        raise MergeError(f"{src}: expected a mapping at the top level, got {type(data).__name__}")
    _check_keys(data, TOP_KEYS, "top level", src)
    for i, m in enumerate(data.get("models") or []):
        if not isinstance(m, dict):
            raise MergeError(f"{src}: models[{i}] must be a mapping with 'model' and 'parameters'")
        _check_keys(m, MODEL_KEYS, f"models[{i}]", src)
    try:
        cfg = MergeConfig.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or "top level"
        msg = err["msg"].removeprefix("Value error, ")
        raise MergeError(f"{src}: {loc}: {msg}") from None
    _check_params(cfg.parameters, cfg.merge_method, "parameters", src, per_model=False)
    for i, m in enumerate(cfg.models):
        _check_params(m.parameters, cfg.merge_method, f"models[{i}] ({m.model})", src, per_model=True)
    return cfg


def load_config(path: str) -> tuple[MergeConfig, str]:
    """(validated config, raw YAML text) of a config file."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as exc:
        raise MergeError(f"config {path}: cannot read ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise MergeError(f"config {path}: invalid YAML: {exc}") from None
    return parse_config(data, src=path), text


Setting = Union[bool, int, float, str, list, dict, None]
