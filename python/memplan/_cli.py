"""The ``memplan`` console script: the Rust CLI itself, on this process's stdout and stderr."""

from __future__ import annotations

import sys
from typing import List, Optional

from memplan import _memplan


def main(argv: Optional[List[str]] = None) -> None:
    """Runs ``memplan`` with ``argv`` (default ``sys.argv``) and exits with its code (0 fits,
    1 does not fit, 2 bad input, 3 output or internal failure).

    >>> main(["memplan", "profiles", "--format", "json"])  # doctest: +SKIP
    """
    args = list(sys.argv if argv is None else argv)
    if not args:
        args = ["memplan"]
    sys.exit(_memplan.main(args))


if __name__ == "__main__":
    main()
