"""``dppa-mergekit-yaml CONFIG OUT [mergekit options]``: ``mergekit-yaml`` with our backend.

Same arguments (mergekit's own option set), same output layout. The backend is installed for
the run, the DPPA statistics pre-pass runs first when ``merge_method`` is dppa / dppa_ties, and
DARE/DELLA draws are seeded from ``--random-seed`` (default 0).
Also runnable as ``python -m dppa_kernels.integrations.mergekit_cli``.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from ._deps import require

PROG = "dppa-mergekit-yaml"


def build_command():
    """The click command; built on first use so a missing mergekit is a clear ImportError."""
    click = require("click", "mergekit", PROG)
    require("mergekit", "mergekit", PROG)
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.options import PrettyPrintHelp, add_merge_options

    from .mergekit import run_merge

    @click.command(PROG, cls=PrettyPrintHelp)
    @click.argument("config_file")
    @click.argument("out_path")
    @add_merge_options
    def command(merge_options, config_file: str, out_path: str) -> None:
        merge_options.apply_global_options()
        with open(config_file, encoding="utf-8") as f:
            source = f.read()
        config = MergeConfiguration.model_validate(yaml.safe_load(source))
        run_merge(config, out_path, options=merge_options, config_source=source)

    return command


def main(argv: Optional[Sequence[str]] = None) -> None:
    build_command()(args=list(sys.argv[1:] if argv is None else argv), prog_name=PROG)


if __name__ == "__main__":
    main()
