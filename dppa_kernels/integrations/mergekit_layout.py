"""What ``mergekit-yaml`` (0.1.5) writes, computed without importing mergekit or transformers.

Used by the fast path of ``dppa-mergekit-yaml`` (:mod:`.mergekit_fast`):

* :func:`expected_tensors`: the tensor names mergekit's planner writes for a ``models:`` merge,
  read from mergekit's own architecture definitions (``mergekit/_data/architectures/*.json``,
  loaded as data files). ``None`` when the architecture is not a plain single-module JSON
  definition, i.e. when only mergekit itself can say.
* :func:`tokenizer_files`: the files mergekit's tokenizer copy takes from the base model, or
  ``None`` when mergekit would rebuild the tokenizer through transformers instead.
* :func:`output_config`, :func:`model_card`, :func:`write_index`: config.json, README.md and the
  shard index; :func:`shard_names` and :func:`write_layout`: mergekit's layout, written as such
  by the fast path (shards under their final names, then the files beside them).
* :func:`move_into`: put a finished staging folder into the output folder the way mergekit
  writes into it (an existing folder is written into, same-named files are replaced).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import string
from functools import lru_cache
from typing import Optional

from ..engine.errors import brief

MERGEKIT_VERSION = "0.1.5"
DEFAULT_SHARD_SIZE = 5_000_000_000  # mergekit's --out-shard-size default, 5B bytes
# mergekit builds these architectures in code, not from their JSON definitions
_CODE_ARCHS = ("AfmoeForCausalLM", "Glm4MoeForCausalLM")
# copied from the base model by mergekit 0.1.5's tokenizer copy, in this order
TOKENIZER_COPY = ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
                  "added_tokens.json", "merges.txt", "chat_template.jinja", "generation_config.json",
                  "chat_template.json", "video_preprocessor_config.json")
# any of these without the copy condition means mergekit would load and re-save the tokenizer
_TOKENIZER_HINTS = re.compile(r"^(tokenizer.*|vocab\..*|merges\.txt|special_tokens_map\.json|added_tokens\.json|"
                              r"spiece\.model|sentencepiece.*\.model|.*\.tiktoken|chat_template\..*)$")


def mergekit_dir() -> Optional[str]:
    """mergekit's package folder, found without importing it (None if not installed)."""
    try:
        spec = importlib.util.find_spec("mergekit")
    except (ImportError, ValueError):
        return None
    locs = list(spec.submodule_search_locations or []) if spec else []
    return locs[0] if locs else None


def mergekit_version() -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mergekit")
    except PackageNotFoundError:
        return None


@lru_cache(maxsize=None)
def _architectures(root: str) -> dict:
    """architecture class name -> list of parsed JSON definitions (kind "module" only)."""
    folder = os.path.join(root, "_data", "architectures")
    out: dict = {}
    for fn in sorted(os.listdir(folder)):
        if not fn.lower().endswith(".json"):
            continue
        with open(os.path.join(folder, fn), encoding="utf-8") as f:
            data = json.load(f)
        for name in data.get("architectures", []):
            out.setdefault(name, []).append(data)
    return out


class _Template(string.Template):
    idpattern = r"(?a:[_a-z][_a-z0-9]*([+-]1)?)"  # ${layer_index+1} and the like


def _fill(text: str, n_layers: int, layer: Optional[int]) -> str:
    if "{" not in text:
        return text
    subs = {"num_layers": n_layers, "num_layers+1": n_layers + 1, "num_layers-1": n_layers - 1}
    if layer is not None:
        subs.update({"layer_index": layer, "layer_index+1": layer + 1, "layer_index-1": layer - 1})
    return _Template(text).substitute(subs)


def _config_value(cfg: dict, key: str):
    obj = cfg
    for part in key.split("."):
        if not isinstance(obj, dict) or part not in obj:
            raise KeyError(key)
        obj = obj[part]
    return obj


def _definition(cfg: dict, root: str) -> tuple[Optional[dict], str]:
    archs = cfg.get("architectures")
    if not isinstance(archs, list) or len(archs) != 1 or not isinstance(archs[0], str):
        return None, f"config.json names {brief(archs)} as architectures (mergekit needs exactly one)"
    name = archs[0]
    if name in _CODE_ARCHS:
        return None, f"architecture {brief(name)} is defined in mergekit's code"
    cands = _architectures(root).get(name, [])
    if len(cands) > 1:
        cands = [c for c in cands if c.get("model_type") == cfg.get("model_type")][:1]
    if not cands:
        return None, f"no mergekit architecture definition for {brief(name)}"
    d = cands[0]
    if d.get("kind", "module") != "module":
        return None, f"architecture {brief(name)} has several modules"
    return d, ""


def expected_tensors(configs: list, present: list, root: str) -> tuple[Optional[list], str]:
    """(tensor names mergekit writes, "") or (None, why not known).

    ``configs``: the parsed config.json of the base model and of each model; ``present``: the set
    of tensor names of each (same order). Conservative: every weight mergekit plans must be
    stored under its own name in every model (no alias, tied-name or conversion lookups), have
    no forced dtype, and an optional weight must be in all models or in none.
    """
    defs = [_definition(c, root) for c in configs]
    for d, why in defs:
        if d is None:
            return None, why
    if any(d is not defs[0][0] for d, _ in defs):
        return None, "the models use different mergekit architecture definitions"
    d = defs[0][0]
    key = d.get("num_layers_config_key") or "num_hidden_layers"
    try:
        counts = {d["override_num_layers"]} if d.get("override_num_layers") is not None else \
            {int(_config_value(c, key)) for c in configs}
    except (KeyError, TypeError, ValueError):
        return None, f"config.json has no integer {brief(key)}"
    if len(counts) != 1:
        return None, f"the models have different layer counts ({sorted(counts)})"
    n = counts.pop()
    weights = list(d.get("pre_weights", []))
    for i in range(n):
        weights += [dict(w, _layer=i) for w in d.get("layer_templates", {}).get("weights", [])]
    weights += d.get("post_weights", [])
    names = []
    for w in weights:
        name = _fill(w["name"], n, w.get("_layer"))
        if w.get("force_dtype"):
            return None, f"mergekit forces the dtype of {name}"
        have = [name in p for p in present]
        if not any(have) and w.get("optional"):
            aliases = [_fill(a, n, w.get("_layer")) for a in w.get("aliases") or []]
            if any(a in p for a in aliases for p in present):
                return None, f"{name} is stored under an alias"
            continue
        if not all(have):
            return None, f"tensor {name} is not stored under that name in every model"
        names.append(name)
    if len(set(names)) != len(names):
        return None, "the architecture definition lists a tensor twice"
    return names, ""


def tokenizer_files(donor: str) -> Optional[list]:
    """Files mergekit copies from ``donor`` ([] when it has no tokenizer at all, in which case
    mergekit's attempt to load one fails and it writes none); None when mergekit would load and
    re-save the tokenizer with transformers (not reproducible here)."""
    files = set(os.listdir(donor))
    if "tokenizer_config.json" in files and ({"tokenizer.json", "tokenizer.model"} & files):
        return [f for f in TOKENIZER_COPY if os.path.isfile(os.path.join(donor, f))]
    if any(_TOKENIZER_HINTS.match(f) for f in files):
        return None
    return []


def output_config(base_config_path: str, dtype_name: Optional[str]) -> str:
    """config.json text: the base model's config with the dtype set (when the merge config sets
    ``out_dtype`` or ``dtype``), written as transformers writes it (sorted keys, indent 2)."""
    with open(base_config_path, encoding="utf-8") as f:
        data = json.load(f)
    if dtype_name:
        keys = [k for k in ("dtype", "torch_dtype") if k in data] or ["dtype"]
        for k in keys:
            data[k] = dtype_name
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def model_card(name: str, method: str, base: str, models: list, config_yaml: str, version: str) -> str:
    """README.md: our own short card (mergekit's template is not reproduced)."""
    listed = "\n".join(f"- `{m}`" for m in models)
    return (f"---\nlibrary_name: transformers\ntags:\n- merge\n- dppa-kernels\n---\n"
            f"# {name}\n\n"
            f"Merged with `dppa-mergekit-yaml` (dppa-kernels {version}, streaming engine), a drop-in for "
            f"mergekit's `mergekit-yaml`.\n\n"
            f"- Method: `{method}`\n- Base model: `{base}`\n- Models:\n{listed}\n\n"
            f"## Configuration\n\n```yaml\n{config_yaml.rstrip()}\n```\n")


def write_index(path: str, weight_map: dict, total_size: int) -> None:
    """``model.safetensors.index.json`` of a sharded output (weight_map in output order)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total_size}, "weight_map": weight_map}, f, indent=2)


def shard_names(n: int) -> list:
    """mergekit's shard file names: ``model.safetensors`` alone, else numbered shards."""
    from ..engine.shards import shard_name

    return ["model.safetensors"] if n == 1 else [shard_name(i, n) for i in range(n)]


def write_layout(staging: str, plan, merge_plan, names: list) -> None:
    """The files mergekit writes beside the shards, for a fast-path ``plan`` whose shards
    ``names`` are in ``staging``: the index (several shards, tensors in name order), config.json,
    with ``--write-model-card`` README.md and mergekit_config.yml, the tokenizer files."""
    from ..engine.shards import INDEX
    from ..engine.source import model_file

    if len(names) > 1:
        tasks = sorted(merge_plan.tasks, key=lambda t: t.name)  # mergekit's output order: plain name order
        write_index(os.path.join(staging, INDEX), {t.name: names[t.shard] for t in tasks},
                    sum(t.out_bytes for t in tasks))
    base = os.path.abspath(plan.config["base_model"])
    with open(os.path.join(staging, "config.json"), "w", encoding="utf-8") as f:
        f.write(output_config(model_file(base, "config.json"), plan.config_dtype))
    if plan.write_card:
        from .. import __version__

        with open(os.path.join(staging, "README.md"), "w", encoding="utf-8") as f:
            f.write(model_card(os.path.basename(plan.out), plan.config["merge_method"], plan.config["base_model"],
                               [m["model"] for m in plan.config["models"]], plan.source, __version__))
        with open(os.path.join(staging, "mergekit_config.yml"), "w", encoding="utf-8") as f:
            f.write(plan.source)
    for fn in plan.tokenizer:
        shutil.copyfile(model_file(base, fn), os.path.join(staging, fn))


def move_into(staging: str, out: str) -> None:
    """Put the finished ``staging`` folder's files at ``out``: a rename when ``out`` is absent or
    empty, else file by file (each replace is atomic; other files in ``out`` are left alone, as
    mergekit-yaml leaves them)."""
    if os.path.isdir(out) and not os.listdir(out):
        os.rmdir(out)
    if not os.path.exists(out):
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        os.replace(staging, out)
        return
    # weights first, then the files that point at them (index, config, card)
    names = sorted(os.listdir(staging), key=lambda f: (not f.endswith(".safetensors"), f))
    for fn in names:
        src, dst = os.path.join(staging, fn), os.path.join(out, fn)
        if os.path.isdir(dst) and not os.path.islink(dst):
            shutil.rmtree(dst)
        os.replace(src, dst)
    os.rmdir(staging)
