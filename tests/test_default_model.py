"""The default model as a new user meets it: converted into an empty cache, its fingerprint (a function of the model,
not of the file) pinned, the shipped classifiers picked, and `python -m adainfer.run` exiting early on its default
prompt with the dense answer beside it, in float32 and bfloat16."""

import hashlib
import json
import re
import struct

import pytest
import torch
from helpers import run_cli
from safetensors.torch import load_file
from tiny import hf_model, save_hf

from adainfer.default_model import CONVERSION, FINGERPRINT, NAME
from adainfer.exit import ExitClassifier, shipped_classifier
from adainfer.loading import folder_fingerprint, load_model
from adainfer.run import DEFAULT_CANDIDATES
from weights_convert import convert

# The default model's conversion, byte for byte (safetensors 0.4-0.8, gguf 0.10-0.19, numpy 1.24-2.4, tokenizers
# 0.20-0.23 all write these bytes). A change here is a change in what users get: bump CONVERSION in
# adainfer/default_model.py, set FINGERPRINT, and calibrate the shipped classifiers again (adainfer/classifiers/README).
CONVERTED_SHA256 = {
    "config.json": "04ea815d063e2562c07c1c269a425b40cd942e6a0498adac67db1d35ade2cf3d",
    "model.safetensors": "dd46e2d772d1ca48017ba00be015e09956825c64048922ec0942658c833f6aa2",
    "tokenizer.json": "ee1f6f3bef3b1762e1cb16cfe4e7dd84b3d3ee198791abec56a6476ef9eec50b",
}


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_safetensors(path, tensors: dict, order: list[str], metadata: dict):
    """A safetensors file written by hand, tensors in `order` (what another writer could do)."""
    header, blobs, offset = {"__metadata__": metadata}, [], 0
    for name in order:
        blob = tensors[name].contiguous().numpy().tobytes()
        header[name] = {"dtype": {torch.float32: "F32", torch.bfloat16: "BF16"}[tensors[name].dtype],
                        "shape": list(tensors[name].shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


def test_fingerprint_is_of_the_model_not_the_file(tmp_path):
    src = save_hf(hf_model("llama-gqa-tied", seed=4), tmp_path / "hf")
    folder = tmp_path / "f32"
    convert(src, folder, dtype="float32", progress=False)
    base = load_model(folder, "float32")[0].fingerprint
    assert folder_fingerprint(folder) == base  # the same without building the model
    # a bfloat16 conversion of the same weights: its values are what the fingerprint samples (rounded to bfloat16)
    convert(src, tmp_path / "bf16", dtype="bfloat16", progress=False)
    assert folder_fingerprint(tmp_path / "bf16") == base
    # another tensor order in the file, other header metadata, another name for humans: the same model
    tensors = {k: v.clone() for k, v in load_file(folder / "model.safetensors").items()}  # not views of the file
    write_safetensors(folder / "model.safetensors", tensors, sorted(tensors, reverse=True),
                      {"producer": "someone else", "version": "9"})
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "name": "renamed"}))
    assert folder_fingerprint(folder) == load_model(folder, "float32")[0].fingerprint == base
    # a changed weight or a changed config number is another model
    changed = dict(tensors, **{"norm.weight": tensors["norm.weight"] + 1e-2})
    write_safetensors(folder / "model.safetensors", changed, sorted(changed), {})
    assert folder_fingerprint(folder) != base
    write_safetensors(folder / "model.safetensors", tensors, sorted(tensors), {})
    assert folder_fingerprint(folder) == base
    (folder / "config.json").write_text(json.dumps({**config, "rope_theta": config["rope_theta"] * 2}))
    assert folder_fingerprint(folder) != base


def test_conversion_is_byte_reproducible(tmp_path):
    """Converting the same source again writes the same bytes (two metadata keys made it a coin flip per save)."""
    src = save_hf(hf_model("llama-gqa-tied", seed=5), tmp_path / "hf")
    seen = set()
    for i in range(8):
        convert(src, tmp_path / f"out{i}", dtype="float32", progress=False)
        seen.add(tuple(sha256(tmp_path / f"out{i}" / f) for f in ("config.json", "model.safetensors")))
    assert len(seen) == 1


@pytest.mark.realmodel
def test_default_model_conversion_and_fingerprint_are_pinned(default_model_dir):
    assert default_model_dir.name == f"{NAME}-c{CONVERSION}"
    got = {f: sha256(default_model_dir / f) for f in CONVERTED_SHA256}
    assert got == CONVERTED_SHA256, "the default model converts to other bytes: see CONVERTED_SHA256's comment"
    assert folder_fingerprint(default_model_dir) == FINGERPRINT
    assert load_model(default_model_dir, "bfloat16")[0].fingerprint == FINGERPRINT
    # the shipped classifiers are for this conversion: one over the full vocabulary, one for the default prompt
    full, sentiment = shipped_classifier(FINGERPRINT), shipped_classifier(FINGERPRINT, DEFAULT_CANDIDATES)
    assert full is not None and sentiment is not None and full != sentiment
    for path in (full, sentiment):
        clf = ExitClassifier.load(path)
        assert clf.model["fingerprint"] == FINGERPRINT and clf.calibration["split"] == "train"
        for held in ("heldout", "heldout_bfloat16"):  # fitted in float32; holds in bfloat16 too
            assert clf.calibration[held]["agreement_with_dense"] >= 0.97, (path, held)
    # the shipped speculative draft is for it too, and says what its measurement found
    from adainfer.speculative import load_draft, shipped_draft

    draft, reports = load_draft(shipped_draft(FINGERPRINT), load_model(default_model_dir, "float32")[0])
    assert len(draft.layers) < 30 and {"eager", "int4"} <= set(reports)
    assert all(r["pays"] == (r["predicted_speed_vs_dense"] >= 1.05) for r in reports.values())


def exit_layer(stdout: str) -> int:
    m = re.search(r"exit at layer (\d+)/30", stdout)
    assert m, stdout
    return int(m.group(1))


@pytest.mark.realmodel
@pytest.mark.slow
def test_main_job_on_a_cold_cache_exits_early(tmp_path, default_wheel):
    """The README's first command on an empty cache (an earlier adainfer's conversion left in it): one download
    (the wheel, here this run's copy), one conversion, and an exit below layer 30 with the dense answer."""
    cache = tmp_path / "cache"
    (cache / NAME).mkdir(parents=True)  # what an older adainfer left: never used, removed by the new conversion
    (cache / NAME / "model.safetensors").write_bytes(b"stale")
    env = {"ADAINFER_CACHE": str(cache), "HOME": str(tmp_path / "home"), "ADAINFER_WHEEL": str(default_wheel)}
    proc = run_cli("adainfer.run", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "converting the default model" in proc.stderr
    assert sorted(p.name for p in cache.iterdir() if p.is_dir()) == ["downloads", f"{NAME}-c{CONVERSION}"]
    assert "over the candidates [' negative', ' positive'], fitted on sst2" in proc.stdout, proc.stdout
    layer = exit_layer(proc.stdout)
    assert layer < 30 and "answer: ' positive'" in proc.stdout and "same answer" in proc.stdout, proc.stdout
    # --json says the same; and the exit holds in both dtypes, whichever --dtype auto picks on this CPU
    for dtype in ("auto", "float32", "bfloat16"):
        proc = run_cli("adainfer.run", "--json", "--dtype", dtype, env=env)
        assert proc.returncode == 0, proc.stderr
        exited = json.loads(proc.stdout)
        dense = json.loads(run_cli("adainfer.run", "--json", "--dtype", dtype, "--dense",
                                   "--candidates", *DEFAULT_CANDIDATES, env=env).stdout)
        assert exited["layers_run"][0] < 30 and dense["layers_run"] == [30], (dtype, exited)
        assert exited["text"] == dense["text"] == " positive", dtype
        if dtype == "auto":
            assert exited["layers_run"] == [layer]
    # a prompt of the user's own takes the full-vocabulary classifier
    proc = run_cli("adainfer.run", "--prompt", "The capital of France is", env=env)
    assert proc.returncode == 0 and "over the full vocabulary" in proc.stdout and "answer: ' Paris'" in proc.stdout
    # token mode with it: every decode step checks the 49152 x 576 head (8 blocks' weights) at layers 28 and 29
    proc = run_cli("adainfer.run", "--prompt", "The capital of France is", "--max-new-tokens", "2", "--exit-mode",
                   "token", "--dtype", "float32", env=env)
    assert proc.returncode == 0, proc.stderr
    assert ("a check here reads as many weights as 8.0 blocks: past layer 22 it costs more than an exit could save, "
            "and this classifier checks from layer 28") in proc.stderr
