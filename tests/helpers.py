"""Helpers shared by the tests: paths and running the command-line tools as a user would."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args, env=None, timeout=600, cwd=None):
    """Run `python -m ...` as a user would; return the CompletedProcess (text mode)."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=full_env, cwd=cwd or ROOT)
