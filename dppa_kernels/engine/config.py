"""mergekit YAML configs, validated with pydantic.

Supported: ``merge_method``, ``base_model``, ``models[].model``, ``models[].parameters``, global
``parameters``, ``dtype``, ``out_dtype``, ``tokenizer_source``. Parameter values are scalars,
gradients (lists interpolated over layer depth) or conditional lists ``[{filter, value}, ...]``
(docs/methods.md). The parameters of each method are its registry entry's
(``dppa_kernels.methods``). Every unknown or unsupported key is an error naming it and the valid ones.
"""

from __future__ import annotations

import difflib
from typing import Any, Optional

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from ..methods import engine_methods, get_method
from ..vocab import DTYPE_BY_NAME
from .errors import MergeError, brief, clip

TOP_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source")
MODEL_KEYS = ("model", "parameters")
MERGEKIT_UNSUPPORTED = ("slices", "modules", "tokenizer", "chat_template")
DTYPE_NAMES = tuple(DTYPE_BY_NAME)
# Values (scalars, list items, mapping entries) a config may hold once aliases are expanded; real
# configs hold hundreds. A YAML "alias bomb" of a few lines expands to billions.
MAX_CONFIG_VALUES = 1_000_000


def is_dppa(method: str) -> bool:
    """Whether ``method`` needs the DPPA statistics pass."""
    return get_method(method).dppa


def per_model_keys(method: str) -> tuple:
    """Parameters a model may set for itself (or the top level for every model)."""
    return get_method(method).names(scope="model")


def global_only_keys(method: str) -> tuple:
    return get_method(method).names(scope="global")


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
        valid = engine_methods()
        if v not in valid:
            raise ValueError(f"unknown merge_method {brief(v)}{_hint(v, valid)}; valid: {', '.join(valid)}")
        return v

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _dtype(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and v not in DTYPE_NAMES:
            raise ValueError(f"unsupported dtype {brief(v)}; valid: {', '.join(DTYPE_NAMES)}")
        return v

    @field_validator("models")
    @classmethod
    def _models(cls, v: list) -> list:
        if not v:
            raise ValueError("models must list at least one model besides base_model")
        return v


def _hint(key: str, valid) -> str:
    if not isinstance(key, str) or len(key) > 64:
        return ""
    close = difflib.get_close_matches(key, list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_keys(d: dict, valid: tuple, where: str, src: str) -> None:
    for k in d:
        if k in valid:
            continue
        if where == "top level" and k in MERGEKIT_UNSUPPORTED:
            raise MergeError(f"{src}: key {brief(k)} is not supported by dppa merge (only models: lists); "
                             f"valid top-level keys: {', '.join(valid)}")
        raise MergeError(f"{src}: unknown key {brief(k)} at {where}{_hint(k, valid)}; valid keys: {', '.join(valid)}")


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
                    raise MergeError(f"{src}: parameter {brief(name)} at {where}: a condition must have keys "
                                     f"'value' and optional 'filter', got {brief(sorted(map(str, item)))}")
                _check_setting(name, item["value"], where, src)
            elif not isinstance(item, scalar + (list,)):
                raise MergeError(f"{src}: parameter {brief(name)} at {where}: unsupported value {brief(item)}")
        return
    raise MergeError(f"{src}: parameter {brief(name)} at {where}: unsupported value {brief(value)}")


def _check_params(params: Optional[dict], method: str, where: str, src: str, per_model: bool) -> None:
    if not params:
        return
    if not isinstance(params, dict):
        raise MergeError(f"{src}: parameters at {where} must be a mapping, got {brief(params)}")
    pm, gl = per_model_keys(method), global_only_keys(method)
    valid = pm if per_model else pm + gl
    for k, v in params.items():
        if k not in valid:
            if per_model and k in gl:
                raise MergeError(f"{src}: parameter {brief(k)} at {where} is global for {method}; set it under "
                                 f"the top-level parameters (per-model parameters: {', '.join(pm)})")
            raise MergeError(f"{src}: unknown parameter {brief(k)} at {where} for merge_method {method}"
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
        raise MergeError(f"{src}: {clip(loc)}: {msg}") from None  # msg: our validators, values brief-ed
    _check_params(cfg.parameters, cfg.merge_method, "parameters", src, per_model=False)
    for i, m in enumerate(cfg.models):
        _check_params(m.parameters, cfg.merge_method, f"models[{i}] ({clip(m.model)})", src, per_model=True)
    return cfg


def _count_values(data, limit: int) -> int:
    """Values in ``data`` with aliases expanded (a shared list counts each time it is used),
    computed once per distinct object; stops counting past ``limit``."""
    seen: dict = {}

    def count(obj) -> int:
        if not isinstance(obj, (list, dict)):
            return 1
        key = id(obj)
        if key not in seen:
            seen[key] = 0  # a cycle (impossible from safe_load) counts once
            items = list(obj.items()) if isinstance(obj, dict) else obj
            total = 1
            for item in items:
                total += sum(count(x) for x in item) if isinstance(obj, dict) else count(item)
                if total > limit:
                    break
            seen[key] = total
        return seen[key]

    return count(data)


def read_yaml(path: str) -> tuple[Any, str]:
    """(parsed document, text) of a YAML file: UTF-8 text, safe constructs only (no tags run
    code), at most ``MAX_CONFIG_VALUES`` values once aliases are expanded."""
    shown = clip(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise MergeError(f"config {shown}: cannot read ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MergeError(f"config {shown}: not a text file (not UTF-8 at byte {exc.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(exc, "problem", None) or (str(exc).splitlines() or [type(exc).__name__])[0]
        raise MergeError(f"config {shown}: invalid YAML{where}: {clip(what)}") from None
    except (ValueError, RecursionError) as exc:  # a value YAML parses but Python cannot build
        raise MergeError(f"config {shown}: invalid YAML: {clip(exc) or type(exc).__name__}") from None
    if _count_values(data, MAX_CONFIG_VALUES) > MAX_CONFIG_VALUES:
        raise MergeError(f"config {shown}: the document expands to more than {MAX_CONFIG_VALUES:,} values "
                         f"(YAML aliases nested too deep); refused")
    return data, text


def load_config(path: str) -> tuple[MergeConfig, str]:
    """(validated config, raw YAML text) of a config file."""
    data, text = read_yaml(path)
    return parse_config(data, src=clip(path)), text

