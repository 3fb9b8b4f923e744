"""Exact fold of a PAT-tuned model into a physically smaller dense model.

With keep = {i : W_M,i > 0} (the binarised mask), d′ = |keep|, c = √(d/d′), all in fp32:

  LoRA      W ← W + (α/r)·B·A on every adapted Linear (the trained model is not touched)
  upstream  o_proj, down_proj (W ∈ R^{d×d_in}):  W ← (diag(s)(W + L1(L0 W)))[keep, :],
            bias b ← (s ⊙ (b + L1(L0 b)))[keep]          (cost 2·r·d·d_in, D never formed)
  embedding E ∈ R^{V×d}:  E ← ((E + (E L0ᵀ) L1ᵀ) diag(s))[:, keep]
  downstream q/k/v, gate/up, lm_head:  W ← W[:, keep] (biases unchanged)
  RMSNorm   g ← (c·g)[keep] and, with ``exact_eps`` (default), ε ← ε·d/d′, because
            mean_d(x²) = (d′/d)·mean_d′(x²) when the pruned channels of x are 0:
            g·x/√(mean_d(x²) + ε) = c·g·x/√(mean_d′(x²) + ε·d/d′) exactly
  config    hidden_size = d′; head_dim, num_attention_heads, num_key_value_heads written
            explicitly (attention keeps its width: q/k/v d′ → H·hd, o H·hd → d′); untied embeddings
            (the embedding absorbs D and s, lm_head needs the untransformed columns).

The folded model is a fresh instance of the same transformers class with no PAT code in it;
``save_pretrained`` output loads with plain transformers.
"""

from __future__ import annotations

import copy
import math
from contextlib import nullcontext
from typing import Optional

import torch
from torch import nn

from .arch import ATTN_IN, MLP_IN
from .hsm import HSM
from .prepare import _prepared
from .widths import folded_config, width_error



def _no_init():
    """Skips the random init of weights that are overwritten anyway (imported here: the CLI
    imports this module on every command, and transformers costs about a second to import)."""
    try:
        from transformers.initialization import no_init_weights
    except Exception:  # pragma: no cover - older transformers
        return nullcontext()
    return no_init_weights()


def _lora_delta(mod: nn.Module, name: str) -> torch.Tensor:
    if mod.use_dora.get(name, False):
        raise ValueError(f"adapter {name!r} uses DoRA; pat.fold merges plain LoRA only")
    if getattr(mod, "fan_in_fan_out", False):
        raise ValueError(f"adapter {name!r} has fan_in_fan_out=True, not a Llama-family Linear")
    a = mod.lora_A[name].weight.float()
    b = mod.lora_B[name].weight.float()
    return (b @ a) * mod.scaling[name]


def effective_linear(mod: nn.Module) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(W, b) in fp32 of a Linear, with unmerged active PEFT LoRA adapters added (α/r)·B·A."""
    base = mod.get_base_layer() if hasattr(mod, "get_base_layer") else mod
    w = base.weight.detach().float()
    b = None if base.bias is None else base.bias.detach().float()
    if hasattr(mod, "lora_A") and not getattr(mod, "disable_adapters", False):
        merged = set(getattr(mod, "merged_adapters", []))
        for name in mod.active_adapters:
            if name in merged or name not in mod.lora_A:
                continue
            w = w + _lora_delta(mod, name).detach()
            if getattr(mod, "lora_bias", {}).get(name, False):
                bias = mod.lora_B[name].bias.detach().float() * mod.scaling[name]
                b = bias if b is None else b + bias
    return w, b


def effective_embedding(mod: nn.Module) -> torch.Tensor:
    """Embedding matrix [V, d] in fp32, with unmerged active PEFT adapters added."""
    base = mod.get_base_layer() if hasattr(mod, "get_base_layer") else mod
    e = base.weight.detach().float()
    if hasattr(mod, "lora_embedding_A") and not getattr(mod, "disable_adapters", False):
        merged = set(getattr(mod, "merged_adapters", []))
        for name in mod.active_adapters:
            if name not in merged and name in mod.lora_embedding_A:
                e = e + mod.get_delta_weight(name).detach().float()
    return e


def _hio(h: HSM) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    l0 = h.l0.detach().float()
    l1 = h.effective_l1().detach().float()
    s = torch.ones_like(l0[0]) if h.scale is None else h.scale.detach().float()
    return l0, l1, s


def fold_upstream(w: torch.Tensor, b: Optional[torch.Tensor], h: HSM, keep: torch.Tensor):
    """Rows ``keep`` of diag(s)(W + L1(L0 W)) and of s ⊙ (b + L1(L0 b))."""
    l0, l1, s = _hio(h)
    w2 = (s[:, None] * (w + l1 @ (l0 @ w)))[keep]
    b2 = None if b is None else (s * (b + l1 @ (l0 @ b)))[keep]
    return w2, b2


def fold_embedding(e: torch.Tensor, h: HSM, keep: torch.Tensor) -> torch.Tensor:
    """Columns ``keep`` of (E + (E L0ᵀ) L1ᵀ) diag(s)."""
    l0, l1, s = _hio(h)
    return ((e + (e @ l0.t()) @ l1.t()) * s)[:, keep]


class _Writer:
    """Copies tensors into the new model and checks that every parameter was written once."""

    def __init__(self, model: nn.Module) -> None:
        self.pending = {id(p): n for n, p in model.named_parameters()}

    @torch.no_grad()
    def __call__(self, param: Optional[nn.Parameter], value: Optional[torch.Tensor]) -> None:
        if (param is None) != (value is None):
            raise RuntimeError("bias presence differs between the source and the folded model")
        if param is None:
            return
        if tuple(param.shape) != tuple(value.shape):
            raise RuntimeError(f"folded shape {tuple(value.shape)} != {tuple(param.shape)} of "
                               f"{self.pending.get(id(param), '?')}")
        param.copy_(value)
        self.pending.pop(id(param), None)

    def finish(self) -> None:
        if self.pending:
            raise RuntimeError(f"fold did not write: {sorted(self.pending.values())}")


def _folded_config(hf: nn.Module, st, d_new: int, exact_eps: bool, dtype: torch.dtype):
    head_dim = int(st.layers[0].self_attn.head_dim)
    why = width_error(hf.config, head_dim, d_new)
    if why is not None:
        raise ValueError(f"the folded config (hidden_size d'={d_new}) is rejected: {why}; "
                         "binarise with the defaults (pat.binarize(model) picks a legal d') or "
                         f"with multiple_of=k, e.g. k = num_attention_heads = "
                         f"{hf.config.num_attention_heads}")
    return folded_config(hf.config, head_dim, d_new, exact_eps, dtype)


def verify(folded: nn.Module, model: nn.Module, input_ids: torch.Tensor) -> float:
    """max|logits_folded − logits_masked| / max|logits_masked| on ``input_ids``."""
    with torch.no_grad():
        ref = model(input_ids=input_ids).logits.float()
        got = folded(input_ids=input_ids.to(next(folded.parameters()).device)).logits.float()
    return float((got.to(ref.device) - ref).abs().max() / ref.abs().max())


def fold(model: nn.Module, *, dtype: Optional[torch.dtype] = None, exact_eps: bool = True,
         verify_ids: Optional[torch.Tensor] = None, verify_rtol: float = 1e-5) -> nn.Module:
    """Return a new, smaller dense model of the same transformers class equal to the hard-masked
    PAT model (see the module docstring). ``model`` must be prepared and binarised
    (``pat.binarize``); it is left unchanged. ``dtype``: dtype of the result (default: the source
    embedding's dtype); all arithmetic is fp32. ``exact_eps=False`` keeps ε as the official fold
    does (error ~ ε relative). d′ is the binarised keep count (``pat.binarize`` picks one the
    architecture accepts; ``multiple_of=`` rounds it to a multiple of 8/64/128 instead). With
    ``verify_ids`` (token ids [B, T]) the fp32 folded model is checked against the hard-masked
    model before the final cast: a relative logit error above ``verify_rtol`` raises RuntimeError.
    """
    st = _prepared(model)
    mask = st.backbone.pat_mask
    if not mask.binarized:
        raise ValueError("fold needs a binarised mask: call pat.binarize(model) first (a soft "
                         "gate has no exact fold)")
    if dtype is not None and dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"dtype must be float32, bfloat16, float16 or None, got {dtype}")
    hf, bb = st.hf_model, st.backbone
    src_device = bb.embed_tokens.weight.device
    keep = mask.keep_indices().to(src_device)
    d, d_new = mask.weight.numel(), int(keep.numel())
    c = math.sqrt(d / d_new)
    out_dtype = dtype or bb.embed_tokens.weight.dtype
    cfg = _folded_config(hf, st, d_new, exact_eps, out_dtype)
    with _no_init():
        new = type(hf)(cfg)
    new = new.float().eval()
    nbb = new.model if hasattr(new, "model") and hasattr(new.model, "layers") else new
    put = _Writer(new)
    to = dict(device="cpu")

    put(nbb.embed_tokens.weight, fold_embedding(effective_embedding(bb.embed_tokens),
                                                bb.pat_hsm_embed, keep).to(**to))
    for src, dst in zip(st.layers, nbb.layers):
        for names, parent_s, parent_d in ((ATTN_IN, src.self_attn, dst.self_attn),
                                          (MLP_IN, src.mlp, dst.mlp)):
            for n in names:
                w, b = effective_linear(getattr(parent_s, n))
                put(getattr(parent_d, n).weight, w[:, keep].to(**to))
                put(getattr(parent_d, n).bias, None if b is None else b.to(**to))
        for n, parent_s, parent_d, h in (("o_proj", src.self_attn, dst.self_attn, src.pat_hsm_attn),
                                         ("down_proj", src.mlp, dst.mlp, src.pat_hsm_mlp)):
            w, b = fold_upstream(*effective_linear(getattr(parent_s, n)), h, keep)
            put(getattr(parent_d, n).weight, w.to(**to))
            put(getattr(parent_d, n).bias, None if b is None else b.to(**to))
        for n in ("input_layernorm", "post_attention_layernorm"):
            g = getattr(src, n).weight.detach().float()
            put(getattr(dst, n).weight, (c * g)[keep].to(**to))
    put(nbb.norm.weight, (c * bb.norm.weight.detach().float())[keep].to(**to))
    if st.lm_head is not None:
        w, b = effective_linear(st.lm_head)
        put(new.lm_head.weight, w[:, keep].to(**to))
        put(new.lm_head.bias, None if b is None else b.to(**to))
    put.finish()
    if getattr(hf, "generation_config", None) is not None and hasattr(new, "generation_config"):
        new.generation_config = copy.deepcopy(hf.generation_config)
    new = new.to(device=src_device)
    if verify_ids is not None:
        err = verify(new, model, verify_ids)
        if not err <= verify_rtol:
            raise RuntimeError(f"folded model differs from the masked model: relative logit error "
                               f"{err:.3g} > verify_rtol {verify_rtol:g}")
    return new.to(dtype=out_dtype)
