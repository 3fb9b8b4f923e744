"""PAT: pruning-aware tuning with Hybrid Sparsification Modules (arXiv:2408.14721).

Typical use with a Llama/Mistral/Qwen2 model::

    from dppa_kernels import pat
    model = get_peft_model(model, lora_config)        # optional LoRA (before prepare)
    pat.prepare(model, keep=3072, total_steps=30_000)  # 2L+1 HSMs + one shared mask
    ...
    pat.set_step(model, n)                           # or trainer callback pat.PATCallback()
    loss = task_loss + pat.sparsity_loss(model) + pat.identity_loss(model)
    ...
    pat.binarize(model)                              # hard mask, keep_i <=> W_M,i > 0
    small = pat.fold(model)                          # smaller dense model, same HF class
    small.save_pretrained(path)

Importing this package never imports triton (the HSM op falls back to the torch reference);
``PATCallback`` imports transformers on first access.
"""

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
from .reference import hsm_ref
from .schedule import MaskSchedule

__all__ = [
    "HSM", "MaskSchedule", "OFFICIAL_RANK", "PATCallback", "UnifiedMask", "binarize", "fold",
    "get_mask", "hsm", "hsm_ref", "hsms", "identity_loss", "mark_trainable", "num_active",
    "pat_parameters", "prepare", "remove", "resolve_rank", "select_backend", "set_step",
    "sparsity_loss", "triton_status", "verify",
]


def __getattr__(name):
    if name == "PATCallback":
        from .callback import PATCallback

        return PATCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
