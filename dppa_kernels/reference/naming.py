"""Which tensors are DPPA "units" and which layer (transformer block) each belongs to.

A unit is a 2-D linear weight inside a numbered block. The defaults cover the usual Hugging Face
names of Llama, Mistral, Mixtral and Qwen-MoE experts, Qwen, Gemma, Phi-3 (fused projections: one
unit each), GPT-2,
GPT-NeoX, BERT and ViT; pass your own regexes to override.
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping, Optional, Sequence

DEFAULT_LAYER_PATTERN = r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\."
DEFAULT_UNIT_PATTERN = (
    r"\.(?:q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|qkv_proj|gate_up_proj"  # Llama family
    r"|w1|w2|w3"  # Mixtral experts (experts.N.w1/w2/w3)
    r"|c_attn|c_proj|c_fc"  # GPT-2
    r"|query_key_value|dense|dense_h_to_4h|dense_4h_to_h"  # GPT-NeoX, BERT/ViT output dense
    r"|query|key|value|fc1|fc2|out_proj)\.weight$"  # BERT, ViT, OPT/CLIP-style
)


def unit_layer(name: str, shape: Optional[Sequence[int]] = None, *, unit_pattern: str = DEFAULT_UNIT_PATTERN,
               layer_pattern: str = DEFAULT_LAYER_PATTERN) -> Optional[int]:
    """Layer index of a unit tensor, or None when ``name`` is not a unit."""
    if shape is not None and len(shape) != 2:
        return None
    if not re.search(unit_pattern, name):
        return None
    m = re.search(layer_pattern, name)
    return int(m.group(1)) if m else None


def group_units(shapes: Mapping[str, Sequence[int]] | Iterable[str], **patterns) -> dict:
    """{name: layer} for every unit among ``shapes`` (a name → shape mapping, or plain names)."""
    items = shapes.items() if isinstance(shapes, Mapping) else ((n, None) for n in shapes)
    out = {}
    for name, shape in items:
        layer = unit_layer(name, shape, **patterns)
        if layer is not None:
            out[name] = layer
    return out
