"""Drop-ins for ``peft.utils.merge_utils`` (PEFT 0.21) running on our kernels.

Same names, signatures, semantics and output dtypes as PEFT: ``prune``,
``magnitude_based_pruning``, ``random_pruning``, ``calculate_majority_sign_mask``,
``disjoint_merge``, ``task_arithmetic``, ``magnitude_prune``, ``ties``, ``dare_linear``,
``dare_ties``. ``install()`` patches them into ``peft.utils.merge_utils`` and into
``peft.tuners.lora.model`` (which imports the five merge functions by name, so that is where
``LoraModel.add_weighted_adapter`` looks them up); ``uninstall()`` restores PEFT's originals.

Differences, all documented and none silent:

* Random draws (``random_pruning``, ``dare_*``): our counter-hash RNG needs a seed; each call
  draws one from torch's global CPU generator, so ``torch.manual_seed`` still makes runs
  reproducible. The masks differ from PEFT's ``torch.bernoulli`` draws (equal in distribution).
  ``set_options(rng="torch")`` draws the masks exactly like PEFT instead (same global-RNG
  stream, so identical masks for the same seed); only the combine then runs in our kernels.
* Density 0 with ``rescale``: PEFT divides by 0 and returns NaN (its known defect). We do the same
  by default; ``set_options(zero_density="zeros")`` returns the pruned (all-zero) values instead.
* Arithmetic runs in fp32 and is rounded once to PEFT's output dtype, so low-precision inputs can
  differ from PEFT in the last bit; magnitude ties at the cut are broken by index (PEFT's
  ``topk`` breaks them arbitrarily). fp32 inputs without ties give PEFT's values.
* Our kernels are not differentiable: when autograd is recording and an input requires grad, the
  public functions fall back to PEFT's own code. The functions patched into LoRA's module run on
  detached inputs (``add_weighted_adapter`` only assigns results to ``.data``).
* PEFT's code also runs for what it refuses or computes otherwise, so its errors and results stay:
  float64 inputs, weights that are not a tensor with one value per task (a list: PEFT raises; a
  0-dim weight: PEFT scales every task by it), float64 weights (a float64 result), a density that
  is not a finite number.
"""

from __future__ import annotations

import math
import numbers
import threading
import warnings
from typing import Literal

import torch

from ..ops import merge_deltas
from ..ops import prune as _dk_prune
from ..spec import CombineSpec, SparsifySpec
from ._deps import records_grad, require

__all__ = ["prune", "magnitude_based_pruning", "random_pruning", "calculate_majority_sign_mask",
           "disjoint_merge", "task_arithmetic", "magnitude_prune", "ties", "dare_linear", "dare_ties",
           "install", "uninstall", "is_installed", "set_options", "get_options", "FUNCTIONS"]

FUNCTIONS = ("prune", "magnitude_based_pruning", "random_pruning", "calculate_majority_sign_mask",
             "disjoint_merge", "task_arithmetic", "magnitude_prune", "ties", "dare_linear", "dare_ties")
LORA_NAMES = ("dare_linear", "dare_ties", "magnitude_prune", "task_arithmetic", "ties")
_FAST = (torch.bfloat16, torch.float16, torch.float32)

_options = {"rng": "hash", "zero_density": "nan", "backend": "auto"}
_lock = threading.RLock()
_state: dict = {"installed": False, "saved": {}}


def set_options(*, rng: str = None, zero_density: str = None, backend: str = None) -> None:
    """rng: ``hash`` (ours, default) or ``torch`` (PEFT's exact draws); zero_density: ``nan``
    (PEFT, default) or ``zeros``; backend: as in :func:`dppa_kernels.merge_deltas`."""
    if rng is not None and rng not in ("hash", "torch"):
        raise ValueError(f"rng must be 'hash' or 'torch', got {rng!r}")
    if zero_density is not None and zero_density not in ("nan", "zeros"):
        raise ValueError(f"zero_density must be 'nan' or 'zeros', got {zero_density!r}")
    for k, v in (("rng", rng), ("zero_density", zero_density), ("backend", backend)):
        if v is not None:
            _options[k] = v


def get_options() -> dict:
    return dict(_options)


def _peft():
    return require("peft.utils.merge_utils", "peft", "dppa_kernels.integrations.peft")


def _orig(name: str):
    """PEFT's own implementation (the saved one while installed)."""
    return _state["saved"].get(("merge_utils", name)) or getattr(_peft(), name)


def _needs_peft(tensors, weights=None, grad: bool = True) -> bool:
    """Inputs our kernels do not take (or autograd needs) go to PEFT's own code."""
    tensors = list(tensors)
    if not tensors or any(not isinstance(t, torch.Tensor) or t.dtype not in _FAST for t in tensors):
        return True
    if any(t.dtype != tensors[0].dtype or t.shape != tensors[0].shape or t.device != tensors[0].device
           for t in tensors):
        return True
    return grad and records_grad(tensors + [weights])


def _merge_needs_peft(task_tensors, weights, density, grad: bool) -> bool:
    """As :func:`_needs_peft`, for the merge functions. PEFT's own code also takes what it refuses
    or computes differently: weights that are not a tensor (it raises), that are not one value per
    task along dim 0 (it broadcasts them: a 0-dim weight scales every task; or it raises), that sit
    on another device, or that promote the result out of bf16/fp16/fp32 (float64 weights give a
    float64 result); and a density that is not a finite number (it raises, or takes a tensor)."""
    task_tensors = list(task_tensors)
    if _needs_peft(task_tensors, weights, grad):
        return True
    t = task_tensors[0]
    if not isinstance(weights, torch.Tensor) or weights.device != t.device \
            or torch.promote_types(t.dtype, weights.dtype) not in _FAST:
        return True
    if not (1 <= weights.dim() <= t.dim() + 1 and weights.shape[0] == len(task_tensors)
            and weights.numel() == len(task_tensors)):
        return True
    return density is not None and (isinstance(density, bool) or not isinstance(density, numbers.Real)
                                    or not math.isfinite(density))


def _draw_seed() -> int:
    return int(torch.randint(0, 2**62, (1,), generator=torch.default_generator))


def _torch_mask(t: torch.Tensor, density: float) -> torch.Tensor:
    return torch.bernoulli(torch.full_like(input=t, fill_value=density))


# ---------------------------------------------------------------- single-tensor pruning

def magnitude_based_pruning(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density·numel) largest |x| (PEFT: top-k; ties at the cut by index here)."""
    if _needs_peft([tensor]):
        return _orig("magnitude_based_pruning")(tensor, density)
    return _dk_prune(tensor, "magnitude", density=density, count_rule="floor", tie_mode="exact_k",
                     check_finite=False, backend=_options["backend"])


def random_pruning(tensor: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
    """Keep each element with probability density; with rescale, divide by density."""
    if _needs_peft([tensor]):
        return _orig("random_pruning")(tensor, density, rescale)
    if rescale and density == 0:
        # PEFT computes 0/0 = NaN here (its known defect); zero_density="zeros" opts out
        return tensor * 0 if _options["zero_density"] == "zeros" else torch.full_like(tensor, float("nan"))
    if _options["rng"] == "torch":
        mask = _torch_mask(tensor, density)
        return tensor * mask / density if rescale else tensor * mask
    return _dk_prune(tensor, "dare", density=density, rescale="inv_density" if rescale else "none",
                     seed=_draw_seed(), check_finite=False, backend=_options["backend"])


def prune(tensor: torch.Tensor, density: float, method: Literal["magnitude", "random"],
          rescale: bool = False) -> torch.Tensor:
    """PEFT's ``prune``: density >= 1 warns and returns the input; density < 0 raises."""
    if density >= 1:
        warnings.warn(f"The density {density} is greater than or equal to 1, no pruning will be performed.")
        return tensor
    elif density < 0:
        raise ValueError(f"Density should be >= 0, got {density}")
    if method == "magnitude":
        return magnitude_based_pruning(tensor, density)
    elif method == "random":
        return random_pruning(tensor, density, rescale=rescale)
    raise ValueError(f"Unknown method {method}")


# ---------------------------------------------------------------- sign election helpers

def calculate_majority_sign_mask(tensor: torch.Tensor,
                                 method: Literal["total", "frequency"] = "total") -> torch.Tensor:
    """Bool mask: sign(x) equals the majority sign over dim 0 (sum or count of signs, >= 0 → +)."""
    if method == "total":
        vote = tensor.sum(dim=0)
    elif method == "frequency":
        vote = tensor.sign().sum(dim=0)
    else:
        raise RuntimeError(f'Unimplemented mask method "{method}"')
    plus = vote >= 0
    # no materialised sign tensor: x agrees iff it is nonzero with the majority's sign
    return torch.where(plus, tensor > 0, tensor < 0)


def disjoint_merge(task_tensors: torch.Tensor, majority_sign_mask: torch.Tensor) -> torch.Tensor:
    """Σ of the agreeing values / max(#agreeing, 1) (PEFT's dtype promotion kept)."""
    mixed = (task_tensors * majority_sign_mask).sum(dim=0)
    return mixed / torch.clamp(majority_sign_mask.sum(dim=0), min=1.0)


# ---------------------------------------------------------------- fused merges

def _out_dtype(tensors, weights, ties_like: bool) -> torch.dtype:
    dt = tensors[0].dtype
    if isinstance(weights, torch.Tensor):
        dt = torch.promote_types(dt, weights.dtype)
    # PEFT's disjoint_merge divides by a float32 count
    return torch.promote_types(dt, torch.float32) if ties_like else dt


def _weights(weights, n: int) -> list:
    w = weights.detach().reshape(-1).tolist() if isinstance(weights, torch.Tensor) else list(weights)
    if len(w) != n:
        raise RuntimeError(f"weights has {len(w)} values for {n} task tensors")
    return [float(x) for x in w]


def _fused(task_tensors, weights, density, sparsifier: str, combine: CombineSpec,
           detach: bool = False) -> torch.Tensor:
    ts = [t.detach() for t in task_tensors] if detach else list(task_tensors)
    out_dtype = _out_dtype(ts, weights, combine.combine == "ties")
    n = len(ts)
    if sparsifier == "none" or density >= 1:
        if sparsifier != "none":  # PEFT's prune warns once per tensor
            for _ in ts:
                warnings.warn(f"The density {density} is greater than or equal to 1, no pruning will be performed.")
        specs = [SparsifySpec("none")] * n
    elif density < 0:
        raise ValueError(f"Density should be >= 0, got {density}")
    elif sparsifier == "magnitude":
        specs = [SparsifySpec("magnitude", density=float(density), count_rule="floor")] * n
    elif density == 0 and _options["zero_density"] == "nan":
        return torch.full(ts[0].shape, float("nan"), dtype=out_dtype, device=ts[0].device)  # PEFT's 0/0
    elif _options["rng"] == "torch":
        ts = [t * _torch_mask(t, density) / density for t in ts]  # PEFT's draws, in PEFT's order
        specs = [SparsifySpec("none")] * n
    else:
        specs = [SparsifySpec("dare", density=float(density), rescale="inv_density")] * n
    seed = _draw_seed() if any(s.method == "dare" for s in specs) else 0
    return merge_deltas(ts, None, specs=specs, weights=_weights(weights, n), combine=combine, seed=seed,
                        out_dtype=out_dtype, check_finite=False, backend=_options["backend"])


def _ties_combine(method: str) -> CombineSpec:
    if method not in ("total", "frequency"):
        raise RuntimeError(f'Unimplemented mask method "{method}"')
    return CombineSpec(combine="ties", elect="sum" if method == "total" else "frequency",
                       divisor="count", normalize=True)


_SUM = CombineSpec(combine="sum", normalize=False)


def _make(name: str, detach: bool):
    """The five merge functions; ``detach`` versions are patched into LoRA's module."""

    def task_arithmetic(task_tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
        if _merge_needs_peft(task_tensors, weights, None, grad=not detach):
            return _orig("task_arithmetic")(task_tensors, weights)
        return _fused(task_tensors, weights, 1.0, "none", _SUM, detach)

    def magnitude_prune(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float) -> torch.Tensor:
        if _merge_needs_peft(task_tensors, weights, density, grad=not detach):
            return _orig("magnitude_prune")(task_tensors, weights, density)
        return _fused(task_tensors, weights, density, "magnitude", _SUM, detach)

    def ties(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float,
             majority_sign_method: Literal["total", "frequency"] = "total") -> torch.Tensor:
        if _merge_needs_peft(task_tensors, weights, density, grad=not detach):
            return _orig("ties")(task_tensors, weights, density, majority_sign_method)
        return _fused(task_tensors, weights, density, "magnitude", _ties_combine(majority_sign_method), detach)

    def dare_linear(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float) -> torch.Tensor:
        if _merge_needs_peft(task_tensors, weights, density, grad=not detach):
            return _orig("dare_linear")(task_tensors, weights, density)
        return _fused(task_tensors, weights, density, "random", _SUM, detach)

    def dare_ties(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float,
                  majority_sign_method: Literal["total", "frequency"] = "total") -> torch.Tensor:
        if _merge_needs_peft(task_tensors, weights, density, grad=not detach):
            return _orig("dare_ties")(task_tensors, weights, density, majority_sign_method)
        return _fused(task_tensors, weights, density, "random", _ties_combine(majority_sign_method), detach)

    fn = locals()[name]
    fn.__qualname__ = fn.__name__ = name
    fn.__doc__ = f"Drop-in for ``peft.utils.merge_utils.{name}`` (same signature and semantics)."
    return fn


task_arithmetic = _make("task_arithmetic", False)
magnitude_prune = _make("magnitude_prune", False)
ties = _make("ties", False)
dare_linear = _make("dare_linear", False)
dare_ties = _make("dare_ties", False)
_LORA_FNS = {n: _make(n, True) for n in LORA_NAMES}


# ---------------------------------------------------------------- install / uninstall

def _targets():
    mu = _peft()
    lora = require("peft.tuners.lora.model", "peft", "dppa_kernels.integrations.peft")
    here = globals()
    return ([(mu, "merge_utils", n, here[n]) for n in FUNCTIONS]
            + [(lora, "lora", n, _LORA_FNS[n]) for n in LORA_NAMES if hasattr(lora, n)])


def install(**options) -> None:
    """Patch PEFT (idempotent); ``options`` go to :func:`set_options`."""
    with _lock:
        if options:
            set_options(**options)
        if _state["installed"]:
            return
        targets = _targets()
        saved = {(where, n): getattr(mod, n) for mod, where, n, _ in targets}
        for mod, _, n, fn in targets:
            setattr(mod, n, fn)
        _state.update(installed=True, saved=saved, modules={where: mod for mod, where, _, _ in targets})


def uninstall() -> None:
    """Put PEFT's original functions back (a no-op if not installed)."""
    with _lock:
        if not _state["installed"]:
            return
        for (where, n), fn in _state["saved"].items():
            setattr(_state["modules"][where], n, fn)
        _state.update(installed=False, saved={}, modules={})


def is_installed() -> bool:
    return bool(_state["installed"])
