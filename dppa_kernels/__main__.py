"""``python -m dppa_kernels [info|demo|...]``: the same commands as the ``dppa`` console script."""

import sys


def _main() -> None:
    try:
        from .cli import main
    except ImportError:  # CLI dependencies missing: info still works
        from .info import main as info_main

        if sys.argv[1:2] in ([], ["info"]):
            info_main()
            return
        raise
    main()


if __name__ == "__main__":
    _main()
