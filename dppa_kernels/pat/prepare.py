"""Insert HSMs and the shared mask into a Hugging Face Llama-family model, without forking it.

Placement (2L + 1 HSMs): forward hooks on ``embed_tokens``, on every ``self_attn`` (its
first output is the ``o_proj`` output) and on every ``mlp`` (the ``down_proj`` output). The hooks
rewrite those outputs before the decoder layer adds them to the residual stream, so the stream is a
sum of masked tensors. Hooking the parents, not the Linear layers, lets PEFT wrap q/k/v/o/gate/up/
down with LoRA before or after ``prepare``: the HSM then sees base + LoRA output. Gradient
checkpointing works (the hooks run inside the checkpointed layer and are recomputed).

Module names: ``<backbone>.pat_mask`` (W_M), ``<backbone>.pat_hsm_embed``,
``layers[i].pat_hsm_attn``, ``layers[i].pat_hsm_mlp``; all PAT parameters are fp32.
"""

from __future__ import annotations

import logging
from typing import Iterator, Optional, Union

import torch
from torch import nn

from .arch import Structure, resolve
from .hsm import HSM, resolve_rank
from .mask import UnifiedMask
from .schedule import MaskSchedule
from .widths import nearest_legal_width, width_error

logger = logging.getLogger(__name__)

_HANDLES = "_pat_hook_handles"


class _OutputHook:
    """Forward hook: replace a module's output y (or output[0]) by HSM(y, m)."""

    def __init__(self, hsm: HSM, mask: UnifiedMask) -> None:
        self.hsm, self.mask = hsm, mask

    def __call__(self, module, args, output):
        if isinstance(output, tuple):
            return (self.hsm(output[0], self.mask.gate()), *output[1:])
        return self.hsm(output, self.mask.gate())


def _resolve_keep(keep: Union[int, float], d: int) -> int:
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise TypeError(f"keep must be an int (channels kept) or a float fraction, got {keep!r}")
    if isinstance(keep, float):
        if not 0.0 < keep < 1.0:
            raise ValueError(f"keep as a fraction must be in (0, 1), got {keep}")
        keep = round(keep * d)
    if not 0 < keep < d:
        raise ValueError(f"keep must be in [1, {d - 1}] (hidden size {d}), got {keep}")
    return int(keep)


def prepare(model: nn.Module, keep: Union[int, float], rank: Union[int, str] = "auto", *,
            schedule: Optional[MaskSchedule] = None, total_steps: Optional[int] = None,
            count_loss: str = "code", count_weight: Optional[float] = None,
            polarization: bool = True, identity_loss: str = "code", backend: str = "auto",
            residual_dtype: Optional[torch.dtype] = None, freeze_base: bool = False) -> nn.Module:
    """Add PAT's HSMs and the unified mask to ``model`` **in place** and return it.

    Args:
        model: a Llama/Mistral/Qwen2 ``*ForCausalLM`` or ``*Model``, optionally a PEFT model.
        keep: N_target = d′, channels to keep (int in [1, d−1]) or a fraction of d in (0, 1);
            moved to the nearest hidden size the model's config class accepts (logged).
        rank: HIO rank r, or ``"auto"`` = min(200, max(1, round(0.05·d))): 200 for d = 4096 as in
            the official recipe, ≈ 5 % of d for small models (``resolve_rank``).
        schedule: mask schedule (the official code's defaults); or give only ``total_steps``.
        count_loss, count_weight, polarization: mask losses (``UnifiedMask``).
        identity_loss: ``"code"`` (scale s, default), ``"paper"`` (diag(v)) or ``"none"``.
        backend: HSM op backend, ``"auto"``, ``"triton"`` or ``"torch"``.
        residual_dtype: None (default): HSM outputs keep the activation dtype, so a bf16 model
            keeps a bf16 residual stream (epilogue math is fp32 either way); torch.float32 makes
            the residual stream fp32 (2× its traffic).
        freeze_base: set ``requires_grad=False`` on every pre-existing parameter.

    PEFT freezes every non-LoRA parameter in ``get_peft_model``: call it first, or call
    ``mark_trainable(model)`` afterwards. The mask schedule starts at step 0 (gate ≡ 1, HSMs are
    identities): the prepared model computes exactly what the original did.
    """
    st = resolve(model)
    if hasattr(st.backbone, "pat_mask"):
        raise ValueError("model already has PAT modules (pat.prepare was called on it before)")
    d = st.hidden_size
    target = _resolve_keep(keep, d)
    r = resolve_rank(rank, d)
    # Train towards a width the architecture accepts (transformers 5's LlamaConfig, e.g., needs
    # d' % num_attention_heads == 0): the count loss then lands where binarize keeps the mask's
    # own choice, instead of adding or dropping channels after training. Raises when no d' < d
    # is foldable at all.
    legal = nearest_legal_width(st.hf_model.config, int(st.layers[0].self_attn.head_dim), target,
                                d, prefer=keep * d if isinstance(keep, float) else target)
    if legal != target:
        (logger.info if isinstance(keep, float) else logger.warning)(
            "prepare: %d kept channels is not a hidden size %s accepts; the mask's target is "
            "d'=%d instead", target, type(st.hf_model.config).__name__, legal)
        target = legal
    if schedule is not None and total_steps is not None:
        raise ValueError("pass either schedule or total_steps, not both")
    if schedule is None:
        schedule = MaskSchedule(total_steps=total_steps)
    elif not isinstance(schedule, MaskSchedule):
        raise TypeError(f"schedule must be a MaskSchedule, got {type(schedule).__name__}")
    if freeze_base:
        for p in st.hf_model.parameters():
            p.requires_grad_(False)
    device = st.backbone.embed_tokens.weight.device
    mask = UnifiedMask(d, target, schedule, count_loss=count_loss, count_weight=count_weight,
                       polarization=polarization, device=device)

    def new_hsm() -> HSM:
        return HSM(d, r, identity_loss=identity_loss, backend=backend, out_dtype=residual_dtype,
                   device=device)

    handles = []
    st.backbone.pat_mask = mask
    st.backbone.pat_hsm_embed = new_hsm()
    handles.append(st.backbone.embed_tokens.register_forward_hook(
        _OutputHook(st.backbone.pat_hsm_embed, mask)))
    for layer in st.layers:
        layer.pat_hsm_attn = new_hsm()
        layer.pat_hsm_mlp = new_hsm()
        handles.append(layer.self_attn.register_forward_hook(_OutputHook(layer.pat_hsm_attn, mask)))
        handles.append(layer.mlp.register_forward_hook(_OutputHook(layer.pat_hsm_mlp, mask)))
    setattr(st.backbone, _HANDLES, handles)
    return model


def _prepared(model: nn.Module) -> Structure:
    st = resolve(model)
    if not isinstance(getattr(st.backbone, "pat_mask", None), UnifiedMask):
        raise ValueError("model has no PAT modules: call pat.prepare(model, keep=...) first")
    hooks = st.backbone.embed_tokens._forward_hooks.values()
    if not any(isinstance(h, _OutputHook) for h in hooks):
        # e.g. LoRA on the embedding added after prepare, or resize_token_embeddings: the HSM
        # would then see only part of the embedding output, and the fold would be wrong
        raise ValueError("embed_tokens was replaced after pat.prepare and lost its HSM hook; "
                         "wrap or resize the embedding before calling pat.prepare")
    return st


def get_mask(model: nn.Module) -> UnifiedMask:
    """The shared ``UnifiedMask`` of a prepared model."""
    return _prepared(model).backbone.pat_mask


def hsms(model: nn.Module) -> list[tuple[str, HSM]]:
    """All 2L + 1 HSMs in residual-stream order: embedding, then (attn, mlp) per layer."""
    st = _prepared(model)
    out = [("embed", st.backbone.pat_hsm_embed)]
    for i, layer in enumerate(st.layers):
        out += [(f"layers.{i}.attn", layer.pat_hsm_attn), (f"layers.{i}.mlp", layer.pat_hsm_mlp)]
    return out


def pat_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """W_M and every HSM parameter (L0, L1, s or v)."""
    yield get_mask(model).weight
    for _, h in hsms(model):
        yield from h.parameters()


def mark_trainable(model: nn.Module) -> nn.Module:
    """Set ``requires_grad=True`` on all PAT parameters (e.g. after PEFT froze them)."""
    for p in pat_parameters(model):
        p.requires_grad_(True)
    return model


def set_step(model: nn.Module, step: int) -> None:
    """Advance the mask schedule to ``step`` (the 1-based index of the optimizer update about to be
    applied; see ``MaskSchedule`` for the convention)."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    mask = get_mask(model)
    if step > 0:
        mask.schedule.length  # raises early when neither total_steps nor n0 is known
    mask.step = step


def binarize(model: nn.Module, multiple_of: Optional[int] = None) -> dict:
    """Switch the shared mask to its hard 0/1 form (inference, export) and return what was chosen.

    Default: d′ = the folded hidden size nearest to the mask's count #{W_M > 0} that the model's
    config class accepts (e.g. transformers 5's LlamaConfig needs d′ % num_attention_heads == 0;
    ties go to the one nearer the mask's target), keeping the d′ highest-scoring (largest W_M)
    channels, so that ``pat.fold`` always succeeds. When d′ differs from the count this is logged.
    ``multiple_of=k`` overrides that: d′ = the nearest multiple of k (the caller then answers for
    its legality). Warns when the mask is not polarised (see ``UnifiedMask.binarize``).

    Returns {"count", "width", "rule", "polarization"}: the mask's own count, the chosen d′, why
    it was chosen, and the soft-vs-hard gate numbers.
    """
    st = _prepared(model)
    mask = st.backbone.pat_mask
    d = mask.weight.numel()
    if multiple_of is not None:
        report = mask.binarize(multiple_of)
        report["rule"] = f"multiple_of={multiple_of}"
        return report
    count = int((mask.weight.detach() > 0).sum())
    width, rule = None, "count of W_M > 0"
    head_dim = int(st.layers[0].self_attn.head_dim)
    why = width_error(st.hf_model.config, head_dim, count) if 0 < count < d else None
    if why is not None:
        width = nearest_legal_width(st.hf_model.config, head_dim, count, d, prefer=mask.target)
        rule = f"nearest accepted width ({why})"
        logger.warning("binarize: the mask keeps %d channels, but %s; folding to d'=%d (the %d "
                       "largest W_M kept)", count, why, width, width)
    report = mask.binarize(width=width)
    report["rule"] = rule
    return report


def num_active(model: nn.Module) -> int:
    """Number of channels the mask keeps now (W_M > 0, or the binarised set)."""
    return get_mask(model).num_active()


def remove(model: nn.Module) -> nn.Module:
    """Detach the PAT hooks and modules in place (the model computes its original function)."""
    st = _prepared(model)
    for h in getattr(st.backbone, _HANDLES, []):
        h.remove()
    for obj, names in [(st.backbone, ("pat_mask", "pat_hsm_embed", _HANDLES))] + \
            [(layer, ("pat_hsm_attn", "pat_hsm_mlp")) for layer in st.layers]:
        for n in names:
            if hasattr(obj, n):
                delattr(obj, n)
    return model


def sparsity_loss(model: nn.Module) -> torch.Tensor:
    """Mask loss: count loss (+ polarisation). Add it to the task loss once per step."""
    return get_mask(model).sparsity_loss()


IDENTITY_SCOPES = ("all", "official")


def identity_loss(model: nn.Module, scope: str = "all") -> torch.Tensor:
    """Σ_h identity loss of HSM h. ``scope="all"`` sums all 2L + 1 HSMs (default);
    ``"official"`` reproduces the official code's bug B1 (embedding HSM + the last layer's two)."""
    if scope not in IDENTITY_SCOPES:
        raise ValueError(f"scope must be one of {IDENTITY_SCOPES}, got {scope!r}")
    hs = [h for _, h in hsms(model)]
    if scope == "official":
        hs = [hs[0]] + hs[-2:]
    return torch.stack([h.identity_loss() for h in hs]).sum()
