"""torch.distributed runs (adainfer.distributed, adainfer.parallel) as a user launches them: torchrun with 2 CPU
processes on gloo, against one process with the same threads per process (a CPU matmul's rounding depends on the
thread count, so equality is asked of runs that each use one thread)."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from helpers import ROOT, run_cli

from adainfer.distributed import World
from adainfer.errors import AdainferError

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="torchrun's gloo runs here on Linux and macOS")


def torchrun(*args, nproc=2, timeout=300):
    """`torchrun --nproc_per_node N -m ...` as a user runs it (through this interpreter)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                           "--master_port", str(free_port()), "-m", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def six(tmp_path_factory):
    """A 6-layer tiny Llama folder (rows exit at different layers) and task data in the layout of shared/data."""
    from tiny import make_converted

    root = tmp_path_factory.mktemp("dist")
    folder = make_converted("llama-gqa-tied", root / "m", seed=21, n_layers=6)[1]
    data = root / "data"
    (data / "sst2").mkdir(parents=True)
    (data / "sst2/train.jsonl").write_text("".join(
        json.dumps({"text": f"good film {'very ' * (i % 5)}{i}", "label": i % 2}) + "\n" for i in range(40)))
    (data / "sst2/dev.jsonl").write_text("".join(
        json.dumps({"text": f"fine movie {'so ' * (i % 7)}{i}", "label": i % 2}) + "\n" for i in range(30)))
    return folder, data


def without_timings(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def test_share_balances_whole_items_by_cost():
    costs = [5, 1, 1, 1, 1, 1]
    shares = [World(rank=r, size=2).share(costs) for r in range(2)]
    assert sorted(shares[0] + shares[1]) == list(range(6))
    assert shares == [[0], [1, 2, 3, 4, 5]]  # 5 against 5
    # with tensor parallelism the two ranks of a replica run the same share
    four = [World(rank=r, size=4, tp=2).share(costs) for r in range(4)]
    assert four[0] == four[1] and four[2] == four[3] and sorted(four[0] + four[2]) == list(range(6))


def test_data_parallel_eval_equals_one_process(six, tmp_path):
    folder, data = six
    args = ["adainfer.eval", "--model", folder, "--task", "sst2", "--data", data, "--shots", "2", "--limit", "20",
            "--method", "dense", "gap-rule", "oracle", "skip-last-1", "shortgpt-1", "--dtype", "float32",
            "--batch-size", "4", "--no-figures"]
    one = run_cli(*args, "--threads", "1", "--out", tmp_path / "one.json")
    assert one.returncode == 0, one.stderr
    two = torchrun(*args, "--out", tmp_path / "two.json")
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("wrote ") == 1  # rank 0 alone prints and writes
    a, b = (json.loads((tmp_path / f"{n}.json").read_text())["runs"][0] for n in ("one", "two"))
    assert a["per_layer"] == b["per_layer"]
    for name, m in a["methods"].items():
        assert without_timings(m["records"]) == without_timings(b["methods"][name]["records"]), name
        for key in ("accuracy", "pruning_ratio", "avg_layers", "flops_ratio"):
            assert m["summary"][key] == b["methods"][name]["summary"][key]
    assert len({r["layers_run"] for r in a["methods"]["gap-rule"]["records"]}) >= 1
    # again, reading the traces rank 0 saved beside the results: the same rows
    again = torchrun(*args, "--out", tmp_path / "two.json")
    assert again.returncode == 0, again.stderr
    c = json.loads((tmp_path / "two.json").read_text())["runs"][0]
    assert without_timings(c["methods"]["oracle"]["records"]) == without_timings(a["methods"]["oracle"]["records"])


@pytest.mark.parametrize("translator", ["none", "affine"])
def test_data_parallel_calibration_writes_the_same_files(six, tmp_path, translator):
    folder, data = six
    args = ["adainfer.calibrate", "--model", folder, "--task", "sst2", "--data", data, "--shots", "2", "--limit",
            "40", "--dtype", "float32", "--check-cost", "0.1", "--translator", translator, "--translator-positions",
            "3"]
    one = run_cli(*args, "--threads", "1", "--out", tmp_path / "one.json")
    assert one.returncode == 0, one.stderr
    two = torchrun(*args, "--out", tmp_path / "two.json")
    assert two.returncode == 0, two.stderr
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    if translator != "none":  # each names its own translator file, by name and sha256
        assert a.pop("translator").pop("file") == "one.translator.safetensors"
        assert b.pop("translator").pop("file") == "two.translator.safetensors"
        assert (tmp_path / "one.translator.safetensors").read_bytes() == \
            (tmp_path / "two.translator.safetensors").read_bytes()
    assert a == b


def test_data_parallel_run_answers_in_input_order(six, tmp_path):
    folder, _ = six
    prompts = tmp_path / "p.jsonl"
    texts = ["hello there", "a b c d e f g", "x", "the film was good and", "what"]
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    args = ["adainfer.run", "--model", folder, "--prompts", prompts, "--max-new-tokens", "8", "--batch-size", "2",
            "--json", "--dtype", "float32", "--exit-mode", "token", "--exit"]
    clf = tmp_path / "gap.json"
    from adainfer.exit import ExitClassifier

    ExitClassifier("svm", ["gap"], [1.0], -0.02, 1, 1).save(clf)  # fires at different layers for different tokens
    one = run_cli(*args, clf, "--threads", "1")
    assert one.returncode == 0, one.stderr
    two = torchrun(*args, clf)
    assert two.returncode == 0, two.stderr
    a = [json.loads(line) for line in one.stdout.splitlines()]
    b = [json.loads(line) for line in two.stdout.splitlines()]
    assert [r["prompt"] for r in b] == texts
    assert [(r["token_ids"], r["layers_run"]) for r in a] == [(r["token_ids"], r["layers_run"]) for r in b]


def test_a_killed_rank_ends_the_run_without_a_file(six, tmp_path):
    folder, data = six
    out = tmp_path / "killed.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "adainfer.eval", "--model", str(folder), "--task", "sst2", "--data", str(data), "--shots", "2",
           "--limit", "30", "--batch-size", "1", "--method", "dense", "gap-rule", "oracle", "--dtype", "float32",
           "--out", str(out), "--no-figures"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=dict(os.environ, OMP_NUM_THREADS="1", ADAINFER_TEST_TAG=str(tmp_path)))
    try:
        t0 = time.time()
        while (pid := rank_pid(1, str(tmp_path))) is None and time.time() - t0 < 120:
            time.sleep(0.05)
        assert pid is not None, "rank 1 never started"
        time.sleep(2.0)  # into the run (loading, traces)
        os.kill(pid, signal.SIGKILL)
        killed = time.time()
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert time.time() - killed < 60, "the other rank was left waiting"
    assert not out.exists() and not list(tmp_path.glob(".*tmp*"))
    assert "FAILED" in err


def rank_pid(rank: int, tag: str) -> int | None:
    """The pid of this test's torchrun worker `rank` (found by its environment)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if f"ADAINFER_TEST_TAG={tag}".encode() in env and f"RANK={rank}".encode() in env and \
                b"TORCHELASTIC_RUN_ID" in b"".join(env):
            return int(pid)
    return None


# ---------------------------------------------------------------- tensor parallel


@pytest.mark.parametrize("preset", ["llama-gqa-tied", "qwen2-window", "gemma3-local", "opt-125m-like",
                                    "opt-350m-like"])
def test_tensor_parallel_equals_one_process(tmp_path, preset):
    """Logits within 1e-5 (float32), the same exit layers and tokens with a rule that fires at different layers for
    different rows (full vocabulary and candidates), the same greedy generations (dense, sequence and token modes)."""
    from tiny import make_converted

    layers = None if preset.startswith("gemma3") else 6  # gemma3's preset names its 4 layers' types
    folder = make_converted(preset, tmp_path / "m", seed=21, n_layers=layers)[1]
    worker = ROOT / "tests" / "tp_worker.py"
    first = run_cli("tp_worker", folder, tmp_path / "probe.json", "0", cwd=worker.parent)
    assert first.returncode == 0, first.stderr
    gaps = sorted(g for layer in json.loads((tmp_path / "probe.json").read_text())["gaps"] for g in layer)
    # fires for some rows at some layers: midway across the widest space between two gaps of the middle third, so
    # that the last-bit differences of a tensor-parallel sum cannot move a row across it
    k = max(range(len(gaps) // 3, len(gaps) * 5 // 6), key=lambda i: gaps[i + 1] - gaps[i])
    threshold = str((gaps[k] + gaps[k + 1]) / 2)
    one = run_cli("tp_worker", folder, tmp_path / "one.json", threshold, cwd=worker.parent)
    assert one.returncode == 0, one.stderr
    two = torchrun_script(worker, folder, tmp_path / "two.json", threshold, "--tp", "2")
    assert two.returncode == 0, two.stderr
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert abs(np.array(a["logits"]) - np.array(b["logits"])).max() < 1e-5
    assert abs(np.array(a["exit_logits"]) - np.array(b["exit_logits"])).max() < 1e-5
    assert a["fingerprint"] == b["fingerprint"]  # read from sampled rows of the slices' file
    assert len(set(a["exit_layers"])) > 1 or len({n for g in a["generate_token"] for n in g[1]}) > 1
    for key in ("exit_layers", "exit_tokens", "candidate_layers", "candidate_tokens", "generate_none",
                "generate_sequence", "generate_token"):
        assert a[key] == b[key], key
    # each rank holds (and read) half of every split tensor: heads, MLP units, vocabulary rows
    for name, shape in a["local_shapes"].items():
        half = b["local_shapes"][name]
        if "wqkv" in name or name.endswith(("w1.weight", "w1.bias", "w13.weight", "tok_embeddings.weight",
                                                   "output.weight")):
            assert half[0] * 2 == shape[0] and half[1:] == shape[1:], name
        elif name.endswith(("wo.weight", "w2.weight")):
            assert half[1] * 2 == shape[1] and half[0] == shape[0], name
        else:
            assert half == shape, name


def torchrun_script(script, *args, nproc=2, timeout=300):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                           "--master_port", str(free_port()), str(script), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def test_each_rank_leaves_the_process_group_before_it_exits(tmp_path, monkeypatch):
    """A rank that joined through adainfer.distributed.init destroys its process group at exit (before the
    interpreter tears its threads down): a hook registered before init runs after init's and finds it gone."""
    script = tmp_path / "leave.py"
    script.write_text(
        "import atexit, os, torch\n"
        "from adainfer.distributed import init\n"
        "out = os.environ['OUT'] + os.environ['RANK']\n"
        "atexit.register(lambda: open(out, 'w').write(str(torch.distributed.is_initialized())))\n"
        "init('cpu')\n"
        "assert torch.distributed.is_initialized()\n")
    monkeypatch.setenv("OUT", str(tmp_path / "initialized"))
    run = torchrun_script(script)
    assert run.returncode == 0, run.stderr
    assert [(tmp_path / f"initialized{r}").read_text() for r in (0, 1)] == ["False", "False"]


def test_tensor_parallel_eval_and_run_cli(six, tmp_path):
    """--tp 2 through the CLIs: eval's per-row answers and layers, and run's
    generations, as one process gives them; 4 ranks = 2 replicas x TP 2 split the prompts too."""
    folder, data = six
    args = ["adainfer.eval", "--model", folder, "--task", "sst2", "--data", data, "--shots", "2", "--limit", "12",
            "--method", "dense", "gap-rule", "oracle", "--dtype", "float32", "--batch-size", "4", "--no-figures"]
    one = run_cli(*args, "--threads", "1", "--out", tmp_path / "one.json")
    assert one.returncode == 0, one.stderr
    two = torchrun(*args, "--tp", "2", "--out", tmp_path / "two.json")
    assert two.returncode == 0, two.stderr
    a, b = (json.loads((tmp_path / f"{n}.json").read_text())["runs"][0]["methods"] for n in ("one", "two"))
    keys = ("prediction", "layers_run")  # (the byte tokenizer's label words share a first token: no candidates)
    for name in a:
        assert [[r[k] for k in keys] for r in a[name]["records"]] == \
            [[r[k] for k in keys] for r in b[name]["records"]], name

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in ["hello there", "a b c d e f g", "x", "what"]))
    run = ["adainfer.run", "--model", folder, "--prompts", prompts, "--max-new-tokens", "6", "--batch-size", "2",
           "--json", "--dtype", "float32", "--dense"]
    one = run_cli(*run, "--threads", "1")
    four = torchrun(*run, "--tp", "2", nproc=4)
    assert four.returncode == 0, four.stderr
    assert [json.loads(x)["token_ids"] for x in one.stdout.splitlines()] == \
        [json.loads(x)["token_ids"] for x in four.stdout.splitlines()]


def test_tensor_parallel_refusals(six):
    folder, _ = six
    alone = run_cli("adainfer.run", "--model", folder, "--prompt", "hi", "--tp", "2")
    assert alone.returncode == 2 and "launch with torchrun --nproc_per_node 2" in alone.stderr
    bad = torchrun("adainfer.run", "--model", folder, "--prompt", "hi", "--tp", "3")
    assert bad.returncode != 0 and "--tp: 3 does not divide the 2 ranks" in bad.stderr
    bad = torchrun("adainfer.run", "--model", folder, "--prompt", "hi", "--tp", "2", "--max-new-tokens", "3",
                   "--decode", "compiled", "--dense")
    assert bad.returncode != 0 and "not built for tensor-parallel runs" in bad.stderr
    from adainfer.config import ModelConfig
    from adainfer.parallel import make_shard

    config = ModelConfig.load(folder / "config.json")  # 4 query heads, 2 key/value heads
    with pytest.raises(AdainferError, match="n_kv_heads = 2 is not a multiple of 4"):
        make_shard(World(rank=0, size=4, tp=4), config)


def test_vocabulary_shards_merge_to_the_whole_top2():
    """merge_top2 over any split of the vocabulary (uneven, empty shards, ties across and within shards) equals the
    top-2 of the whole logits: what every rank computes from the all-gathered partials."""
    from adainfer.kernels.top2 import top2_from_logits
    from adainfer.parallel import merge_top2, partial_top2

    torch.manual_seed(0)
    x = torch.randn(5, 261) * 3
    x[1, 10] = x[1, 200] = 50  # equal maxima in two shards: the smaller id wins, as argmax
    x[2, 3] = x[2, 4] = 40  # within one shard
    want = top2_from_logits(x)
    for bounds in ([0, 131, 261], [0, 87, 174, 261], [0, 261, 261], [0, 0, 1, 261]):
        got = merge_top2(torch.stack([partial_top2(x[:, a:b], a) for a, b in zip(bounds, bounds[1:])]))
        assert torch.equal(got.top1, want.top1)
        torch.testing.assert_close(got.p1, want.p1, atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(got.p2, want.p2, atol=2e-6, rtol=1e-5)
