"""Parameters and helpers that several methods share (each method lists the ones it takes)."""

from __future__ import annotations

from ..reference.threshold import COUNT_RULES, PARTITIONS, TIE_MODES
from ..spec import DIVISORS, ELECTS
from .registry import Param


def weight(required: bool = True) -> Param:
    return Param("weight", float, 1.0, "model", "scale w_i of model i's delta", required=required)


DENSITY = Param("density", float, 1.0, "model", "fraction of the delta kept", low=0.0, high=1.0)


NORMALIZE_DOC = "divide by the sum of the weights (ties: of the agreeing weights)"
RESCALE = Param("rescale", bool, None, "global", "true: after dropping, match the delta's L1 norm (mergekit); "
                "inv_density: divide by the density (DARE paper, PEFT); default per method",
                choices=("inv_density", "l1"))
LAMBDA = Param("lambda", float, 1.0, "global", "scale λ of the merged delta")
INT8_MASK = Param("int8_mask", bool, False, "global", "accepted for mergekit compatibility; no effect")
# our knobs beyond mergekit's parameters (dppa merge and merge_deltas only)
TIE_MODE = Param("tie_mode", str, "exact_k", "global", "who is kept at the threshold: exactly k "
                 "(by index), every tie (ge) or none (gt)", choices=TIE_MODES, mergekit=False)
COUNT_RULE = Param("count_rule", str, "min1", "global", "keep count k from density d and n elements",
                   choices=COUNT_RULES, mergekit=False)
PARTITION = Param("partition", str, "tensor", "global", "threshold per tensor, row or block",
                  choices=PARTITIONS, mergekit=False)
BLOCK_SIZE = Param("block_size", int, None, "global", "elements per block (partition: block)", low=1,
                   mergekit=False)
ELECT = Param("elect", str, "weighted_sum", "global", "ties sign election", choices=ELECTS, mergekit=False)
DIVISOR = Param("divisor", str, "weights", "global", "what normalize divides by", choices=DIVISORS,
                mergekit=False)
ADVANCED = (TIE_MODE, COUNT_RULE, PARTITION, BLOCK_SIZE, ELECT, DIVISOR)


def normalize(default: bool) -> Param:
    return Param("normalize", bool, default, "global", NORMALIZE_DOC)


def gta_params(norm: bool, *extra: Param, density_param: bool = True) -> tuple:
    """mergekit's generalized-task-arithmetic parameters (weight, density, normalize, rescale,
    lambda, int8_mask), the method's ``extra`` ones, then our advanced knobs."""
    dens = (DENSITY,) if density_param else ()
    return (weight(), *dens, *extra, normalize(norm), RESCALE, LAMBDA, INT8_MASK, *ADVANCED)
