"""``python -m csl_fast`` and the ``csl-fast`` console script (see :mod:`csl_fast.cli`)."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``csl-fast`` command line; returns the exit code (see :mod:`csl_fast.cli`)."""
    from .cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
