"""The lm-evaluation-harness evaluator (needs the optional ``lm-eval`` package).

One call runs what ``lm_eval.simple_evaluate`` runs for an in-memory model (the task set-up with
its seeds and few-shot settings, then ``lm_eval.evaluator.evaluate``) without the parts a search
pays for on every candidate and never reads: collecting the environment report (it runs ``pip``
and ``git`` in subprocesses, seconds per call) and the bootstrap standard errors. The task index
(``TaskManager``) is built once per version of the task folder.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from ..tasks.examples import PathLike
from .evaluators import resolve_tokenizer
from .prepared import cached


def _lm_eval_api() -> dict:
    try:
        import numpy as np
        from lm_eval.defaults import DEFAULT_OTHER_SEED, DEFAULT_RANDOM_SEED
        from lm_eval.evaluator import evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise ImportError("the lm_eval evaluator needs lm-evaluation-harness: pip install 'dppa-kernels[eval]' "
                          f"({exc})") from None
    return {"np": np, "evaluate": evaluate, "HFLM": HFLM, "TaskManager": TaskManager,
            "seeds": (DEFAULT_RANDOM_SEED, DEFAULT_OTHER_SEED)}


def _tree_version(folder: Path) -> tuple:
    """The folder's resolved path and (path, mtime, size) of every task file below it."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in (".yaml", ".yml", ".py"))
    return (str(folder.resolve()), *((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in files))


def _task_manager(api: dict, include_path: Optional[Path], include_defaults: bool):
    key = ("lm_eval_tasks", _tree_version(include_path) if include_path is not None else None, include_defaults)
    return cached(key, lambda: api["TaskManager"](include_path=str(include_path) if include_path else None,
                                                  include_defaults=include_defaults))


def _set_up(tasks: dict, num_fewshot: Optional[int], fewshot_seed: int) -> None:
    """simple_evaluate's per-task settings: the few-shot count (0 when the task names none; a
    task fixed at 0 keeps it) and the few-shot sampler's seed."""
    for task in tasks.values():
        default = task.get_config("num_fewshot")
        if num_fewshot is not None and default != 0:
            task.set_config(key="num_fewshot", value=num_fewshot)
        elif num_fewshot is None and default is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=fewshot_seed)


def lm_eval(model, *, tasks: Union[str, Sequence[str]], tokenizer: Any = None, include_path: Optional[PathLike] = None,
            metric: Optional[str] = None, limit: Optional[int] = None, batch_size: int = 8,
            num_fewshot: Optional[int] = None, include_defaults: Optional[bool] = None) -> float:
    """Score of ``model`` on lm-evaluation-harness ``tasks`` (needs the ``lm-eval`` package).

    ``include_path`` is a folder of custom task YAMLs (e.g. a local ``dataset_path: json`` task, so
    nothing is downloaded). ``include_defaults`` also indexes lm-eval's built-in tasks; by default
    only when no ``include_path`` is given (indexing them takes tens of seconds). The score is the
    mean over ``tasks`` of ``metric`` (default: each task's first reported metric); a metric
    lm-eval marks lower-is-better is negated, so higher is always better. The values are
    ``simple_evaluate``'s (same seeds and few-shot settings) without its standard errors.
    """
    api = _lm_eval_api()
    names = [tasks] if isinstance(tasks, str) else list(tasks)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"tasks must be a task name or a non-empty list of names, got {str(tasks)[:100]!r}")
    folder = Path(include_path) if include_path is not None else None
    if folder is not None and not folder.is_dir():
        raise ValueError(f"include_path {str(include_path)[:200]!r} is not a folder")
    if include_defaults is None:
        include_defaults = folder is None
    manager = _task_manager(api, folder, bool(include_defaults))
    was_training = model.training
    try:
        lm = api["HFLM"](pretrained=model, tokenizer=resolve_tokenizer(model, tokenizer), batch_size=batch_size)
        random_seed, other_seed = api["seeds"]
        random.seed(random_seed)  # the seeds simple_evaluate sets
        api["np"].random.seed(other_seed)
        torch.manual_seed(other_seed)
        loaded = manager.load(names)
        _set_up(loaded["tasks"], num_fewshot, other_seed)
        out = api["evaluate"](lm=lm, task_dict=loaded, limit=limit, bootstrap_iters=0, log_samples=False)
    finally:
        model.train(was_training)
    scores = [_task_score(out, name, metric) for name in names]
    return sum(scores) / len(scores)


lm_eval.higher_is_better = True


def _task_score(out: dict, task: str, metric: Optional[str]) -> float:
    results = out["results"].get(task)
    if results is None:
        raise ValueError(f"lm-eval returned no results for task {task!r} (got {sorted(out['results'])[:5]})")
    values = {k.split(",")[0]: v for k, v in results.items() if "," in k and not k.split(",")[0].endswith("_stderr")
              and isinstance(v, (int, float))}
    if not values:
        raise ValueError(f"lm-eval task {task!r} reported no numeric metric")
    name = metric if metric is not None else next(iter(values))
    if name not in values:
        raise ValueError(f"metric {name!r} is not among task {task!r}'s metrics {sorted(values)}")
    higher = out.get("higher_is_better", {}).get(task, {}).get(name, True)
    return float(values[name]) if higher else -float(values[name])
