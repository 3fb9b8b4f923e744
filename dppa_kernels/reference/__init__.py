"""Pure-torch reference implementations: the definition of every method in dppa_kernels.

Plain, readable, float64-capable torch code. Every fast backend (C++ CPU, Triton, CUDA) is tested
against these functions; they are also the fallback backend (``backend="reference"``).
"""

from . import rng
from .dppa import (
    HIST_BINS,
    DPAllocation,
    band_thresholds,
    dp_allocate,
    histogram_ref,
    hist_mean,
    outlier_ratio,
    threshold_from_hist,
)
from .merge import combine_ref, merge_ref, sparsify_factor, sparsify_ref
from .naming import DEFAULT_LAYER_PATTERN, DEFAULT_UNIT_PATTERN, group_units, unit_layer
from .sparsify import band_factors, breadcrumbs_window, della_probabilities, rescale_factor
from .threshold import (
    band_codes_ref,
    keep_count,
    key_to_value,
    magnitude_keys,
    magnitude_mask_ref,
    magnitude_threshold_ref,
    no_keep_key,
    rank_desc,
)

__all__ = [name for name in dir() if not name.startswith("_")]
