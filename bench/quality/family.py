"""The base model and one expert per task, trained once and cached on disk (HF folders + splits)."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from dppa_kernels import tasks as T

from .config import QualityConfig

SPLITS = ("test", "validation", "train", "pretrain")  # drawn in this order, disjoint


@dataclass
class Family:
    """Tokenizer, base and expert state dicts, the data splits, and how training went."""

    tokenizer: object
    base: dict
    experts: dict  # task -> state dict
    splits: dict  # task -> split name -> list[Example]
    info: dict  # per model: steps, seconds, final loss; per expert: delta ratio
    folder: Path


def draw_all_splits(cfg: QualityConfig) -> dict:
    """Every task's test/validation/train splits, then its pretraining split (other sizes, other
    prompts), all drawn before any training."""
    sizes = {"test": cfg.test_per_task, "validation": cfg.validation_per_task, "train": cfg.train_per_task}
    out = {}
    for t in cfg.tasks:
        out[t] = T.draw_splits(t, sizes, seed=cfg.data_seed, size_range=cfg.size_range(t))
        taken = [ex.prompt for split in out[t].values() for ex in split]
        out[t].update(T.draw_splits(t, {"pretrain": cfg.pretrain_per_task}, seed=cfg.data_seed + 1,
                                    size_range=cfg.size_range(t, "pretrain"), exclude=taken))
    return out


def _train(model, tok, examples, tcfg, label: str, progress: bool) -> dict:
    bar = tqdm(total=tcfg.steps, desc=label, disable=not progress, leave=False)

    def step(i: int, loss: float) -> None:
        bar.update(1)
        if i % 20 == 0:
            bar.set_postfix(loss=f"{loss:.3f}")

    res = T.train_model(model, tok, examples, tcfg, on_step=step)
    bar.close()
    tail = res.losses[-20:]
    return {"steps": tcfg.steps, "seconds": round(res.seconds, 1), "final_loss": sum(tail) / len(tail)}


def _load_state(folder: Path) -> dict:
    from transformers import AutoModelForCausalLM

    return T.state_dict_of(AutoModelForCausalLM.from_pretrained(folder))


def load_or_train(cfg: QualityConfig, cache: Path, *, progress: bool = True,
                  log: Callable[[str], None] = print) -> Family:
    """The cached family for ``cfg``, training what is absent.

    ``cache/<base_key>/`` holds the splits and the base; ``.../experts-<finetune hash>/`` the
    experts, so a change of the fine-tuning recipe retrains the experts only.
    """
    from transformers import AutoTokenizer

    root, experts = cache_folders(cfg, cache)
    if (root / "base.json").is_file():
        log(f"using the cached base in {root}")
    else:
        _in_new_folder(root, lambda tmp: _train_base(cfg, tmp, progress, log))
    splits = {t: {s: T.read_jsonl(root / "splits" / f"{t}.{s}.jsonl") for s in SPLITS} for t in cfg.tasks}
    tok = AutoTokenizer.from_pretrained(root / "base")
    base = _load_state(root / "base")
    if (experts / "experts.json").is_file():
        log(f"using the cached experts in {experts}")
    else:
        _in_new_folder(experts, lambda tmp: _train_experts(cfg, tok, base, splits, tmp, progress, log))
    info = {**json.loads((root / "base.json").read_text()), **json.loads((experts / "experts.json").read_text())}
    info["train_seconds"] = round(sum(v["seconds"] for v in info.values() if isinstance(v, dict)), 1)
    return Family(tok, base, {t: _load_state(experts / f"expert-{t}") for t in cfg.tasks}, splits, info, experts)


def cache_folders(cfg: QualityConfig, cache: Path) -> tuple:
    """(folder of the splits and base, folder of the experts) for ``cfg`` under ``cache``."""
    root = Path(cache) / cfg.base_key()
    return root, root / f"experts-{cfg.training_key().split('-')[1]}"


def is_cached(cfg: QualityConfig, cache: Path) -> bool:
    """Whether the base and the experts of ``cfg`` are all in ``cache``."""
    root, experts = cache_folders(cfg, cache)
    return (root / "base.json").is_file() and (experts / "experts.json").is_file()


def _in_new_folder(folder: Path, fill: Callable[[Path], None]) -> None:
    """Run ``fill`` on a temporary sibling folder, then move it to ``folder`` (no half-written cache)."""
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        fill(tmp)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _train_base(cfg: QualityConfig, out: Path, progress: bool, log: Callable[[str], None]) -> None:
    splits = draw_all_splits(cfg)
    for t, by_split in splits.items():
        for s, exs in by_split.items():
            T.write_jsonl(exs, out / "splits" / f"{t}.{s}.jsonl")
    tok = T.char_tokenizer()
    model = T.build_model(tok, cfg.shape, seed=cfg.model_seed)
    mix = [ex for t in cfg.tasks for ex in splits[t]["pretrain"]]
    info = {"base": _train(model, tok, mix, cfg.pretrain, "pretrain base", progress)}
    info["base"]["threads"] = torch.get_num_threads()
    log(f"base: {info['base']}")
    model.save_pretrained(out / "base")
    tok.save_pretrained(out / "base")
    (out / "base.json").write_text(json.dumps(info, indent=1))


def _train_experts(cfg: QualityConfig, tok, base: dict, splits: dict, out: Path, progress: bool,
                   log: Callable[[str], None]) -> None:
    model = T.build_model(tok, cfg.shape, seed=cfg.model_seed)
    units = unit_names(base)
    info = {}
    for t in cfg.tasks:
        model.load_state_dict(base)
        info[t] = _train(model, tok, splits[t]["train"], cfg.finetune, f"expert {t}", progress)
        ft = T.state_dict_of(model)
        info[t]["delta_ratio_units"] = T.delta_ratio(base, ft, units)
        info[t]["delta_ratio_all"] = T.delta_ratio(base, ft)
        info[t]["threads"] = torch.get_num_threads()
        log(f"expert {t}: {info[t]}")
        model.save_pretrained(out / f"expert-{t}")
        tok.save_pretrained(out / f"expert-{t}")
    (out / "experts.json").write_text(json.dumps(info, indent=1))


def unit_names(state: dict) -> list:
    """The linear weights inside decoder blocks (DPPA units); pruning acts on these only."""
    from dppa_kernels.reference.naming import group_units

    return sorted(group_units({k: tuple(v.shape) for k, v in state.items()}))
