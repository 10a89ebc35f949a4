"""What the four command-line tools share: parse, run the typed call, and turn bad input into one line and exit 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from adainfer.distributed import current_world
from adainfer.errors import AdainferError


def cli_main(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], int | None],
             argv: list[str] | None = None) -> int:
    """Parse argv with `parser` and call run(args); an AdainferError is printed as `error: WHERE: PROBLEM` on stderr,
    without a traceback, and the exit status is 2."""
    args = parser.parse_args(argv)
    try:
        return run(args) or 0
    except AdainferError as e:
        rank = current_world().rank
        print(f"error: {e}" if rank == 0 else f"error (rank {rank}): {e}", file=sys.stderr)
        return 2
