"""Accuracy of state dicts on the task splits, with one reusable model instance."""

from __future__ import annotations

from typing import Mapping

from dppa_kernels.eval import exact_match_accuracy
from dppa_kernels.tasks import build_model

from .config import QualityConfig


class Scorer:
    """Exact-match accuracy (greedy, computed teacher-forced: the same number, see
    ``exact_match_accuracy``) of a state dict on ``split`` of ``task``; counts evaluations."""

    def __init__(self, cfg: QualityConfig, tokenizer, splits: Mapping, batch_size: int = 256):
        self.model = build_model(tokenizer, cfg.shape, seed=cfg.model_seed)
        self.tokenizer, self.splits, self.batch_size = tokenizer, splits, batch_size
        self.calls = 0

    def accuracy(self, state: Mapping, task: str, split: str) -> float:
        self.model.load_state_dict(state)
        self.calls += 1
        return exact_match_accuracy(self.model, self.tokenizer, self.splits[task][split],
                                    batch_size=self.batch_size, method="teacher_forced")

    def accuracies(self, state: Mapping, tasks, split: str) -> dict:
        return {t: self.accuracy(state, t, split) for t in tasks}


def retention_ratio(acc: float, dense: float) -> float:
    """Pruned accuracy / expert accuracy; NaN (undefined) when the expert scores 0."""
    return acc / dense if dense > 0 else float("nan")
