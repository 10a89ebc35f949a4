"""The benchmarks as a user runs them: --device cuda refused in one line where there is no GPU, before anything
loads or is written; bench_dense end to end on a tiny model on the CPU (its modules, its compiled prefill and
transformers, all giving the same top-1); bench_gate_up's two ways on a tiny model. gpu_check has its own tests
(test_gpu_check.py)."""

import importlib.util
import json
import math
import sys

import pytest
import torch
from helpers import ROOT

ON_GPU = ["bench_dense", "bench_decode", "bench_exit_e2e", "bench_exit_kernel", "bench_gate_up", "bench_generation",
          "bench_speculative", "sweep_exit"]


def benchmark(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_main(name, monkeypatch, *args):
    monkeypatch.setattr(sys, "argv", [name, *map(str, args)])
    benchmark(name).main()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("name", ON_GPU)
def test_benchmark_refuses_cuda_where_there_is_none(name, monkeypatch, capsys, tmp_path):
    out = tmp_path / "b.json"
    with pytest.raises(SystemExit) as e:
        run_main(name, monkeypatch, "--device", "cuda", "--out", out)
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == "error: --device: CUDA is not available here (torch sees no GPU)"
    assert not out.exists()


@pytest.mark.slow
def test_bench_dense_on_a_tiny_model(converted, monkeypatch, tmp_path):
    folder = converted("llama-gqa-tied", seed=1)[1]
    out = tmp_path / "dense.json"
    run_main("bench_dense", monkeypatch, "--model", folder, "--lengths", 12, "--dtypes", "float32", "--repeats", 1,
             "--device", "cpu", "--out", out)
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert result["device"] == "cpu" and row["tokens"] == 12 and row["same_top1"] is True
    assert row["ours_ms"] > 0 and row["compiled_ms"] > 0 and row["transformers_ms"] > 0 and row["compiled_first_s"] > 0


def test_bench_gate_up_on_a_tiny_model(converted, monkeypatch, tmp_path):
    """Both ways of the MLP's gate and up timed in each dtype, the one gate_up_split takes marked, the same greedy
    tokens both ways, GatedMLP.SPLIT left as it was."""
    from adainfer.model import GatedMLP

    folder = converted("llama-gqa-tied")[1]
    out = tmp_path / "gate_up.json"
    run_main("bench_gate_up", monkeypatch, "--model", folder, "--dtypes", "float32", "bfloat16", "--new-tokens", 2,
             "--lengths", 8, "--repeats", 1, "--threads", 1, "--out", out)
    rows = json.loads(out.read_text())["rows"]
    assert [(r["dtype"], r["gate_up"]) for r in rows] == [("float32", "two"), ("float32", "one"), ("bfloat16", "two"),
                                                          ("bfloat16", "one")]
    assert [r["default"] for r in rows[:2]] == [True, False] and sum(r["default"] for r in rows[2:]) == 1
    # (one repeat of a 3-block model: a decode figure is a difference of two short runs, its sign noise)
    assert all(math.isfinite(r["decode_ms_per_token"]) and r["prefill_8_ms"] > 0 for r in rows)
    assert rows[1]["same_tokens"] is True and rows[3]["same_tokens"] is True
    assert GatedMLP.SPLIT is None
