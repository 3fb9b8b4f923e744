"""Vectorised torch implementation of the backend primitives (any device).

Not the reference (that one is ``dppa_kernels.reference``, written for clarity): this is the
portable fallback when no compiled backend serves the tensor's device, and a second,
independent implementation of the plan semantics in ``backends.base``.
"""

from __future__ import annotations

import torch

from ..reference import rng
from ..reference.threshold import magnitude_keys, no_keep_key
from ..vocab import HIST_BINS, partition_geometry
from .base import ApplyPlan, Backend, NonFiniteInput, nonfinite_key


def _as_2d(flat: torch.Tensor, length: int, parts: int, fill) -> torch.Tensor:
    pad = length * parts - flat.numel()
    if pad:
        flat = torch.cat([flat, flat.new_full((pad,), fill)])
    return flat.reshape(parts, length)


class TorchBackend(Backend):
    name = "torch"

    def available(self):
        return True, ""

    def supports(self, device):
        return True

    def select(self, x, k, partition, block_size, key_dtype, *, check_finite=False):
        kd = key_dtype or x.dtype
        keys = magnitude_keys(x, kd).reshape(-1)
        length, parts = partition_geometry(x.shape, partition, block_size)
        if parts == 0 or keys.numel() == 0:
            z = torch.zeros(parts, dtype=torch.int64)
            return torch.full((parts,), no_keep_key(kd), dtype=torch.int64), z, z.clone()
        k2d = _as_2d(keys, length, parts, -1)  # padding sorts below every real key
        srt = torch.sort(k2d, dim=1, descending=True).values
        if check_finite and bool((srt[:, 0] >= nonfinite_key(kd)).any()):  # each partition's largest key
            raise NonFiniteInput((0,))
        kk = k.to(keys.device)
        idx = (kk - 1).clamp(min=0).unsqueeze(1)
        tau = srt.gather(1, idx).squeeze(1)
        tau = torch.where(kk > 0, tau, torch.full_like(tau, no_keep_key(kd)))
        above = (k2d > tau.unsqueeze(1)).sum(1)
        eq = (k2d == tau.unsqueeze(1)).sum(1)
        return tau.cpu(), above.cpu(), eq.cpu()

    def histogram(self, x, stats_dtype):
        keys = magnitude_keys(x, stats_dtype).reshape(-1)
        return torch.bincount(keys, minlength=HIST_BINS).cpu().to(torch.int64)

    def _factor(self, delta: torch.Tensor, plan: ApplyPlan) -> torch.Tensor:
        n = delta.numel()
        dev = delta.device
        if plan.kind == "dense":
            return torch.ones(n, dtype=torch.float32, device=dev)
        if plan.kind == "dare":
            return (rng.random_bits(n, plan.k1, plan.k2, device=dev) < plan.thr32).to(torch.float32)
        if plan.kind == "mask":
            return plan.mask.reshape(-1).to(torch.float32)
        keys = magnitude_keys(delta, plan.key_dtype or delta.dtype).reshape(-1)
        length, parts = partition_geometry(delta.shape, plan.partition, plan.block_size)
        k2d = _as_2d(keys, length, parts, -1)
        tau = plan.tau_key.to(dev)
        budget = plan.budget.to(dev) if plan.budget is not None else None
        factor = torch.zeros_like(k2d, dtype=torch.float32)
        assigned = torch.zeros_like(k2d, dtype=torch.bool)
        for j, fj in enumerate(plan.factors):
            t = tau[:, j : j + 1]
            inside = k2d > t
            eq = k2d == t
            if plan.tie_mode == "ge":
                inside |= eq
            elif plan.tie_mode == "exact_k":
                rank = torch.cumsum(eq.to(torch.int64), dim=1) - 1
                inside |= eq & (rank < budget[:, j : j + 1])
            new = inside & ~assigned
            factor[new] = float(fj)
            assigned |= inside
        return factor.reshape(-1)[:n]

    def abs_sums(self, delta, plan):
        d = delta.reshape(-1).to(torch.float64)
        f = self._factor(delta, plan).to(torch.float64)
        return float(d.abs().sum()), float((d * f).abs().sum())

    def apply(self, deltas, base, plans, weights, combine, out_dtype, *, check_finite=()):
        vals = []
        for d, plan in zip(deltas, plans):
            v = d.reshape(-1).to(torch.float32) * self._factor(d, plan) * float(plan.scale)
            vals.append(v)

        v = torch.stack(vals)
        w = torch.tensor([float(x) for x in weights], dtype=torch.float32, device=v.device).unsqueeze(1)
        weighted = v * w
        if combine.combine == "ties":
            src = weighted if combine.elect in ("weighted_sum", "count") else v
            vote = src.sign().sum(0) if combine.elect in ("count", "frequency") else src.sum(0)
            majority = torch.where(vote >= 0, 1.0, -1.0)
            agree = (src.sign() == majority).to(torch.float32)
            mixed = (weighted * agree).sum(0)
            if combine.divisor == "weights":
                div = (w * agree).sum(0)
                div = torch.where(div == 0, torch.ones_like(div), div)
            elif combine.divisor == "count":
                div = agree.sum(0).clamp(min=1.0)
            else:
                div = torch.ones_like(mixed)
        else:
            mixed = weighted.sum(0)
            if combine.divisor == "weights":
                s = float(sum(float(x) for x in weights))
                div = torch.full_like(mixed, 1.0 if abs(s) < 1e-8 else s)
            elif combine.divisor == "count":
                div = torch.full_like(mixed, float(len(deltas)))
            else:
                div = torch.ones_like(mixed)
        if combine.normalize:
            mixed = mixed / div
        mixed = mixed * float(combine.lam)
        shape = deltas[0].shape
        if base is not None:
            mixed = base.reshape(-1).to(torch.float32) + mixed
        # every non-finite input leaves a NaN/Inf in the fp32 result (NaN·0 and Inf·0 are NaN, a
        # NaN vote agrees with nothing yet adds v·0): one sum of it shows them all
        if check_finite and not bool(torch.isfinite(mixed.sum())):
            raise NonFiniteInput(check_finite)
        return mixed.to(out_dtype).reshape(shape)
