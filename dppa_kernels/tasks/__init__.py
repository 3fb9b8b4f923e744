"""Synthetic tasks for offline quality experiments: data, a character tokenizer, a small Llama
builder and a CPU training loop (no downloads anywhere).

Typical use::

    from dppa_kernels import tasks
    splits = tasks.draw_splits("reverse", {"train": 2000, "validation": 200, "test": 200},
                               seed=0, size_range=(4, 8))
    tok = tasks.char_tokenizer()
    model = tasks.build_model(tok, tasks.ModelShape(), seed=0)
    tasks.train_model(model, tok, splits["train"], tasks.TrainConfig(steps=500))
    tasks.write_jsonl(splits["test"], "test.jsonl")   # for dppa_kernels.eval:exact_match
"""

from .deltas import delta_ratio, state_dict_of, task_deltas
from .examples import Example, read_jsonl, write_jsonl
from .generators import ALPHABET, TASKS, Task, get_task
from .model import ModelShape, build_model
from .splits import draw_splits
from .tokenizer import char_tokenizer
from .train import TrainConfig, TrainResult, train_model

__all__ = [
    "ALPHABET", "TASKS", "Example", "ModelShape", "Task", "TrainConfig", "TrainResult", "build_model",
    "char_tokenizer", "delta_ratio", "draw_splits", "get_task", "read_jsonl", "state_dict_of",
    "task_deltas", "train_model", "write_jsonl",
]
