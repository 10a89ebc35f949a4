"""Helpers shared by the tests: paths and running the command-line tools as a user would."""

import os
import subprocess
import sys
from pathlib import Path

import torch

from adainfer.translator import Translator

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args, env=None, timeout=600, cwd=None):
    """Run `python -m ...` as a user would; return the CompletedProcess (text mode)."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=full_env, cwd=cwd or ROOT)


def random_translator(dim, layers, scale=0.05, seed=0, kind="affine", rank=3):
    """A translator with small random maps for `layers` (not fitted: it changes each reading a little)."""
    g = torch.Generator().manual_seed(seed)
    maps = {}
    for n in layers:
        m = {"d": torch.randn(dim, dim, generator=g) * scale} if kind == "affine" else \
            {"v": torch.randn(dim, rank, generator=g) * scale, "u": torch.randn(rank, dim, generator=g) * scale}
        maps[n] = {**m, "b": torch.randn(dim, generator=g) * scale}
    return Translator(kind, dim, maps, rank if kind == "lowrank" else None)
