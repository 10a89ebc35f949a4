"""python -m weights_convert SRC DST: see weights_convert/__init__.py."""

from __future__ import annotations

import argparse
import sys
import time

from adainfer.cli import cli_main
from weights_convert import DTYPES, convert


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m weights_convert",
                                description="Convert a Hugging Face model folder or a GGUF file to an adainfer folder.")
    p.add_argument("src", help="Hugging Face folder (config.json + safetensors or pytorch_model*.bin) or a .gguf file")
    p.add_argument("dst", help="output folder (must not exist unless --force)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="dtype of the stored weights (auto: the source's; float32 for GGUF)")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow pytorch_model*.bin (loaded with torch.load(weights_only=True))")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    return cli_main(build_parser(), run, argv)


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    config = convert(args.src, args.dst, dtype=args.dtype, force=args.force, allow_pickle=args.allow_pickle,
                     progress=not args.quiet)
    print(f"wrote {args.dst}: {config.arch}, {config.n_layers} layers, dim {config.dim}, vocab {config.vocab_size} "
          f"({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
