"""A small Llama-shaped causal LM (``transformers.LlamaForCausalLM``) initialised from a seed."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ModelShape:
    """Sizes of the Llama model :func:`build_model` makes (defaults: ~0.8 M parameters)."""

    hidden: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 4
    intermediate: int = 344
    max_positions: int = 64

    def as_dict(self) -> dict:
        return asdict(self)


def build_model(tokenizer, shape: ModelShape = ModelShape(), *, seed: int = 0):
    """A freshly initialised ``LlamaForCausalLM`` for ``tokenizer``'s vocabulary.

    Untied embeddings (so ``lm_head`` and ``embed_tokens`` have their own deltas); the special
    token ids come from the tokenizer. The weights depend only on ``seed`` and the shape.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if not isinstance(shape, ModelShape):
        raise TypeError(f"shape must be a ModelShape, got {type(shape).__name__}")
    if shape.hidden % shape.heads or shape.heads % shape.kv_heads:
        raise ValueError(f"shape needs hidden % heads == 0 and heads % kv_heads == 0, got {shape}")
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        max_position_embeddings=shape.max_positions, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(state)  # leave the caller's random stream as it was
    return model.eval()
