"""What the four command-line tools share: parse, run the typed call, and turn bad input into one line and exit 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from adainfer.distributed import current_world
from adainfer.errors import AdainferError


def add_prefill_option(p: argparse.ArgumentParser) -> None:
    """--prefill: how a prompt's blocks run (adainfer.fast_prefill.prefill_mode)."""
    p.add_argument("--prefill", default="eager", choices=["eager", "compiled", "captured"],
                   help="how a prompt's blocks run: eager (the modules, default), compiled (each block through "
                        "torch.compile/inductor, compiled on first use, before the clock starts; 5-7%% faster in "
                        "float32 for the default model on a 2-core Xeon, see README) or captured (--device cuda: "
                        "the compiled blocks replayed from CUDA graphs, captured per prompt shape)")


def check_prefill_option(args: argparse.Namespace) -> None:
    """Refuse --prefill captured off a GPU, before anything loads."""
    from adainfer.fast_prefill import check_prefill_device

    check_prefill_device(args.prefill, args.device)


def add_check_options(p: argparse.ArgumentParser) -> None:
    """--sync-every and --capture-checks: how exit checks meet the host (adainfer.run and adainfer.eval)."""
    p.add_argument("--sync-every", type=int, default=1, metavar="N",
                   help="read exit decisions from the device every N checks (default 1; on a GPU one host "
                        "synchronisation for N layers: a row that fired answers from, and reports, the layer it "
                        "fired at, having run on to the read, so pruning counts the former and seconds the latter)")
    p.add_argument("--capture-checks", action="store_true",
                   help="replay each exit check as a CUDA graph (--device cuda; adainfer.exit.CheckGraphs)")


def check_check_options(args: argparse.Namespace) -> None:
    """Refuse --capture-checks (and --prefill captured) off a GPU and --sync-every below 1, before anything loads."""
    from adainfer.exit import check_capture_checks

    check_capture_checks(args.capture_checks, args.device)
    check_prefill_option(args)
    if args.sync_every < 1:
        raise AdainferError("--sync-every", f"must be at least 1, got {args.sync_every}")


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
