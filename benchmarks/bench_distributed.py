"""Data and tensor parallelism on this machine: the same job as one process and under torchrun, answers compared.

1. `python -m adainfer.eval` on SST-2 eval rows (5-shot, dense + the shipped exit classifier + oracle) three ways:
   one process with 1 thread, one process with `--threads` N, and `torchrun --nproc_per_node N` (one thread per
   rank): the per-row answers and layers of every method compared (the torchrun run must equal the 1-thread run
   exactly: same batches, same thread count per process), and rows per second of wall-clock (the whole command,
   model load included, and the model's own seconds).
2. `python -m adainfer.run --dense --json` generating `--new-tokens` greedy tokens for AG News openings, one process
   (1 thread) against `torchrun --nproc_per_node N ... --tp N` (`--tp`; default the smallest N that splits the
   model's heads: 3 for the default model's 9 query / 3 key-value heads): tokens compared, wall-clock.

Every configuration runs as a separate command, one after another (the machine's cores are shared between ranks).
CPU only, by subject (thread and process layouts of one machine's cores); on GPUs the same CLIs take --device cuda
under torchrun, one GPU per local rank (README).

    python benchmarks/bench_distributed.py [--rows 64] [--ranks 2] [--new-tokens 32] [--tp N] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, print_table, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def command(args: list, ranks: int = 1, threads: int = 1) -> tuple[float, subprocess.CompletedProcess]:
    """Run `python -m ...` (ranks == 1) or `torchrun --nproc_per_node ranks -m ...`; its wall-clock seconds."""
    if ranks == 1:
        cmd = [sys.executable, "-m", *map(str, args)]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
               str(port), "-m", *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return seconds, proc


def tp_size(folder: Path | None) -> int:
    from adainfer.config import ModelConfig

    if folder is None:
        from adainfer.default_model import default_model_dir

        folder = default_model_dir(progress=False)
    c = ModelConfig.load(Path(folder) / "config.json")
    return next(n for n in range(2, c.n_heads + 1) if not (c.n_heads % n or c.n_kv_heads % n or c.hidden_dim % n))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="converted model folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--data", type=Path, help="data folder (default: $ADAINFER_DATA, else ../shared/data)")
    p.add_argument("--rows", type=int, default=64, help="SST-2 eval rows (default 64)")
    p.add_argument("--ranks", type=int, default=2, help="data-parallel ranks (default 2)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--gen-rows", type=int, default=8)
    p.add_argument("--tp", type=int, help="tensor-parallel ranks for the generation (default: the smallest N > 1 "
                                          "that divides the model's heads, key/value heads and MLP width; 3 for "
                                          "SmolLM2-135M's 9 / 3 heads)")
    p.add_argument("--out", type=Path, default=Path("results/bench_distributed.json"))
    args = p.parse_args()
    model = [] if args.model is None else ["--model", args.model]
    data = [] if args.data is None else ["--data", args.data]
    work = Path(tempfile.mkdtemp(prefix="bench-distributed-"))

    ev = ["adainfer.eval", *model, "--task", "sst2", *data, "--shots", "5", "--limit", args.rows, "--method", "dense",
          "svm", "oracle", "--dtype", "float32", "--batch-size", "8", "--no-figures"]
    configs = [("1 process x 1 thread", 1, 1, ["--threads", "1"]),
               (f"1 process x {args.ranks} threads", 1, args.ranks, ["--threads", str(args.ranks)]),
               (f"torchrun {args.ranks} ranks x 1 thread", args.ranks, 1, [])]
    rows, results = [], {}
    for name, ranks, threads, extra in configs:
        out = work / f"eval_{ranks}_{threads}.json"
        wall, _ = command([*ev, *extra, "--out", out], ranks, threads)
        res = json.loads(out.read_text())["runs"][0]
        results[name] = res
        model_s = sum(m["summary"]["seconds"] for m in res["methods"].values())
        rows.append({"eval": name, "wall_s": round(wall, 1), "rows_per_s": round(args.rows / wall, 2),
                     "model_s (all ranks)": round(model_s, 1),
                     "svm pruning": round(res["methods"]["svm"]["summary"]["pruning_ratio"], 4)})

    def answers(res, keys=("prediction", "layers_run")):
        return {m: [[r[k] for k in keys] for r in v["records"]] for m, v in res["methods"].items()}

    def records(res):
        return {m: [{k: x for k, x in r.items() if k != "seconds"} for r in v["records"]]
                for m, v in res["methods"].items()}

    one, many, dist = (results[c[0]] for c in configs)
    checks = {"torchrun == 1 thread (every record field but seconds)": records(dist) == records(one),
              f"torchrun == {args.ranks} threads (answers and layers)": answers(dist) == answers(many)}
    base = rows[1]["wall_s"]
    for r in rows:
        r["speed vs 1 process x N threads"] = round(base / r["wall_s"], 2)
    print_table(rows, list(rows[0]))

    from bench_generation import open_prompts

    from adainfer.tasks import default_data_dir

    prompts = work / "prompts.jsonl"
    texts = [t for t, _ in open_prompts(args.data or default_data_dir(), args.gen_rows)]
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    gen = ["adainfer.run", *model, "--prompts", prompts, "--max-new-tokens", args.new_tokens, "--dense", "--json",
           "--dtype", "float32", "--batch-size", "1"]
    w1, single = command([*gen, "--threads", "1"])
    n = args.tp or tp_size(args.model)
    w2, tp = command([*gen, "--tp", n], n, 1)
    tokens = [[json.loads(x)["token_ids"] for x in proc.stdout.splitlines()] for proc in (single, tp)]
    checks[f"--tp {n} generation == 1 process"] = tokens[0] == tokens[1]
    gen_rows = [{"generate": "1 process x 1 thread", "wall_s": round(w1, 1)},
                {"generate": f"torchrun {n} ranks, --tp {n}", "wall_s": round(w2, 1)}]
    print()
    print_table(gen_rows, ["generate", "wall_s"])
    print()
    for k, v in checks.items():
        print(f"{'SAME' if v else 'DIFFERENT'}: {k}")
    write_json(args.out, {"machine": machine(), "rows": args.rows, "ranks": args.ranks, "eval": rows,
                          "generate": {"prompts": args.gen_rows, "new_tokens": args.new_tokens, "rows": gen_rows},
                          "checks": checks})


if __name__ == "__main__":
    main()
