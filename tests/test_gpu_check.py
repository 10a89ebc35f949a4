"""benchmarks/gpu_check.py, the command a session lent a GPU runs: on the CPU with a tiny model its whole path runs
(build and convert, decode, exit, prefill, checks, the bar); the kernel section needs CUDA."""

import importlib.util
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import ROOT


def gpu_check(*args):
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_gpu_check_runs_on_the_cpu_with_a_tiny_model(tmp_path):
    out = tmp_path / "gc.json"
    proc = gpu_check("--device", "cpu", "--tiny", "--skip-tests", "--repeats", "1", "--out", out,
                     "--sections", "decode,profile,prefill,kernel", "--variants", "all")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [r["batch"] for r in result["decode"]] == [1, 8]
    for r in result["decode"]:
        assert r["same_tokens_as_hf"] == 1.0  # ours through the converter = transformers, greedy, float32
        assert r["ours_graph_ms"] > 0 and r["hf_ms"] > 0 and r["half_depth_fraction_of_ideal_2x"] > 0
    assert {(r["batch"], r["tokens"]) for r in result["prefill"]} == {(1, 16), (1, 64), (8, 16), (8, 64)}
    first = [r for r in result["prefill"] if r["tokens"] == 16]
    assert all(math.isfinite(r[f"{path}check_every_block_candidates{captured}_overhead"]) for r in first
               for path in ("", "compiled_") for captured in ("", "_captured"))
    assert [(r["prefill"], r["checks"]) for r in result["profile"] if "prefill" in r] == [
        ("modules", "no"), ("modules", "candidates, read every 4"), ("compiled", "no"),
        ("compiled", "candidates, read every 4")]
    assert all(r["wall_ms"] > 0 and "error" not in r for r in result["profile"] if "prefill" in r)
    assert not [k for k in result if k.endswith("_error")], "every section ran"
    for r in result["prefill"]:  # the compiled blocks beside the modules, the same logits up to rounding
        assert r["compiled_ms"] > 0 and r["compiled_first_call_s"] > 0 and r["compiled_max_abs_diff"] < 1e-3
    assert result["kernel"] is None and len(result["bar"]) == 10 and result["weight_read_limit_ms"] > 0
    assert "goal" in proc.stdout and "measured" in proc.stdout
    assert result["variants"] == [], "the other captures are a GPU's"
    assert list(result["section_seconds"]) == ["decode", "profile", "prefill", "kernel"]


def test_gpu_check_refuses_an_unknown_section_or_variant(tmp_path):
    proc = gpu_check("--device", "cpu", "--sections", "decode,kernels", "--out", tmp_path / "gc.json")
    assert proc.returncode == 2 and "--sections: unknown kernels" in proc.stderr
    proc = gpu_check("--device", "cpu", "--variants", "tuned,fused", "--out", tmp_path / "gc.json")
    assert proc.returncode == 2
    assert ("--variants: unknown fused (choose from none, blocks, step, tuned, tuned_step, all; each may add :sdpa or "
            ":triton, then :two)") in proc.stderr
    proc = gpu_check("--device", "cpu", "--batches", "1,0", "--out", tmp_path / "gc.json")
    assert proc.returncode == 2 and "--batches: 1,0 (each at least 1)" in proc.stderr
    assert not (tmp_path / "gc.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_check_refuses_cuda_where_there_is_none(tmp_path):
    proc = gpu_check("--skip-tests", "--out", tmp_path / "gc.json")
    assert proc.returncode == 2 and "CUDA is not available" in proc.stderr
    assert not (tmp_path / "gc.json").exists()


def benchmark_module(name: str):
    """benchmarks/<name>.py imported (gpu_check puts its folder on the path for its own imports)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def gpu_check_module():
    return benchmark_module("gpu_check")


def gpu_tests_module():
    return benchmark_module("gpu_tests")


def test_the_tests_are_dealt_to_processes_of_about_equal_cost():
    shards = gpu_tests_module().shards
    ids = ["t.py::test_clis_on_cuda", *(f"t.py::test_fused_capture[{f}]" for f in "abc"),
           *(f"t.py::test_small[{i}]" for i in range(10))]
    groups = shards(ids, 4)
    assert sorted(n for g in groups for n in g) == sorted(ids), "every test once"
    assert groups[0] == ["t.py::test_clis_on_cuda"], "the dearest alone (8 against 3 fused + 3 small a process)"
    assert max(map(len, groups[1:])) - min(map(len, groups[1:])) <= 1
    assert shards(ids[:2], 4) == [[ids[0]], [ids[1]]], "no more processes than tests"


def test_measured_seconds_deal_the_tests_where_known():
    """An earlier run's seconds replace the guesses: here a "small" test that took 100 s goes alone, and the guessed
    CLI test (8 units, 40 s) shares a process."""
    module = gpu_tests_module()
    ids = ["t.py::test_clis_on_cuda", "t.py::test_small[0]", *(f"t.py::test_small[{i}]" for i in range(1, 9))]
    groups = module.shards(ids, 2, {"t.py::test_small[0]": 100.0, "t.py::gone": 5.0})
    assert groups[0] == ["t.py::test_small[0]"] and sorted(groups[1]) == sorted(ids[:1] + ids[2:])


def test_each_tests_seconds_are_read_from_pytests_durations(tmp_path):
    module = gpu_tests_module()
    log = ("12.50s call     tests/test_cuda.py::test_a[1]\n2.00s setup    tests/test_cuda.py::test_a[1]\n"
           "0.75s teardown tests/test_kernel.py::test_b\n(3 durations < 0.5s hidden.)\n3 passed in 16.0s\n")
    assert module.seconds_per_test(log) == {"tests/test_cuda.py::test_a[1]": 14.5, "tests/test_kernel.py::test_b": 0.75}
    (tmp_path / "s.json").write_text('{"seconds": {"tests/test_cuda.py::test_a[1]": 14.5}}')
    assert module.known_seconds(tmp_path / "s.json") == {"tests/test_cuda.py::test_a[1]": 14.5}
    (tmp_path / "bad.json").write_text("{")
    assert module.known_seconds(tmp_path / "bad.json") == {} and module.known_seconds(tmp_path / "none.json") == {}


def test_the_cuda_tests_run_in_several_processes(tmp_path):
    """Here every test of test_cuda.py skips (no GPU): each is collected, dealt and counted once."""
    result = gpu_tests_module().run_tests(3, ("tests/test_cuda.py",))
    assert result["returncode"] == 0, result
    assert result["collected"] >= 10 and result["skipped"] == result["collected"] and "passed" not in result
    assert len(result["shard_seconds"]) == 3 and all(0 < s <= result["seconds"] for s in result["shard_seconds"])
    assert isinstance(result["test_seconds"], dict)  # (skipped tests take under the 0.5 s pytest reports)


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (Linux's /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # (gone meanwhile)
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from Linux's /proc")
def test_a_stopped_gpu_check_stops_its_test_processes():
    """`timeout` (or a lent machine's limit) stops gpu_check with SIGTERM while its test processes run: they stop too,
    instead of holding the GPU for the next command."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--tiny",
                             "--test-workers", "2", "--out", "/dev/null"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(children(proc.pid)) < 2 and time.monotonic() < deadline:  # (first: one to collect, then two)
            time.sleep(0.2)
        running = children(proc.pid)
        assert len(running) == 2, "the test processes should be running"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) != 0
        deadline = time.monotonic() + 30
        while any(Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]
                  for pid in running) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in running if Path(f"/proc/{pid}").exists()
                    and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]]
    finally:
        proc.kill()


def test_the_bar_has_the_goals_of_the_sections_that_ran():
    """A run of some sections (a short lent machine's) still prints the goals those measured; a failed section
    (None) adds none."""
    bar = gpu_check_module().bar
    row = {"batch": 1, "tokens": 512, "ours_ms": 10.0, "speedup_vs_hf": 1.2, "compiled_speedup_vs_hf": 1.5,
           "check_every_block_overhead": 0.5, "check_every_block_read_every_4_overhead": 0.4}
    lines = bar({"prefill": [row], "decode": None, "n_layers": 16, "head_GB": 0.2, "copy_bandwidth_GBps": 2000.0})
    goals = {line["goal"]: line for line in lines}
    assert goals["prefill >= 1.3x transformers at every shape"]["met"] is False
    assert goals["(compile_prefill) prefill >= 1.3x transformers at every shape"]["met"] is True
    assert goals["exit check after every block <= 10% at batch 1 (the better of reading every check / every 4)"][
        "measured"] == 0.4
    assert not any("decode" in g or "kernel" in g for g in goals)
    assert bar({"decode": None, "prefill": None}) == []
    one = {"batch": 1, "ours_graph_ms": 1.2, "half_depth_fraction_of_ideal_2x": 0.95, "ours_tuned_ms": 1.1,
           "tuned_half_depth_fraction_of_ideal_2x": 1.0}  # --batches 1: its goals only
    goals = {line["goal"]: line for line in bar({"decode": [one], "weight_read_limit_ms": 0.78, "variants": ["tuned"]})}
    assert list(goals) == ["decode batch 1 <= 1.5x the weight-read limit (ms/token)",
                           "forced half-depth exit in decode >= 0.9 of the ideal 2x",
                           "(fuse=tuned) decode batch 1 <= 1.5x the weight-read limit (ms/token)",
                           "(fuse=tuned) forced half-depth exit >= 0.9 of the ideal 2x"]
    assert [g["met"] for g in goals.values()] == [False, True, True, True]


def test_variants_name_their_fuse_and_attention():
    specs = gpu_check_module().variant_specs
    assert specs(["tuned", "blocks:triton", "blocks", "blocks:sdpa", "tuned:sdpa"], "blocks") == {
        "tuned": ("tuned", "sdpa", None), "blocks_triton": ("blocks", "triton", None)}, "default left out, once each"
    assert list(specs(["all", "step:triton"], "blocks")) == ["none", "step", "tuned", "tuned_step", "step_triton"]
    assert specs(["blocks:two", "blocks:triton:two", "blocks:sdpa:two"], "blocks") == {
        "blocks_two": ("blocks", "sdpa", "two"), "blocks_triton_two": ("blocks", "triton", "two")}
