"""The GPU check's tests (benchmarks/gpu_check.py runs them first): the CUDA tests and the kernel tests, with Triton
compiling for the GPU, dealt to several pytest processes at once (most of their time is compiling on the host's cores),
balanced by the seconds each test took in the last recorded GPU run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
TEST_FILES = ("tests/test_cuda.py", "tests/test_kernel.py", "tests/test_attention.py")
HEAVY_TESTS = {"clis": 8, "fuse": 3, "prefill": 3, "captured": 2, "candidate": 2}  # nodeid word -> rough cost
# Each test's seconds in the last recorded GPU run (its JSON's tests.test_seconds, copied here by hand): how they are
# dealt to processes. Tests not in it are guessed from HEAVY_TESTS.
TEST_SECONDS = ROOT / "benchmarks" / "results" / "gpu_test_seconds.json"
# pytest without the repository's addopts (which deal the suite to pytest-xdist processes): these processes are dealt
# here, and the GPU machine need not have xdist.
PYTEST = (sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=")
TEST_WORKERS = min(8, max(1, (os.cpu_count() or 2) // 2))  # (they compile on the host: half its cores, at most 8)


def shards(nodeids: list[str], workers: int, seconds: dict[str, float] | None = None) -> list[list[str]]:
    """The tests dealt to `workers` groups of about equal cost, dearest first: each test's seconds in an earlier run
    (`seconds`, TEST_SECONDS) where known, else a guess from its name (HEAVY_TESTS: each starts its own compiles or CLI
    processes; a unit of about 5 s)."""
    seconds = seconds or {}
    cost = {n: seconds[n] if n in seconds else 5 * max([w for word, w in HEAVY_TESTS.items() if word in n], default=1)
            for n in nodeids}
    groups = [[] for _ in range(max(1, min(workers, len(nodeids))))]
    load = [0.0] * len(groups)
    for n in sorted(nodeids, key=lambda n: -cost[n]):
        i = load.index(min(load))
        groups[i].append(n)
        load[i] += cost[n]
    return groups


def seconds_per_test(log: str) -> dict[str, float]:
    """Each test's seconds (setup, call and teardown) from pytest's --durations lines: "1.23s call path::name"."""
    out: dict[str, float] = {}
    for s, nodeid in re.findall(r"^(\d+(?:\.\d+)?)s (?:setup|call|teardown) +(\S+::\S+)", log, re.M):
        out[nodeid] = round(out.get(nodeid, 0.0) + float(s), 2)
    return out


def known_seconds(path: Path = TEST_SECONDS) -> dict[str, float]:
    """The seconds each CUDA test took in the last recorded GPU run (empty when there is none or it is unreadable)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {k: float(v) for k, v in data.get("seconds", {}).items()} if isinstance(data, dict) else {}


def run_tests(workers: int = TEST_WORKERS, files: tuple[str, ...] = TEST_FILES) -> dict:
    """The CUDA tests and the kernel tests, with Triton compiling for the GPU (its interpreter without one), in
    `workers` pytest processes at once: most of their time is compiling (inductor, Triton) on the host's cores."""
    env = dict(os.environ, TRITON_INTERPRET="0" if torch.cuda.is_available() else "1")  # (no GPU: all but skipped)
    t0 = time.perf_counter()
    collect = subprocess.run([*PYTEST, "--collect-only", *files], cwd=ROOT, env=env, capture_output=True, text=True)
    nodeids = [line for line in collect.stdout.splitlines() if "::" in line]
    if collect.returncode != 0 or not nodeids:
        print(collect.stdout[-3000:], collect.stderr[-2000:], sep="\n")
        return {"returncode": collect.returncode or 1, "summary": "collection failed", "error": 1,
                "seconds": time.perf_counter() - t0}
    logs = tempfile.TemporaryDirectory()
    procs = []
    for i, group in enumerate(shards(nodeids, workers, known_seconds())):
        with open(Path(logs.name) / f"{i}.log", "w") as log:  # (the process keeps its own handle)
            procs.append(subprocess.Popen([*PYTEST, "-rs", "--durations=0", "--durations-min=0.5", *group],
                                          cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    seconds = [None] * len(procs)
    try:
        while None in seconds:  # each process's own end
            for i, proc in enumerate(procs):
                if seconds[i] is None and proc.poll() is not None:
                    seconds[i] = time.perf_counter() - t0
            time.sleep(0.2)
    finally:  # (this script stopped: its tests stop too, off the GPU)
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
    counts, summaries, took = {}, [], {}
    for i, proc in enumerate(procs):
        out = (Path(logs.name) / f"{i}.log").read_text()
        took.update(seconds_per_test(out))
        tail = out.strip().splitlines()[-1:] or ["no output"]
        summaries.append(tail[0])
        if proc.returncode != 0:
            print(out[-3000:])
        for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", tail[0]):
            counts[k.rstrip("s")] = counts.get(k.rstrip("s"), 0) + int(n)
    logs.cleanup()
    summary = (", ".join(f"{n} {k}" for k, n in counts.items())
               + f" in {time.perf_counter() - t0:.0f}s ({len(procs)} processes)")
    print(summary)
    slowest = sorted(took.items(), key=lambda kv: -kv[1])[:8]
    if slowest:
        print("slowest: " + ", ".join(f"{n.split('::')[-1]} {s:.0f}s" for n, s in slowest))
    # a process that crashed (a negative code: killed by a signal) or whose counts miss tests fails the run
    returncode = next((p.returncode for p in procs if p.returncode), 0) or int(sum(counts.values()) != len(nodeids))
    return {"returncode": returncode, "summary": summary, **counts, "collected": len(nodeids),
            "seconds": time.perf_counter() - t0, "shard_summaries": summaries, "shard_seconds": seconds,
            "test_seconds": took}
