"""Drop-ins for FusionBench's (``fusion-bench`` 0.2.33) TIES and DARE utilities on our kernels.

Same names, signatures, results and output dtypes as FusionBench:

* ``topk_values_mask(M, K=0.7, return_mask=False)``, ``resolve_sign(v)`` and
  ``ties_merging(flat_task_checks, reset_thresh=None, merge_func="")`` of
  ``fusion_bench.method.ties_merging.ties_merging_utils``: the trim keeps, per row of the [n, d]
  matrix of flattened task vectors, every ``|x| >= τ`` with τ the (d − int(d·K))-th smallest |x|
  (``K > 1`` is a percentage; all ties at τ kept); the election takes the sign of the column sum of
  the trimmed values, a zero sum taking the sign of the sum of all elected signs; the disjoint merge
  (``mean`` / ``sum`` / ``max``, a ``"dis-"`` prefix allowed) combines the values that agree with it.
  See :mod:`.fusion_bench_ties` for how each step maps onto the kernels.
* ``param_random_drop_(param, sparsity_level, rescale)`` of ``fusion_bench.method.dare.utils``
  (FusionBench's ``module_random_drop_`` calls it for every parameter): see :mod:`.fusion_bench_dare`.

``install()`` patches these names into their FusionBench modules and into every loaded FusionBench
module that imported them by name (``method/ties_merging/ties_merging.py``, ``method/dare/*.py``,
...); modules imported later pick up the patched names. So ``TiesMergingAlgorithm``,
``TiesMergingForCausalLM``, ``DareTiesMerging`` and ``DareTaskArithmetic`` run on our kernels
unchanged. ``uninstall()`` puts FusionBench's own functions back everywhere.
``TaskArithmeticAlgorithm`` is plain state-dict arithmetic and is left to FusionBench.

Results, and where they differ:

* TIES (``topk_values_mask``, ``resolve_sign``, ``ties_merging``): identical to FusionBench's values
  and dtypes (``mean`` returns fp32, as FusionBench's float32 count makes it). Sums run in fp32 in
  model order, which is the order torch's CPU reduction uses for up to 4 models; with 5 or more,
  torch groups a few elements differently (which ones depends on its thread count, so its own
  result does too) and those may differ from ours in the last bit. The row fraction returned by
  ``topk_values_mask`` is exact for rows of up to 2**24 elements.
* DARE: each element is kept with exactly the probability FusionBench's CPU ``torch.rand_like``
  draw gives it, but the draws come from our counter-hash RNG: masks are equal in distribution,
  not identical. The seed of each call is drawn from torch's global CPU generator, so
  ``torch.manual_seed`` / FusionBench's ``seed:`` still make runs reproducible.
  ``set_options(rng="torch")`` draws the masks exactly as FusionBench does (identical results).
* Gradients: our kernels are not differentiable. When autograd is recording and an input requires
  grad, the TIES functions run FusionBench's own code. ``param_random_drop_`` works on
  ``param.data`` in FusionBench too (it records nothing), so it always runs on our kernels.
* FusionBench's own code also runs for what our kernels do not take or where FusionBench raises:
  float64 or non-tensor inputs, inputs that are not 2-D, Inf/NaN values, a ``K`` that puts the
  threshold outside the row, an unknown merge function.
"""

from __future__ import annotations

import numbers
import sys
import threading
from typing import Optional, Union

import torch

from . import fusion_bench_dare as _dare
from . import fusion_bench_ties as _ties
from ._deps import require
from .peft import _draw_seed

__all__ = ["topk_values_mask", "resolve_sign", "ties_merging", "param_random_drop_", "install", "uninstall",
           "is_installed", "set_options", "get_options", "PATCHES"]

TIES_MODULE = "fusion_bench.method.ties_merging.ties_merging_utils"
DARE_MODULE = "fusion_bench.method.dare.utils"
# where each drop-in's original lives (FusionBench modules import them by name from there)
PATCHES = {TIES_MODULE: ("topk_values_mask", "resolve_sign", "ties_merging"),
           DARE_MODULE: ("param_random_drop_",)}
_FAST = (torch.bfloat16, torch.float16, torch.float32)
BACKENDS = ("auto", "torch", "cpu", "triton", "cuda")

_options = {"rng": "hash", "backend": "auto"}
_lock = threading.RLock()
_state: dict = {"installed": False, "patched": [], "originals": {}}


def set_options(*, rng: Optional[str] = None, backend: Optional[str] = None) -> None:
    """rng: ``hash`` (our counter RNG, default) or ``torch`` (FusionBench's own DARE draws);
    backend: as in :func:`dppa_kernels.merge_deltas` (``reference`` has no kernels to run)."""
    if rng is not None and rng not in ("hash", "torch"):
        raise ValueError(f"rng must be 'hash' or 'torch', got {rng!r}")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    for k, v in (("rng", rng), ("backend", backend)):
        if v is not None:
            _options[k] = v


def get_options() -> dict:
    return dict(_options)


def _module(name: str):
    return require(name, "fusion-bench", "dppa_kernels.integrations.fusion_bench")


def _orig(module: str, name: str):
    """FusionBench's own function (the saved one while installed)."""
    return _state["originals"].get((module, name)) or getattr(_module(module), name)


def _host_ok(*tensors: torch.Tensor, dims: int = 2) -> bool:
    """Whether our kernels take these inputs: 2-D bf16/fp16/fp32 tensors, no autograd recording."""
    if any(not isinstance(t, torch.Tensor) or t.dtype not in _FAST or t.dim() != dims for t in tensors):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


# ---------------------------------------------------------------- the drop-ins

def topk_values_mask(M: torch.Tensor, K: float = 0.7, return_mask: bool = False):
    """FusionBench's trim: ``(M * mask, mask.float().mean(dim=1)[, mask])``, per row of M [n, d].

    ``mask = |M| >= τ_row``, τ_row the (d − int(d·K))-th smallest |M| of the row (K > 1: percent).
    """
    if _host_ok(M) and all(bool(torch.isfinite(c).all()) for c in M.detach().reshape(-1).split(1 << 24)):
        res = _ties.topk_mask(M.detach(), K, _options["backend"], return_mask)
        if res is not None:
            return res
    return _orig(TIES_MODULE, "topk_values_mask")(M, K, return_mask)


def resolve_sign(v: torch.Tensor) -> torch.Tensor:
    """FusionBench's election: sign of the column sum of v [n, d]; zeros take the majority sign."""
    if _host_ok(v) and v.shape[0] > 0:
        sign = _ties.column_sign(v.detach(), _options["backend"])
        if sign is not None:
            return _module(TIES_MODULE).resolve_zero_signs(sign, "majority")
    return _orig(TIES_MODULE, "resolve_sign")(v)


def ties_merging(flat_task_checks: torch.Tensor, reset_thresh: Union[float, None] = None,
                 merge_func: str = "") -> torch.Tensor:
    """FusionBench's TIES on flattened task vectors [n, d]: trim, elect, disjoint merge → [d]."""
    if _host_ok(flat_task_checks):
        out = _ties.ties_merge(flat_task_checks.detach(), reset_thresh, merge_func, _options["backend"],
                               _module(TIES_MODULE).disjoint_merge)
        if out is not None:
            return out
    return _orig(TIES_MODULE, "ties_merging")(flat_task_checks, reset_thresh, merge_func)


def param_random_drop_(param: torch.Tensor, sparsity_level: float, rescale: bool) -> None:
    """FusionBench's DARE drop, in place on ``param.data``: keep where a draw exceeds the sparsity
    level (probability computed exactly as for ``torch.rand_like``), then ÷ (1 − sparsity_level)."""
    data = param.data if isinstance(param, torch.Tensor) else None
    if (_options["rng"] == "hash" and data is not None and data.dtype in _FAST
            and isinstance(sparsity_level, numbers.Real) and not isinstance(sparsity_level, bool)
            and bool(torch.isfinite(data).all())):
        param.data = _dare.random_drop(data, float(sparsity_level), bool(rescale), _draw_seed(),
                                       _options["backend"])
        return None
    return _orig(DARE_MODULE, "param_random_drop_")(param, sparsity_level, rescale)


_DROP_INS = {"topk_values_mask": topk_values_mask, "resolve_sign": resolve_sign, "ties_merging": ties_merging,
             "param_random_drop_": param_random_drop_}


# ---------------------------------------------------------------- install / uninstall

def _loaded_fusion_bench_modules():
    return [m for name, m in list(sys.modules.items())
            if m is not None and (name == "fusion_bench" or name.startswith("fusion_bench."))]


def install(**options) -> None:
    """Patch FusionBench (idempotent); ``options`` go to :func:`set_options`."""
    with _lock:
        if options:
            set_options(**options)
        if _state["installed"]:
            return
        originals = {(mod, n): getattr(_module(mod), n) for mod, names in PATCHES.items() for n in names}
        by_id = {id(fn): n for (_, n), fn in originals.items()}
        patched = []
        for m in _loaded_fusion_bench_modules():
            for attr, value in list(vars(m).items()):
                name = by_id.get(id(value))
                if name is not None and value is originals[(_owner(name), name)]:
                    patched.append((m, attr, value))
        for m, attr, value in patched:
            setattr(m, attr, _DROP_INS[by_id[id(value)]])
        _state.update(installed=True, patched=patched, originals=originals)


def _owner(name: str) -> str:
    return next(mod for mod, names in PATCHES.items() if name in names)


def uninstall() -> None:
    """Put FusionBench's own functions back, also in modules imported while installed."""
    with _lock:
        if not _state["installed"]:
            return
        for m, attr, value in _state["patched"]:
            setattr(m, attr, value)
        ours = {id(fn): n for n, fn in _DROP_INS.items()}
        for m in _loaded_fusion_bench_modules():  # imported after install(): they hold our functions
            for attr, value in list(vars(m).items()):
                name = ours.get(id(value))
                if name is not None and value is _DROP_INS[name]:
                    setattr(m, attr, _state["originals"][(_owner(name), name)])
        _state.update(installed=False, patched=[], originals={})


def is_installed() -> bool:
    return bool(_state["installed"])
