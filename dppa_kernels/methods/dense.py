"""No sparsification: task arithmetic (arXiv 2212.04089) and mergekit's linear average."""

from __future__ import annotations

import torch

from ..backends.base import ApplyPlan
from ..spec import SparsifySpec
from . import _common as C
from .registry import MergeMethod, Sparsifier, register


class Dense(Sparsifier):
    """Every element kept with factor 1."""

    name = "none"
    prune = False
    uses_density = False
    mergekit = None

    def spec(self, i, p, m, common):
        return SparsifySpec("none")  # nothing to threshold, rescale or partition

    def plan(self, be, delta, spec, *, seed, name, stream, check_as):
        return ApplyPlan("dense")

    def factor(self, delta, spec, *, seed, name, stream):
        return torch.ones(delta.shape, dtype=torch.float64, device=delta.device)

    def target(self, spec):
        return 1.0

    def realised(self, delta, spec, **_):
        return 1.0


register(
    Dense(),
    MergeMethod("task_arithmetic", "Task arithmetic", "none", "sum", False, False, C.gta_params(False),
                reference="2212.04089"),
    # mergekit's "linear" is a weighted average of whole models, not a GTA method: offered by
    # merge_deltas only
    MergeMethod("linear", "Linear (weighted average)", "none", "sum", True, False, C.gta_params(True),
                mergekit=None, engine=False),
)
