"""Where the residual stream is written and read in Llama-family Hugging Face models."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import nn

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
ATTN_IN = ("q_proj", "k_proj", "v_proj")
MLP_IN = ("gate_proj", "up_proj")


@dataclass
class Structure:
    """The HF model (PEFT wrapper removed), its decoder backbone and the optional lm_head."""

    hf_model: nn.Module
    backbone: nn.Module
    lm_head: Optional[nn.Module]

    @property
    def layers(self):
        return self.backbone.layers

    @property
    def hidden_size(self) -> int:
        return self.hf_model.config.hidden_size


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT ``PeftModel`` (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _require(obj, path: str, where: str):
    cur = obj
    for part in path.split("."):
        if not hasattr(cur, part):
            raise ValueError(f"{where} has no '{path}': not a Llama-family decoder layout")
        cur = getattr(cur, part)
    return cur


def resolve(model: nn.Module) -> Structure:
    """Validate that ``model`` is a supported Llama-family model and locate its parts.

    Accepts ``*ForCausalLM`` and the bare ``*Model`` of Llama, Mistral and Qwen2, optionally wrapped
    by PEFT. Raises TypeError for a non-module and ValueError for any other architecture.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    hf = unwrap(model)
    config = getattr(hf, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} ({type(hf).__name__}) is not supported by "
                         "PAT; "
                         f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    backbone = hf.model if hasattr(hf, "model") and hasattr(hf.model, "layers") else hf
    name = type(hf).__name__
    for part in ("embed_tokens", "layers", "norm"):
        _require(backbone, part, name)
    for i, layer in enumerate(backbone.layers):
        where = f"{name}.layers[{i}]"
        for p in (*[f"self_attn.{n}" for n in ATTN_IN], "self_attn.o_proj",
                  *[f"mlp.{n}" for n in MLP_IN], "mlp.down_proj",
                  "input_layernorm", "post_attention_layernorm"):
            _require(layer, p, where)
    lm_head = getattr(hf, "lm_head", None) if backbone is not hf else None
    return Structure(hf, backbone, lm_head)
