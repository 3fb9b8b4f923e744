"""FusionBench's ``fusion_bench`` command with our kernels installed first and ``method=dppa`` available.

    python -m dppa_kernels.integrations.fusion_bench_cli method=ties_merging modelpool=... taskpool=...
    python -m dppa_kernels.integrations.fusion_bench_cli method=dppa modelpool=... taskpool=...

Takes exactly FusionBench's arguments (Hydra overrides, ``--config-path``, ``--config-name``,
``--config-dir``, ...): it calls :func:`dppa_kernels.integrations.fusion_bench.install`, puts our
method configs on Hydra's search path (``hydra.searchpath``, appended to one given on the command
line) and then runs FusionBench's own entry point, so every method that uses FusionBench's TIES or
DARE utilities runs on our kernels. ``DPPA_FUSION_BENCH_RNG=torch`` selects FusionBench's own DARE draws.
"""

from __future__ import annotations

import os
import sys
from typing import List

from ._deps import require

SEARCH_PATH = "pkg://dppa_kernels.integrations.fusion_bench_config"  # method/dppa.yaml
_KEY = "hydra.searchpath="


def with_search_path(argv: List[str]) -> List[str]:
    """``argv`` with our config package on Hydra's search path (added to a given ``hydra.searchpath``)."""
    out, seen = [], False
    for arg in argv:
        if arg.startswith(_KEY) and not seen:
            seen = True
            value = arg[len(_KEY):].strip()
            if SEARCH_PATH not in value:
                inner = value[1:-1].strip() if value.startswith("[") and value.endswith("]") else value
                arg = f"{_KEY}[{inner + ',' if inner else ''}{SEARCH_PATH}]"
        out.append(arg)
    return out if seen else [*out, f"{_KEY}[{SEARCH_PATH}]"]


def main() -> None:
    from .fusion_bench import get_options, install

    cli = require("fusion_bench.scripts.cli", "fusion-bench", "dppa_kernels.integrations.fusion_bench_cli")
    install(rng=os.environ.get("DPPA_FUSION_BENCH_RNG", "hash"))
    print(f"dppa-kernels: FusionBench's TIES and DARE utilities run on dppa_kernels ({get_options()}); "
          f"method=dppa available", file=sys.stderr)
    sys.argv = [sys.argv[0], *with_search_path(sys.argv[1:])]
    cli._hydra_main()


if __name__ == "__main__":
    main()
