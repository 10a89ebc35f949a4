"""python -m adainfer.calibrate and python -m adainfer.run --exit, as a user runs them, on a tiny model."""

import json

import pytest
import torch
from helpers import run_cli

from adainfer.exit import ExitClassifier, ExitRule, Plan
from adainfer.loading import load_model

SST2_ROWS = [("a warm, funny film", 1), ("dull and lifeless", 0), ("a triumph", 1), ("tedious mess", 0),
             ("charming", 1), ("boring", 0), ("moving and wise", 1), ("a waste of time", 0)] * 3


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "sst2").mkdir()
    for split in ("train", "dev"):
        (root / "sst2" / f"{split}.jsonl").write_text(
            "".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in SST2_ROWS))
    return root


def calibrate(model, tmp_path, *args):
    out = tmp_path / "clf.json"
    proc = run_cli("adainfer.calibrate", "--model", model, "--dtype", "float32", "--out", out, *args)
    assert proc.returncode == 0, proc.stderr
    return ExitClassifier.load(out), proc.stdout


@pytest.mark.parametrize("classifier", ["svm", "gap", "crf"])
def test_calibrate_on_task_data(tiny_model, data_dir, tmp_path, classifier):
    clf, stdout = calibrate(tiny_model, tmp_path, "--task", "sst2", "--data", data_dir, "--shots", "2",
                            "--limit", "16", "--classifier", classifier, "--holdout", "0.25")
    model, _ = load_model(tiny_model, "float32")
    assert clf.kind == classifier and clf.model["fingerprint"] == model.fingerprint
    assert clf.calibration["tasks"] == ["sst2"] and clf.calibration["shots"] == 2
    assert clf.calibration["n_train_prompts"] == 12 and clf.calibration["n_heldout_prompts"] == 4
    assert 1 <= clf.first_layer < model.config.n_layers
    assert "held-out (4 prompts)" in stdout and "precision" in stdout


def test_calibrate_ready_prompts_gold_labels_and_run(tiny_model, tmp_path):
    rows = [{"prompt": f"item {i}: the answer is", "answer": "x"} for i in range(12)]
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    clf, _ = calibrate(tiny_model, tmp_path, "--prompts", f, "--label", "gold", "--first-layer", "1",
                       "--target-agreement", "0")
    assert clf.first_layer == 1 and clf.calibration["label"] == "gold"
    # the run CLI uses it, and its layers_run is what the library's loop does with the same rule
    proc = run_cli("adainfer.run", "--model", tiny_model, "--dtype", "float32", "--exit", tmp_path / "clf.json",
                   "--prompts", f, "--json", "--batch-size", "4")
    assert proc.returncode == 0, proc.stderr
    got = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["prompt"] for r in got] == [r["prompt"] for r in rows]  # every prompt answered, in input order
    model, tok = load_model(tiny_model, "float32")
    rule = ExitRule(clf)
    for r in got:
        out = model(torch.tensor([tok.encode(r["prompt"])]), plan=Plan(exit=rule))
        assert r["layers_run"] == out.layers_run.tolist() and r["token_ids"] == out.token.tolist()


def test_run_refuses_a_classifier_for_another_model(tiny_model, converted, tmp_path):
    clf, _ = calibrate(tiny_model, tmp_path, "--prompts", _prompts_file(tmp_path), "--first-layer", "1")
    other = converted("llama-mha")[1]
    proc = run_cli("adainfer.run", "--model", other, "--exit", tmp_path / "clf.json", "--prompt", "hi")
    assert proc.returncode == 2 and "fitted for model" in proc.stderr and "Traceback" not in proc.stderr


def test_run_with_exit_human_output(tiny_model, tmp_path):
    calibrate(tiny_model, tmp_path, "--prompts", _prompts_file(tmp_path), "--first-layer", "1")
    proc = run_cli("adainfer.run", "--model", tiny_model, "--exit", tmp_path / "clf.json", "--prompt", "hello")
    assert proc.returncode == 0, proc.stderr
    assert "answer:" in proc.stdout and "dense" in proc.stdout and "x;" in proc.stdout
    assert "exit: svm on gap+top_prob over the full vocabulary, fitted on" in proc.stdout
    # the same with exit features from an int8 copy of the head
    proc = run_cli("adainfer.run", "--model", tiny_model, "--exit", tmp_path / "clf.json", "--prompt", "hello",
                   "--check-head", "int8")
    assert proc.returncode == 0, proc.stderr
    assert "answer:" in proc.stdout and "int8 check head" in proc.stdout
    proc = run_cli("adainfer.run", "--model", tiny_model, "--dense", "--candidates", "a", "b", "--prompt", "hello",
                   "--check-head", "int8")
    assert proc.returncode == 2 and "full-vocabulary checks" in proc.stderr and proc.stdout == ""


def test_calibrate_bad_arguments(tiny_model, tmp_path):
    out = tmp_path / "c.json"
    for args, needle in ((["--task", "imdb"], "unknown task"), (["--task", "sst2", "--data", tmp_path], "not found"),
                         (["--prompts", tmp_path / "none.jsonl"], "not found"),
                         (["--task", "sst2", "--holdout", "1.5"], "--holdout")):
        proc = run_cli("adainfer.calibrate", "--model", tiny_model, "--out", out, *args)
        assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert not out.exists()


def _prompts_file(tmp_path):
    f = tmp_path / "q.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"q{i} and then"}) + "\n" for i in range(8)))
    return f
