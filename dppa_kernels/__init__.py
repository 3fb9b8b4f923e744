"""dppa_kernels: fused kernels for pruning and merging LLM delta parameters, and for PAT.

Importing the package never fails for lack of a compiled extension or of triton: backends that
cannot load are recorded with their reason (``python -m dppa_kernels info``) and reported only
when requested.
"""

__version__ = "0.1.0"

from .ops import (  # noqa: E402
    dp_densities,
    magnitude_threshold,
    merge_deltas,
    prune,
    sparsify_spec,
    tensor_histogram,
)
from .spec import CombineSpec, SparsifySpec  # noqa: E402
from . import dppa  # noqa: E402  (whole-model DPPA and the α search: dk.dppa.DPPA)

__all__ = [
    "CombineSpec",
    "SparsifySpec",
    "dp_densities",
    "dppa",
    "magnitude_threshold",
    "merge_deltas",
    "prune",
    "sparsify_spec",
    "tensor_histogram",
]
