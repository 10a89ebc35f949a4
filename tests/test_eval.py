"""The evaluation harness: each method's layer plan, the metrics, demonstrations, and the CLI end to end."""

import json
import re
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import run_cli
from safetensors.torch import load_file, save_file
from tiny import truncated_copy

from adainfer.eval.methods import block_influence, build_method
from adainfer.eval.metrics import flops_ratio, pruning_ratio, summarize
from adainfer.exit import Plan
from adainfer.generate import left_pad
from adainfer.loading import load_model
from adainfer.tasks import Example, Task, demonstrations, label_candidates, load_task, load_task_file, task_prompts


def prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (int(torch.randint(4, 30, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


@pytest.mark.parametrize("preset", ["llama-mha", "opt-125m-like"])
def test_skip_last_equals_shorter_model(converted, tmp_path, preset):
    folder = converted(preset)[1]
    model, _ = load_model(folder, "float32")
    short, _ = load_model(truncated_copy(folder, 2, tmp_path / "short"), "float32")
    method = build_method("skip-last-1", model)
    assert method.info["layers_removed"] == [2]
    tokens, mask = left_pad(prompts(4), 0)
    a, b = model(tokens, pad_mask=mask, plan=method.plan), short(tokens, pad_mask=mask)
    assert a.layers_run.tolist() == [2] * 4
    assert torch.equal(a.token, b.token) and (a.logits - b.logits).abs().max() <= 1e-6


def test_shortgpt_removes_the_lowest_block_influence(converted):
    model, _ = load_model(converted("llama-mha")[1], "float32")
    calib = prompts(6, 1)
    # Block Influence computed independently: hidden states of each prompt alone, every token
    sums, count = np.zeros(3), 0
    for ids in calib:
        hs = model(torch.tensor([ids]), plan=Plan(hidden_states=True)).hidden_states
        for i in range(3):
            sums[i] += (1 - F.cosine_similarity(hs[i][0], hs[i + 1][0], dim=-1)).sum().item()
        count += len(ids)
    want = sums / count
    got = block_influence(model, calib, batch_size=4)  # batched, left-padded
    assert np.allclose(got, want, atol=1e-5)
    method = build_method("shortgpt-2", model, calib)
    assert len(method.info["layers_removed"]) == 2
    assert method.info["layers_removed"] == sorted(np.argsort(want)[:2].tolist())
    assert method.plan.layers == [i for i in range(3) if i not in method.info["layers_removed"]]


@pytest.mark.parametrize("preset", ["llama-gqa-tied", "opt-350m-like"])
def test_skip_attn_latter_equals_zeroed_attention(converted, tmp_path, preset):
    folder = converted(preset)[1]
    model, _ = load_model(folder, "float32")
    zeroed = tmp_path / "zeroed"
    shutil.copytree(folder, zeroed)
    state = load_file(zeroed / "model.safetensors")
    for name in list(state):
        if name.startswith(("layers.1.attention.wo", "layers.2.attention.wo")):
            state[name] = torch.zeros_like(state[name])  # the attention sublayer's output is wo(...) (+ bias)
    save_file(state, zeroed / "model.safetensors")
    ref, _ = load_model(zeroed, "float32")
    method = build_method("skip-attn-latter-2", model)
    tokens, mask = left_pad(prompts(4, 2), 0)
    a, b = model(tokens, pad_mask=mask, plan=method.plan), ref(tokens, pad_mask=mask)
    assert (a.logits - b.logits).abs().max() <= 1e-5 and torch.equal(a.token, b.token)


def test_metrics_by_hand():
    layers, L = np.array([30, 20, 25, 25]), 30
    assert pruning_ratio(layers, L) == pytest.approx(1 - 25 / 30)
    h, V, s = 576, 49152, np.array([100, 200, 100, 50])
    want = np.mean([(2 * lp * (6 * h + n) + V) / (2 * L * (6 * h + n) + V) for lp, n in zip(layers, s)])
    assert flops_ratio(layers, s, L, h, V) == pytest.approx(want)
    assert flops_ratio(np.full(4, L), s, L, h, V) == pytest.approx(1.0)
    # a block without its attention sublayer counts its MLP only: 4h of the paper's 6h + s
    skipped = np.array([3, 0, 1, 0])
    want = np.mean([(2 * (lp * (6 * h + n) - a * (2 * h + n)) + V) / (2 * L * (6 * h + n) + V)
                    for lp, n, a in zip(layers, s, skipped)])
    assert flops_ratio(layers, s, L, h, V, skipped) == pytest.approx(want)
    assert flops_ratio(np.full(4, L), s, L, h, V, np.full(4, L)) == pytest.approx(
        np.mean([(2 * L * 4 * h + V) / (2 * L * (6 * h + n) + V) for n in s]))
    recs = [{"layers_run": int(x), "prompt_tokens": int(n), "correct": c}
            for x, n, c in zip(layers, s, [True, False, True, True])]
    out = summarize(recs, L, h, V, seconds=2.0, dense_seconds=3.0)
    assert out["avg_layers"] == 25 and out["var_layers"] == pytest.approx(12.5)  # population variance
    assert out["accuracy"] == 0.75 and out["speedup"] == pytest.approx(1.5)


def test_limit_draws_a_seeded_sample():
    rows = [Example(f"row {i}", "y") for i in range(40)]
    task = Task("t", rows[:10], rows[10:], None)
    picked = [[ex.x for _, ex in task_prompts(task, "eval", 0, seed=s, limit=6)] for s in (0, 0, 1)]
    assert picked[0] == picked[1] and picked[0] != picked[2]  # fixed by the seed
    assert picked[0] != [e.x for e in rows[10:16]]  # not the first rows
    index = [int(x.split()[1]) for x in picked[0]]
    assert index == sorted(index) and len(set(index)) == 6  # in file order, no repeats
    assert len(task_prompts(task, "eval", 0, limit=100)) == 30  # a limit beyond the split takes it all


def test_demonstrations_never_include_the_evaluated_row(data_dir):
    task = load_task("csqa", data_dir)
    for prompt, ex in task_prompts(task, "train", 3, seed=5):
        demos = [d for d in task.train if d.x in prompt and d is not ex]
        assert ex.x not in prompt.replace(f"Q: {ex.x}\nA:", "", 1)  # the row itself only as the question
        assert len(demos) >= 3
    pool = [Example(str(i), "y") for i in range(10)]
    for i in range(10):
        assert pool[i] not in demonstrations(pool, 9, 0, str(i), exclude=pool[i])
    assert demonstrations(pool, 3, 1, "a") == demonstrations(pool, 3, 1, "a")  # fixed seed


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A few rows of each task format, in the layout of shared/data."""
    root = tmp_path_factory.mktemp("data")
    rows = {
        "sst2/train.jsonl": [{"text": f"good film {i}", "label": i % 2} for i in range(12)],
        "sst2/dev.jsonl": [{"text": f"fine movie {i}", "label": i % 2} for i in range(6)],
        "agnews/train.jsonl": [{"text": f"news {i}", "label": i % 4} for i in range(12)],
        "agnews/test.jsonl": [{"text": f"story {i}", "label": i % 4} for i in range(6)],
        "mmlu/dev.jsonl": [{"subject": "x", "question": f"q{i}?", "choices": ["a", "b", "c", "d"], "answer": i % 4}
                           for i in range(10)],
        "mmlu/test.jsonl": [{"subject": "x", "question": f"t{i}?", "choices": ["a", "b", "c", "d"], "answer": 1}
                            for i in range(6)],
        "csqa/dev.jsonl": [{"id": str(i), "question": f"c{i}?", "choices": list("vwxyz"), "answer": i % 5}
                           for i in range(18)],
        "squad/dev.jsonl": [{"id": str(i), "context": f"ctx {i}.", "question": f"s{i}?", "answers": [f"a{i}", "b"]}
                            for i in range(18)],
    }
    for name, items in rows.items():
        (root / name).parent.mkdir(exist_ok=True)
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in items))
    (root / "agnews/labels.json").write_text(json.dumps(["World", "Sports", "Business", "Sci/Tech"]))
    return root


@pytest.mark.parametrize("task", ["sst2", "agnews", "mmlu", "csqa", "squad"])
def test_eval_cli_end_to_end(tiny_model, data_dir, tmp_path, task):
    out = tmp_path / f"{task}.json"
    proc = run_cli("adainfer.eval", "--model", tiny_model, "--task", task, "--data", data_dir, "--shots", "0", "2",
                   "--limit", "4", "--method", "dense", "skip-last-1", "shortgpt-1", "skip-attn-latter-1",
                   "gap-rule", "gap-rule@int8", "oracle", "--calibration-prompts", "3", "--dtype", "float32",
                   *(["--sync-every", "2"] if task == "agnews" else []), "--out", out)  # (exit reads every 2 checks)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    assert [r["shots"] for r in res["runs"]] == [0, 2]
    for run in res["runs"]:
        methods = run["methods"]
        assert list(methods)[0] == "dense"
        dense_seconds = methods["dense"]["summary"]["seconds"]
        for m in methods.values():  # every method's speedup is against the dense run's clock, from its own records
            assert m["summary"]["seconds"] == pytest.approx(sum(r["seconds"] for r in m["records"]))
            assert m["summary"]["speedup"] == pytest.approx(dense_seconds / m["summary"]["seconds"])
        assert methods["skip-last-1"]["summary"]["avg_layers"] == 2
        # skip-attn-latter-1 runs every block, one of them without attention: fewer FLOPs than dense
        assert all(r["layers_run"] == 3 and r["attn_skipped"] == 1 for r in methods["skip-attn-latter-1"]["records"])
        assert methods["skip-attn-latter-1"]["summary"]["flops_ratio"] < methods["dense"]["summary"]["flops_ratio"]
        dense = [r["prediction"] for r in methods["dense"]["records"]]
        assert [r["prediction"] for r in methods["oracle"]["records"]] == dense  # the oracle never changes it
        assert all(r["layers_run"] <= 3 for r in methods["oracle"]["records"])
        for m in methods.values():
            assert len(m["records"]) == 4 and {"prediction", "gold", "layers_run", "seconds"} <= set(m["records"][0])
            assert "speedup" in m["summary"] and 0 <= m["summary"]["pruning_ratio"] < 1
        assert len(run["per_layer"]["accuracy"]) == 3
        assert methods["gap-rule@int8"]["info"]["check_head"] == "int8"
    assert (tmp_path / f"{task}_2shot_layers.png").stat().st_size > 1000
    assert "| dense |" in proc.stdout


def test_eval_cli_bad_method(tiny_model, data_dir, tmp_path):
    proc = run_cli("adainfer.eval", "--model", tiny_model, "--task", "sst2", "--data", data_dir,
                   "--method", "dense", "early-bird", "--out", tmp_path / "x.json")
    assert proc.returncode == 2 and "unknown method 'early-bird'" in proc.stderr
    assert not (tmp_path / "x.json").exists()
    proc = run_cli("adainfer.eval", "--model", tiny_model, "--task", "sst2", "--data", data_dir,
                   "--method", "dense@int8", "--out", tmp_path / "x.json")
    assert proc.returncode == 2 and "applies to exit methods only" in proc.stderr


def test_eval_svm_without_a_classifier_refuses_before_loading(tiny_model, data_dir, tmp_path):
    no_tokenizer = tmp_path / "model"
    shutil.copytree(tiny_model, no_tokenizer)
    (no_tokenizer / "tokenizer.json").unlink()  # loading the model would stop on this; the svm check comes first
    for method, needle in (("svm", "no classifier is shipped"), ("crf@int8", "no CRF classifier is shipped")):
        proc = run_cli("adainfer.eval", "--model", no_tokenizer, "--task", "sst2", "--data", data_dir,
                       "--method", "dense", method, "--out", tmp_path / "x.json")
        assert proc.returncode == 2 and needle in proc.stderr and f"{method.split('@')[0]}:FILE" in proc.stderr
        assert not (tmp_path / "x.json").exists()


def test_eval_without_data_names_the_layout_and_the_options(tiny_model, tmp_path):
    proc = run_cli("adainfer.eval", "--model", tiny_model, "--task", "mmlu", "--data", tmp_path / "nowhere",
                   "--out", tmp_path / "x.json")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    for needle in ("nowhere/mmlu", "ships no datasets", "--data", "ADAINFER_DATA", "--task-file", "mmlu/{dev,test}"):
        assert needle in proc.stderr, proc.stderr
    proc = run_cli("adainfer.eval", "--model", tiny_model, "--task", "mysent", "--out", tmp_path / "x.json")
    assert proc.returncode == 2 and "built-in tasks are" in proc.stderr and "--task-file" in proc.stderr


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_task_file_shapes(tmp_path):
    sent = write_jsonl(tmp_path / "mysent.jsonl", [{"text": f"text {i}", "label": ["bad", "good", 1][i % 3]}
                                                    for i in range(9)])
    task = load_task_file(sent, ["bad", "good"])
    assert task.name == "mysent" and task.labels == ["bad", "good"]
    assert len(task.train) == 3 and len(task.eval) == 6  # every third row is the demonstration pool
    assert [e.y for e in task.train] == ["bad", "bad", "bad"] and [e.label for e in task.eval[:2]] == [1, 1]
    five = write_jsonl(tmp_path / "quiz.jsonl", [{"question": f"q{i}", "choices": list("vwxyz"), "answer": i % 5}
                                                 for i in range(6)] + [{"question": "q", "choices": ["a", "b"],
                                                                        "answer": "B"}])
    task = load_task_file(five)
    assert task.labels == list("ABCDE")  # as many options as the longest row has choices: "E" can be right
    assert [e.y for e in task.eval] == ["B", "C", "E", "A"] and "E. z" in task.eval[2].x
    assert task.train[2].y == "B" and task.train[2].label == 1  # an answer given as its option letter
    demos = write_jsonl(tmp_path / "demos.jsonl", [{"prompt": "2 + 2 =", "answer": " 4"}])
    free = write_jsonl(tmp_path / "free.jsonl", [{"prompt": "1 + 1 =", "answer": "2"}])
    task = load_task_file(free, demos=demos)
    assert task.labels is None and [e.answers for e in task.eval] == [["2"]] and task.train[0].y == "4"


@pytest.mark.parametrize("rows, labels, demos, needle", [
    ([{"text": "x", "label": "meh"}], ["bad", "good"], None, ":1: expected"),
    ([{"text": "x", "label": 0}], None, None, "give the label words"),
    ([{"question": "q", "choices": ["a"], "answer": 0}], None, None, "2 to 8"),
    ([{"question": "q", "choices": ["a", "b"], "answer": 0}], ["x", "y"], None, "--labels applies"),
    ([{"prompt": "p", "answer": "a"}], None, None, "at least 2 rows"),
    ([{"prompt": "p", "answer": "a"}], None, [{"question": "q", "choices": ["a", "b"], "answer": 0}], "rows are"),
    ([{"sentence": "x"}], None, None, "one of these shapes"),
    ([], None, None, "no rows"),
])
def test_task_file_refusals(tmp_path, rows, labels, demos, needle):
    from adainfer.errors import AdainferError

    path = write_jsonl(tmp_path / "t.jsonl", rows)
    demo_path = write_jsonl(tmp_path / "d.jsonl", demos) if demos else None
    with pytest.raises(AdainferError, match=re.escape(needle)):
        load_task_file(path, labels, demo_path)


def test_eval_and_calibrate_on_a_task_file(tiny_model, tmp_path):
    words = ["awful", "great"]
    rows = [{"text": f"review number {i}", "label": words[i % 2] if i % 4 else i % 2} for i in range(18)]
    f = write_jsonl(tmp_path / "mysent.jsonl", rows)
    assert label_candidates(load_task_file(f, words)) == [" awful", " great"]
    out = tmp_path / "r.json"
    logs = {"TORCH_LOGS": "recompiles"}  # --prefill compiled: dynamo says when it compiles the blocks again
    proc = run_cli("adainfer.eval", "--model", tiny_model, "--task-file", f, "--labels", *words, "--shots", "2",
                   "--limit", "5", "--method", "dense", "oracle", "--dtype", "float32", "--no-figures", "--out", out,
                   "--prefill", "compiled", env=logs)
    assert proc.returncode == 0, proc.stderr
    assert "Recompiling function prefill_block" in proc.stderr
    res = json.loads(out.read_text())
    assert res["task"] == "mysent" and res["task_file"] == str(f)
    records = res["runs"][0]["methods"]["dense"]["records"]
    assert sum(r["seconds"] for r in records) < 1.0, "the blocks compiled on the clock (a compile takes seconds)"
    _, tok = load_model(tiny_model, "float32")
    assert len(records) == 5 and {tuple(r["gold"]) for r in records} <= {(tok.piece_id(" " + w),) for w in words}
    clf_path = tmp_path / "clf.json"
    proc = run_cli("adainfer.calibrate", "--model", tiny_model, "--task-file", f, "--labels", *words, "--shots", "1",
                   "--dtype", "float32", "--out", clf_path, "--prefill", "compiled", env=logs)
    assert proc.returncode == 0, proc.stderr
    assert "Recompiling function prefill_block" in proc.stderr
    from adainfer.exit import ExitClassifier

    clf = ExitClassifier.load(clf_path)
    assert clf.calibration["tasks"] == [str(f)]
    assert clf.calibration["n_train_prompts"] + clf.calibration["n_heldout_prompts"] == 6  # the train part
    # the tiny byte-level tokenizer starts " awful" and " great" with the same token: candidate mode cannot work
    proc = run_cli("adainfer.calibrate", "--model", tiny_model, "--task-file", f, "--labels", *words,
                   "--candidates", "auto", "--out", tmp_path / "c2.json")
    assert proc.returncode == 2 and "distinct tokens" in proc.stderr and not (tmp_path / "c2.json").exists()
    proc = run_cli("adainfer.eval", "--model", tiny_model, "--task-file", f, "--out", out)
    assert proc.returncode == 2 and "--labels" in proc.stderr
