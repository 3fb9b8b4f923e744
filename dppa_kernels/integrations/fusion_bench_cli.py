"""FusionBench's ``fusion_bench`` command with our kernels installed first.

    python -m dppa_kernels.integrations.fusion_bench_cli method=ties_merging modelpool=... taskpool=...

Takes exactly FusionBench's arguments (Hydra overrides, ``--config-path``, ``--config-name``,
``--config-dir``, ...): it calls :func:`dppa_kernels.integrations.fusion_bench.install` and then
FusionBench's own entry point, so every method that uses FusionBench's TIES or DARE utilities
runs on our kernels. ``DPPA_FUSION_BENCH_RNG=torch`` selects FusionBench's own DARE draws.
"""

from __future__ import annotations

import os
import sys

from ._deps import require


def main() -> None:
    from .fusion_bench import get_options, install

    cli = require("fusion_bench.scripts.cli", "fusion_bench", "dppa_kernels.integrations.fusion_bench_cli")
    install(rng=os.environ.get("DPPA_FUSION_BENCH_RNG", "hash"))
    print(f"dppa-kernels: FusionBench's TIES and DARE utilities run on dppa_kernels ({get_options()})",
          file=sys.stderr)
    cli._hydra_main()


if __name__ == "__main__":
    main()
