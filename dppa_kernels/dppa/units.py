"""Which tensors DPPA allocates over, and the 2-D weights inside blocks that no unit rule matches.

Units come from ``reference.naming`` (the definition; Llama/Mistral/Qwen names, Mixtral and
Qwen-MoE experts, fused ``qkv_proj`` / ``gate_up_proj`` as one unit each). A 2-D floating weight
inside a numbered block that the unit rule does not match would silently stay dense (or follow
``nonunit_mode``); :func:`unmatched_linears` lists them so every caller can warn and report.
"""

from __future__ import annotations

import logging
import re
from typing import Mapping, Optional, Sequence

from ..reference.naming import DEFAULT_LAYER_PATTERN

LOG = logging.getLogger(__name__)


def unmatched_linears(shapes: Mapping[str, Sequence[int]], units, *, layer_pattern: Optional[str] = None) -> list:
    """Names of 2-D ``*.weight`` tensors inside a numbered block that are not units (sorted)."""
    pat = layer_pattern or DEFAULT_LAYER_PATTERN
    return sorted(n for n, sh in shapes.items()
                  if n not in units and n.endswith(".weight") and sh is not None and len(sh) == 2
                  and re.search(pat, n))


def warn_unmatched(names: Sequence[str]) -> None:
    """One warning for 2-D block weights that no unit rule matched (they are not DP-allocated)."""
    if names:
        LOG.warning("DPPA: %d 2-D weight(s) inside blocks match no unit rule and are treated as non-units "
                    "(nonunit_mode), e.g. %s; set unit_pattern to include them", len(names), ", ".join(names[:3]))
