"""PAT: pruning-aware tuning with Hybrid Sparsification Modules (arXiv:2408.14721).

Typical use with a Llama/Mistral/Qwen2 model::

    from dppa_kernels import pat
    model = get_peft_model(model, lora_config)        # optional LoRA (before prepare)
    pat.prepare(model, keep=3072, total_steps=30_000)  # 2L+1 HSMs + one shared mask
    ...
    pat.set_step(model, n)                           # or trainer callback pat.PATCallback()
    loss = task_loss + pat.sparsity_loss(model) + pat.identity_loss(model)
    ...                                              # (pat.PATTrainer does all of this)
    pat.binarize(model)                              # hard mask, d' legal for the architecture
    small = pat.fold(model)                          # smaller dense model, same HF class
    small.save_pretrained(path)

Importing this package never imports triton (the HSM op falls back to the torch reference);
``PATCallback`` and ``PATTrainer`` import transformers on first access.
"""

from .data import ALPACA_TEMPLATE, ResponseOnlyCollator, load_jsonl, tokenize_pairs
from .fold import fold, verify
from .hsm import HSM, OFFICIAL_RANK, resolve_rank
from .mask import UnifiedMask
from .ops import hsm, select_backend, triton_status
from .prepare import (
    binarize,
    get_mask,
    hsms,
    identity_loss,
    mark_trainable,
    num_active,
    pat_parameters,
    prepare,
    remove,
    set_step,
    sparsity_loss,
)
from .recipe import RECIPE, Recipe, add_lora, lora_config
from .reference import hsm_ref
from .schedule import MaskSchedule

__all__ = [
    "ALPACA_TEMPLATE", "HSM", "MaskSchedule", "OFFICIAL_RANK", "PATCallback", "PATTrainer",
    "RECIPE", "Recipe", "ResponseOnlyCollator", "UnifiedMask", "add_lora", "binarize", "fold",
    "get_mask", "hsm", "hsm_ref", "hsms", "identity_loss", "load_jsonl", "lora_config",
    "mark_trainable", "num_active", "pat_parameters", "prepare", "remove", "resolve_rank",
    "select_backend", "set_step", "sparsity_loss", "tokenize_pairs", "triton_status", "verify",
]


def __getattr__(name):
    if name == "PATCallback":
        from .callback import PATCallback

        return PATCallback
    if name == "PATTrainer":
        from .trainer import PATTrainer

        return PATTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
