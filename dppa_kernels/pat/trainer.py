"""``PATTrainer``: a transformers ``Trainer`` that runs pruning-aware tuning."""

from __future__ import annotations

from typing import Optional, Union

import torch
from transformers import Trainer

from .callback import PATCallback
from .data import ResponseOnlyCollator
from .prepare import get_mask, identity_loss, sparsity_loss
from .recipe import mask_learning_rate

# keys added to the training logs (state.log_history)
LOG_KEYS = ("pat_kept", "pat_tau", "pat_beta", "pat_task_loss", "pat_sparsity_loss",
            "pat_identity_loss")


class PATTrainer(Trainer):
    """Trainer for a model prepared with ``pat.prepare`` (optionally PEFT LoRA inside).

    Per micro-batch the loss is  task loss + ``pat.sparsity_loss`` + ``pat.identity_loss``
    (all weights 1). Under gradient accumulation the two PAT terms count once per
    optimizer step whichever way the task loss is normalised. The mask schedule advances every
    optimizer step (a ``PATCallback`` is added unless one is given; a schedule without a length
    takes ``total_steps`` = the run's max_steps, so n0 = ⅓ of it). The mask proxy W_M gets its
    own learning rate ``mask_lr`` (``pat.recipe.mask_learning_rate``: "auto" keeps the official
    recipe's mask travel on short runs; None = the one learning rate of the recipe).

    Logged with every training log entry (``state.log_history``): ``pat_kept`` (channels with
    W_M > 0), ``pat_tau``, ``pat_beta``, and the means since the last log of ``pat_task_loss``,
    ``pat_sparsity_loss`` and ``pat_identity_loss``. Evaluation losses are the task loss alone.

    With a ``ResponseOnlyCollator``, ``args.remove_unused_columns`` is switched off (the collator
    needs its prompt/response columns). Gradient checkpointing (``args.gradient_checkpointing``)
    works: the HSM hooks run inside the checkpointed layers and are recomputed.
    """

    def __init__(self, model=None, args=None, *posargs,
                 mask_lr: Optional[Union[float, str]] = "auto", identity_scope: str = "all",
                 **kwargs) -> None:
        self._pat_mask = get_mask(model)  # raises early for a model without PAT modules
        mask_learning_rate(1.0, 2, mask_lr)  # validates mask_lr before any training
        collator = kwargs.get("data_collator", posargs[0] if posargs else None)
        if isinstance(collator, ResponseOnlyCollator) and args is not None:
            args.remove_unused_columns = False
        super().__init__(model, args, *posargs, **kwargs)
        self.mask_lr = mask_lr
        self.identity_scope = identity_scope
        if not any(isinstance(cb, PATCallback) for cb in self.callback_handler.callbacks):
            self.add_callback(PATCallback(model))
        self._pat_sums = {"task": 0.0, "sparsity": 0.0, "identity": 0.0}
        self._pat_steps_logged = 0

    # -- loss ----------------------------------------------------------------------------------

    def _task_loss_is_scaled_for_ga(self, num_items_in_batch) -> bool:
        """Mirrors Trainer.training_step: True when the task loss was already normalised over
        the whole accumulated batch (the Trainer then does not divide it by the GA steps)."""
        if getattr(self, "loss_is_scaled_for_ga", None) is not None:
            return bool(self.loss_is_scaled_for_ga)
        return bool((self.model_accepts_loss_kwargs and num_items_in_batch is not None)
                    or self.compute_loss_func is not None)

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        task, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                             num_items_in_batch=num_items_in_batch)
        if not model.training:
            return (task, outputs) if return_outputs else task
        sp = sparsity_loss(model)
        il = identity_loss(model, scope=self.identity_scope)
        extra = sp + il
        ga = int(getattr(self, "current_gradient_accumulation_steps", None)
                 or self.args.gradient_accumulation_steps)
        if self._task_loss_is_scaled_for_ga(num_items_in_batch):
            # the step's task loss is the sum over micro-batches: add the PAT terms once in total
            extra = extra / ga
            self._pat_sums["task"] += float(task.detach())
        else:  # the Trainer divides the whole loss by ga: the PAT terms then count once
            self._pat_sums["task"] += float(task.detach()) / ga
        self._pat_sums["sparsity"] += float(sp.detach()) / ga
        self._pat_sums["identity"] += float(il.detach()) / ga
        loss = task + extra.to(task.dtype)
        return (loss, outputs) if return_outputs else loss

    # -- optimizer -----------------------------------------------------------------------------

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        mask = self._pat_mask
        sch = mask.schedule
        if sch.total_steps is None and sch.n0 is None and self.state.max_steps > 0:
            mask.schedule = sch.with_total_steps(int(self.state.max_steps))
        opt = super().create_optimizer(model)
        w = mask.weight
        groups = [g for g in opt.param_groups if any(p is w for p in g["params"])]
        if not groups or not w.requires_grad:
            return opt
        for g in groups:
            g["params"] = [p for p in g["params"] if p is not w]
        lr = mask_learning_rate(self.args.learning_rate, mask.schedule.length, self.mask_lr)
        opt.add_param_group({"params": [w], "lr": lr, "weight_decay": 0.0})
        return opt

    # -- logging -------------------------------------------------------------------------------

    def pat_state(self) -> dict:
        """Kept-channel count, τ and β of the mask at the current step."""
        m = self._pat_mask
        n = m.step
        length_known = m.schedule.total_steps is not None or m.schedule.n0 is not None
        return {"pat_kept": m.num_active(),
                "pat_tau": m.schedule.tau(n) if (n == 0 or length_known) else 1.0,
                "pat_beta": m.schedule.beta(n) if (n == 0 or length_known) else m.schedule.beta0}

    def log(self, logs: dict, start_time: Optional[float] = None) -> None:
        if "loss" in logs:  # a training log entry
            steps = max(1, self.state.global_step - self._pat_steps_logged)
            logs.update(self.pat_state())
            for k in ("task", "sparsity", "identity"):
                logs[f"pat_{k}_loss"] = round(self._pat_sums[k] / steps, 6)
                self._pat_sums[k] = 0.0
            self._pat_steps_logged = self.state.global_step
        super().log(logs, start_time)
