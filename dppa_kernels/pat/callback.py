"""Hugging Face ``Trainer`` callback that advances PAT's mask schedule (needs transformers)."""

from __future__ import annotations

from typing import Optional

from torch import nn
from transformers import TrainerCallback

from .prepare import get_mask, set_step


class PATCallback(TrainerCallback):
    """Sets the mask step to ``state.global_step + 1`` at ``on_step_begin`` (the update about to
    be applied; all micro-batches of one accumulated step see the same n), and, when the mask
    schedule has neither ``total_steps`` nor ``n0``, takes ``total_steps = state.max_steps`` at
    ``on_train_begin``. ``model`` defaults to the model the trainer passes to callbacks.

    The extra losses are not added by the callback: add ``pat.sparsity_loss(model) +
    pat.identity_loss(model)`` to the task loss (e.g. in ``Trainer.compute_loss``).
    """

    def __init__(self, model: Optional[nn.Module] = None) -> None:
        self.model = model

    def _model(self, kwargs) -> nn.Module:
        model = self.model if self.model is not None else kwargs.get("model")
        if model is None:
            raise ValueError("PATCallback needs the model: pass it to PATCallback(model)")
        return model

    def on_train_begin(self, args, state, control, **kwargs):
        mask = get_mask(self._model(kwargs))
        if mask.schedule.total_steps is None and mask.schedule.n0 is None:
            mask.schedule = mask.schedule.with_total_steps(int(state.max_steps))
        return control

    def on_step_begin(self, args, state, control, **kwargs):
        set_step(self._model(kwargs), int(state.global_step) + 1)
        return control
