"""Pure-torch reference of the HSM operator (the fallback backend and the tests' oracle)."""

from __future__ import annotations

from typing import Optional

import torch


def hsm_ref(y: torch.Tensor, l0: torch.Tensor, l1: torch.Tensor, s: Optional[torch.Tensor],
            m: torch.Tensor, residual: Optional[torch.Tensor] = None, *,
            upcast: bool = False, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """HSM forward, differentiable by autograd:

        u = y L0ᵀ,  z = y + u L1ᵀ,  out = s ⊙ m ⊙ z  [+ residual]

    Shapes: y, residual [..., d]; L0 [r, d]; L1 [d, r]; s (or None, meaning 1) and m [d].
    The two GEMMs run in y's dtype (as a Linear under autocast would), or in fp32 with
    ``upcast=True``; the gate/scale/residual epilogue is fp32. Returns ``out_dtype`` (default:
    y's dtype).
    Reference: Liu et al., PAT, arXiv:2408.14721, Eq. 4 (Z = (M ⊙ D)·W·X with D = I + L1 L0).
    """
    cdt = torch.float32 if upcast else y.dtype
    yc = y.to(cdt)
    u = yc @ l0.to(cdt).t()
    z = yc.float() + (u @ l1.to(cdt).t()).float()
    g = m.float() if s is None else s.float() * m.float()
    out = z * g
    if residual is not None:
        out = out + residual.float()
    return out.to(out_dtype or y.dtype)
