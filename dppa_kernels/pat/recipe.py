"""The PAT training recipe: LoRA on every linear layer alongside the HSMs, one
learning rate, cosine schedule, and the rule for the mask's learning rate on short runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from torch import nn

from .arch import ATTN_IN, MLP_IN, resolve

# every Linear of a decoder layer; not lm_head, not the HSMs
LORA_TARGETS = (*ATTN_IN, "o_proj", *MLP_IN, "down_proj")
# Under Adam a parameter moves ≈ lr per step while its gradient keeps its sign, so W_M travels
# ≈ lr·n. The recipe (lr 5e-5, n0 = 10 000) lets it travel 0.5 = the polarisation target by n0;
# mask_lr="auto" keeps that travel for shorter schedules: mask_lr = max(lr, MASK_TRAVEL / n0).
MASK_TRAVEL = 0.5


@dataclass(frozen=True)
class Recipe:
    """Defaults of the official recipe for Llama-2-7B. Batch 8 × grad-accum 2 per
    device (× 8 GPUs in the paper); ``warmup_steps`` is capped at 10 % of a shorter run."""

    lora_rank: int = 20
    lora_alpha: float = 4.0
    lora_dropout: float = 0.05
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    max_grad_norm: float = 0.3
    lr_scheduler_type: str = "cosine"
    warmup_steps: int = 100
    epochs: float = 3.0
    seed: int = 42
    max_length: int = 256
    batch_size: int = 8
    grad_accum: int = 2
    hio_rank: Union[int, str] = "auto"  # min(200, 5 % of d): 200 at d = 4096 (resolve_rank)


RECIPE = Recipe()


def lora_config(rank: int = RECIPE.lora_rank, alpha: float = RECIPE.lora_alpha,
                dropout: float = RECIPE.lora_dropout):
    """``peft.LoraConfig`` of the recipe: q/k/v/o/gate/up/down of every layer, no bias."""
    import peft

    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"lora rank must be a positive int, got {rank!r}")
    return peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, bias="none",
                           target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM")


def add_lora(model: nn.Module, rank: int = RECIPE.lora_rank, alpha: float = RECIPE.lora_alpha,
             dropout: float = RECIPE.lora_dropout) -> nn.Module:
    """Wrap a supported model with the recipe's LoRA (call before ``pat.prepare``, which then adds
    trainable HSMs next to the frozen base)."""
    import peft

    resolve(model)  # unsupported architectures fail here, before PEFT touches the model
    return peft.get_peft_model(model, lora_config(rank, alpha, dropout))


def warmup_steps(total_steps: int, recipe: Recipe = RECIPE) -> int:
    """The recipe's 100 warm-up steps, at most 10 % of ``total_steps``."""
    return min(recipe.warmup_steps, max(0, total_steps // 10))


def mask_learning_rate(lr: float, n0: int, mask_lr: Optional[Union[float, str]] = "auto") -> float:
    """The mask proxy's learning rate: ``"auto"`` → max(lr, MASK_TRAVEL / n0) (see
    ``MASK_TRAVEL``: equal to lr for the recipe's 5e-5 and n0 = 10 000), None → lr, or a float."""
    if mask_lr is None:
        return float(lr)
    if mask_lr == "auto":
        return max(float(lr), MASK_TRAVEL / n0)
    if isinstance(mask_lr, bool) or not isinstance(mask_lr, (int, float)) or not mask_lr > 0:
        raise ValueError(f"mask_lr must be 'auto', None or a positive number, got {mask_lr!r}")
    return float(mask_lr)
