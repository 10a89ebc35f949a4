"""The command-line tools run as a user would (subprocess) on a tiny converted model."""

import json

import pytest
import torch
from helpers import run_cli
from tiny import hf_model, save_hf

from adainfer.engine import load
from adainfer.exit import ExitClassifier, ExitRule, Exits, Plan
from adainfer.generate import generate
from adainfer.loading import load_model


def test_convert_cli(tmp_path):
    src = save_hf(hf_model("opt-350m-like", seed=9), tmp_path / "hf")
    proc = run_cli("weights_convert", src, tmp_path / "ours", "--dtype", "float32", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout and "opt, 3 layers" in proc.stdout
    model, tok = load_model(tmp_path / "ours", "float32")
    assert model.config.arch == "opt" and not model.config.pre_norm and tok is not None


def test_run_json_single_prompt(tiny_model):
    proc = run_cli("adainfer.run", "--model", tiny_model, "--prompt", "hello world", "--json", "--dtype", "float32",
                   "--max-new-tokens", "3")
    assert proc.returncode == 0, proc.stderr
    (line,) = proc.stdout.strip().splitlines()
    r = json.loads(line)
    assert set(r) >= {"prompt", "text", "token_ids", "layers_run", "num_layers", "seconds"}
    model, tok = load_model(tiny_model, "float32")
    want = generate(model, [tok.encode("hello world")], max_new_tokens=3)[0]
    assert r["prompt"] == "hello world" and r["token_ids"] == want.token_ids
    assert r["text"] == tok.decode(want.token_ids)
    assert r["layers_run"] == [3, 3, 3] and r["num_layers"] == 3 and r["seconds"] > 0


def test_run_prompts_file_batched_keeps_input_order(tiny_model, tmp_path):
    texts = ["a much longer prompt than the others, to force padding", "hi", "medium sized prompt", "x", "hello"]
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    proc = run_cli("adainfer.run", "--model", tiny_model, "--prompts", f, "--batch-size", "3", "--json",
                   "--dtype", "float32", "--max-new-tokens", "4")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    assert [r["prompt"] for r in rows] == texts
    model, tok = load_model(tiny_model, "float32")
    for r in rows:
        assert r["token_ids"] == generate(model, [tok.encode(r["prompt"])], max_new_tokens=4)[0].token_ids


def test_run_sync_every_answers_as_every_check_read(tiny_model, tmp_path, monkeypatch):
    """--sync-every 2: decisions read every 2 checks, each row still answering from the layer its rule fired at (the
    answers and layers of reading every check, prompt by prompt in Python)."""
    clf = ExitClassifier("svm", ["gap"], [1.0], -0.02)  # fires at different layers for different rows
    clf.save(tmp_path / "c.json")
    texts = ["a much longer prompt than the others, to force padding", "hi", "medium sized prompt", "x", "hello"]
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    proc = run_cli("adainfer.run", "--model", tiny_model, "--prompts", f, "--batch-size", "3", "--json", "--dtype",
                   "float32", "--max-new-tokens", "3", "--exit", tmp_path / "c.json", "--sync-every", "2")
    assert proc.returncode == 0, proc.stderr
    model, tok = load_model(tiny_model, "float32")
    for r in map(json.loads, proc.stdout.strip().splitlines()):
        want = generate(model, [tok.encode(r["prompt"])], 3, Plan(exit=ExitRule(clf)))[0]
        assert r["token_ids"] == want.token_ids and r["layers_run"] == want.layers_run
    # what the option reaches: Engine.generate's plans keep the decisions on the device between reads
    noted = []
    monkeypatch.setattr(Exits, "_note", lambda self, *a, note=Exits._note: noted.append(1) or note(self, *a))
    load(tiny_model, "float32").generate(texts, 3, exit=tmp_path / "c.json", batch_size=3, sync_every=2)
    assert noted


def test_run_human_output(tiny_model):
    proc = run_cli("adainfer.run", "--model", tiny_model, "--prompt", "hello", "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    assert "answer:" in proc.stdout and "layers 3/3" in proc.stdout and " ms" in proc.stdout
    # a model nothing is shipped for runs dense, and says why and what to do
    assert "exit: none, dense (no exit classifier is shipped for this model; calibrate one" in proc.stdout


@pytest.mark.realmodel
@pytest.mark.slow
def test_run_default_no_arguments(default_model_dir):
    proc = run_cli("adainfer.run")
    assert proc.returncode == 0, proc.stderr
    assert "answer: ' positive'" in proc.stdout, proc.stdout
    assert "exit at layer" in proc.stdout and "same answer" in proc.stdout and " ms" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_every_cli_refuses_cuda_where_there_is_none(tiny_model, tmp_path):
    rows = tmp_path / "t.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"item {i}", "answer": "x"}) + "\n" for i in range(6)))
    for args in (("adainfer.run", "--prompt", "hi"),
                 ("adainfer.calibrate", "--prompts", rows, "--out", tmp_path / "c.json"),
                 ("adainfer.eval", "--task-file", rows, "--method", "dense", "--out", tmp_path / "e.json")):
        proc = run_cli(*args, "--model", tiny_model, "--device", "cuda")
        assert proc.returncode == 2 and "--device: 'cuda' is not available here" in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "c.json").exists() and not (tmp_path / "e.json").exists()
