"""Folded hidden widths d′ that an architecture accepts, and the config of a folded model.

The fold keeps attention at its width (q/k/v: d′ → H·hd), so d′ is free in the algebra, but a
transformers config class may still constrain it: transformers 5's ``LlamaConfig`` requires
hidden_size % num_attention_heads == 0, Mistral and Qwen2 do not. Rather than copy each class's
rules here, a width is legal when the config class itself validates the folded config.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch


def folded_config(config, head_dim: int, d_new: int, exact_eps: bool = True,
                  dtype: Optional[torch.dtype] = None):
    """A copy of ``config`` for hidden size ``d_new``: head_dim and the head counts written
    explicitly (attention keeps its width), embeddings untied, and with ``exact_eps`` the RMSNorm
    ε scaled by d/d′ (see ``pat.fold``). Not validated here (``width_error`` does that)."""
    cfg = copy.deepcopy(config)
    d = cfg.hidden_size
    cfg.head_dim = int(head_dim)  # from the module, never guessed (official bug B3)
    cfg.num_attention_heads = int(cfg.num_attention_heads)
    cfg.num_key_value_heads = int(getattr(cfg, "num_key_value_heads", None)
                                  or cfg.num_attention_heads)
    cfg.hidden_size = int(d_new)
    cfg.tie_word_embeddings = False
    if exact_eps:
        cfg.rms_norm_eps = cfg.rms_norm_eps * d / d_new
    if dtype is not None:
        cfg.dtype = dtype
    return cfg


def width_error(config, head_dim: int, d_new: int) -> Optional[str]:
    """Why ``config``'s class rejects a folded hidden size ``d_new`` (None when it accepts it)."""
    cfg = folded_config(config, head_dim, d_new, exact_eps=False)
    validate = getattr(cfg, "validate", None)
    if not callable(validate):  # older transformers validate nothing beyond the constructor
        return None
    try:
        validate()
    except Exception as exc:  # e.g. huggingface_hub's StrictDataclassClassValidationError
        cause = getattr(exc, "__cause__", None) or exc
        return f"{type(config).__name__} rejects hidden_size {d_new}: {str(cause).rstrip('.')}"
    return None


def nearest_legal_width(config, head_dim: int, count: int, d: int,
                        prefer: Optional[int] = None) -> int:
    """The legal d′ in [1, d − 1] nearest to ``count``. Ties go to the one nearer ``prefer`` (the
    mask's target), then to the larger. Raises ValueError when no width in [1, d − 1] is legal."""
    for dist in range(d):
        cands = sorted({c for c in (count - dist, count + dist) if 1 <= c <= d - 1},
                       key=lambda c: (abs(c - prefer) if prefer is not None else 0, -c))
        for c in cands:
            if width_error(config, head_dim, c) is None:
                return c
    raise ValueError(f"no folded hidden size in [1, {d - 1}] is accepted by "
                     f"{type(config).__name__} ({width_error(config, head_dim, max(1, count))})")
