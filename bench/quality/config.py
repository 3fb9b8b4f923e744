"""Budgets of the harness: the full run (≤ 30 min on 2 CPU cores) and ``--quick`` (tests)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

from dppa_kernels.tasks import ModelShape, TrainConfig


@dataclass(frozen=True)
class QualityConfig:
    """Everything that decides the trained models and the measurements.

    The base is pretrained on ``pretrain_per_task`` examples of every task at the sizes of
    ``pretrain_size_ranges``, which reach into the experts' sizes but not their longest; each expert
    is then fine-tuned from it on its own task's ``train`` split at the sizes of ``size_ranges``
    (the sizes of validation and test too) with a small learning rate. So the base is partly able
    at the experts' sizes and each expert's delta stays small relative to the base (the regime of
    supervised fine-tunes of LLMs; the run reports ‖Δ‖/‖W‖). Every split is drawn before any
    training, and all are disjoint (``dppa_kernels.tasks.draw_splits``).
    """

    tasks: tuple = ("reverse", "sort", "shift", "count")
    size_ranges: tuple = (("reverse", (6, 9)), ("sort", (6, 9)), ("shift", (6, 9)), ("count", (8, 14)))
    pretrain_size_ranges: tuple = (("reverse", (2, 8)), ("sort", (2, 8)), ("shift", (2, 8)), ("count", (2, 12)))
    pretrain_per_task: int = 2000
    train_per_task: int = 2000
    validation_per_task: int = 200
    test_per_task: int = 500
    data_seed: int = 0
    model_seed: int = 0
    shape: ModelShape = ModelShape()
    pretrain: TrainConfig = TrainConfig(steps=800, batch_size=64, lr=3e-3, warmup=50, seed=0)
    finetune: TrainConfig = TrainConfig(steps=300, batch_size=64, lr=2e-5, warmup=20, min_lr_ratio=1.0, seed=1)
    densities: tuple = (0.9, 0.5, 0.2, 0.1)
    dare_seeds: tuple = (0, 1, 2)
    factor_grid: tuple = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0)  # magnitude × one global factor
    alpha_evals: int = 12  # candidates of each DPPA α search (greedy), per task
    lambda_grid: tuple = (0.1, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)  # merge scaling λ
    merge_densities: tuple = (0.2, 0.5)  # TIES / DARE-TIES density, chosen on validation with λ
    merge_seed: int = 0

    def size_range(self, task: str, split: str = "test") -> tuple:
        """Sizes of ``task``'s examples in ``split`` (the pretraining split has its own)."""
        return dict(self.pretrain_size_ranges if split == "pretrain" else self.size_ranges)[task]

    def base_key(self) -> str:
        """Hash of the fields that decide the splits and the base model (its cache folder's name)."""
        return self._hash(("tasks", "size_ranges", "pretrain_size_ranges", "pretrain_per_task", "train_per_task",
                           "validation_per_task", "test_per_task", "data_seed", "model_seed", "shape", "pretrain"))

    def training_key(self) -> str:
        """Hash of the fields that decide the base and the experts (base_key + fine-tuning)."""
        return f"{self.base_key()}-{self._hash(('finetune',))}"

    def _hash(self, fields: tuple) -> str:
        d = {k: dataclasses.asdict(self)[k] for k in fields}
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]


FULL = QualityConfig()

QUICK = QualityConfig(
    tasks=("reverse", "lookup"), size_ranges=(("reverse", (3, 4)), ("lookup", (2, 3))),
    pretrain_size_ranges=(("reverse", (2, 3)), ("lookup", (2, 3))),
    pretrain_per_task=300, train_per_task=300, validation_per_task=32, test_per_task=48,
    shape=ModelShape(hidden=32, layers=2, heads=2, kv_heads=2, intermediate=64, max_positions=48),
    pretrain=TrainConfig(steps=40, batch_size=32, lr=1e-2, warmup=5, seed=0),
    finetune=TrainConfig(steps=15, batch_size=32, lr=1e-3, warmup=2, min_lr_ratio=1.0, seed=1),
    densities=(0.5, 0.1), dare_seeds=(0, 1), factor_grid=(1.0, 2.0), alpha_evals=3, lambda_grid=(0.5, 1.0),
    merge_densities=(0.5,),
)
