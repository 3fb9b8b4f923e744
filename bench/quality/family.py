"""The base model and one expert per task, trained once and cached on disk (HF folders + splits)."""

from __future__ import annotations

import json
import os
import shutil
import time
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
    """The cached family for ``cfg`` (keyed by ``cfg.training_key()``), training it when absent."""
    folder = Path(cache) / cfg.training_key()
    if not (folder / "family.json").is_file():
        _train_family(cfg, folder, progress, log)
    else:
        log(f"using cached models in {folder}")
    from transformers import AutoTokenizer

    info = json.loads((folder / "family.json").read_text())
    splits = {t: {s: T.read_jsonl(folder / "splits" / f"{t}.{s}.jsonl") for s in SPLITS} for t in cfg.tasks}
    return Family(AutoTokenizer.from_pretrained(folder / "base"), _load_state(folder / "base"),
                  {t: _load_state(folder / f"expert-{t}") for t in cfg.tasks}, splits, info, folder)


def _train_family(cfg: QualityConfig, folder: Path, progress: bool, log: Callable[[str], None]) -> None:
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        splits = draw_all_splits(cfg)
        for t, by_split in splits.items():
            for s, exs in by_split.items():
                T.write_jsonl(exs, tmp / "splits" / f"{t}.{s}.jsonl")
        tok = T.char_tokenizer()
        model = T.build_model(tok, cfg.shape, seed=cfg.model_seed)
        mix = [ex for t in cfg.tasks for ex in splits[t]["pretrain"]]
        t0 = time.perf_counter()
        info = {"base": _train(model, tok, mix, cfg.pretrain, "pretrain base", progress)}
        log(f"base: {info['base']}")
        model.save_pretrained(tmp / "base")
        tok.save_pretrained(tmp / "base")
        base = T.state_dict_of(model)
        units = unit_names(base)
        for t in cfg.tasks:
            model.load_state_dict(base)
            info[t] = _train(model, tok, splits[t]["train"], cfg.finetune, f"expert {t}", progress)
            ft = T.state_dict_of(model)
            info[t]["delta_ratio_units"] = T.delta_ratio(base, ft, units)
            info[t]["delta_ratio_all"] = T.delta_ratio(base, ft)
            log(f"expert {t}: {info[t]}")
            model.save_pretrained(tmp / f"expert-{t}")
            tok.save_pretrained(tmp / f"expert-{t}")
        info["train_seconds"] = round(time.perf_counter() - t0, 1)
        info["threads"] = torch.get_num_threads()
        (tmp / "family.json").write_text(json.dumps(info, indent=1))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def unit_names(state: dict) -> list:
    """The linear weights inside decoder blocks (DPPA units); pruning acts on these only."""
    from dppa_kernels.reference.naming import group_units

    return sorted(group_units({k: tuple(v.shape) for k, v in state.items()}))
