"""Early exit end to end: forced exit depths against dense, realised speedup vs the ideal L / layers_run.

For each prompt length and batch size, in one process and interleaved: the dense run (all L blocks, no check), and
for k in L/4, L/2, 3L/4, L a run that checks after every block from --first-check on and exits after block k (a rule
that fires exactly there), with the exit features over the full vocabulary (from the head in the model's dtype,
`vocab`, and from its int8 copy, `vocab8`: Plan.check_head) and over --candidates. The check overhead is broken out
by a run that stops at k without any check (exit_at=k).

    python benchmarks/bench_exit_e2e.py [--lengths 64 256 1024] [--batches 1 8] [--dtype auto]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import add_device, check_device, device_sync, interleaved, machine, print_table, write_json  # noqa: E402

from adainfer.exit import (
    Plan,  # noqa: E402
    compute_features,  # noqa: E402
)
from adainfer.loading import load_model  # noqa: E402


class FireAt:
    """An exit rule for timing: checks after every block from `first` on, fires after block `k`."""

    needs_record = False
    features = ["gap", "top_prob"]

    def __init__(self, first: int, k: int):
        self.first, self.k, self.n = first, k, 0

    def should_check(self, n: int) -> bool:
        self.n = n
        return n >= self.first

    def decide(self, top2, h_last, record, state):
        feats = compute_features(self.features, top2, h_last, record, state)
        return feats, torch.full_like(top2.p1, self.n == self.k, dtype=torch.bool), state

    def remember(self, h_last, record, state):
        return state


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path)
    p.add_argument("--lengths", type=int, nargs="+", default=[64, 256, 1024])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--dtype", default="auto")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--first-check", type=int, default=1, help="first layer checked (default 1: every layer)")
    p.add_argument("--candidates", nargs="+", default=[" positive", " negative"])
    p.add_argument("--out", type=Path, default=Path("results/bench_exit_e2e.json"))
    add_device(p)
    args = p.parse_args()
    check_device(args.device)
    torch.set_num_threads(args.threads)
    if args.model is None:
        from adainfer.default_model import default_model_dir

        args.model = default_model_dir(progress=False)
    model, tok = load_model(args.model, args.dtype, args.device)
    # (the int8 head on a GPU is the Triton kernel's, which does not soft-cap: exit.check_int8_head)
    capped = args.device == "cuda" and model.config.final_softcap is not None
    kinds = ("vocab", "cand") if capped else ("vocab", "vocab8", "cand")
    L = model.config.n_layers
    cands = torch.tensor([tok.piece_id(c) for c in args.candidates], device=args.device)
    depths = sorted({max(1, L // 4), L // 2, 3 * L // 4, L})
    rows = []
    for n in args.lengths:
        for b in args.batches:
            ids = torch.randint(0, model.config.vocab_size, (b, n), generator=torch.Generator().manual_seed(n))
            ids = ids.to(args.device)
            runs = {"dense": lambda: model(ids)}
            for k in depths:
                runs[f"stop{k}"] = (lambda k=k: model(ids, plan=Plan(exit_at=k)))
                runs[f"vocab{k}"] = (lambda k=k: model(ids, plan=Plan(exit=FireAt(args.first_check, k))))
                if "vocab8" in kinds:
                    runs[f"vocab8{k}"] = (lambda k=k: model(ids, plan=Plan(exit=FireAt(args.first_check, k),
                                                                            check_head="int8")))
                runs[f"cand{k}"] = (lambda k=k: model(ids, plan=Plan(exit=FireAt(args.first_check, k),
                                                                      candidates=cands)))
            with torch.inference_mode():
                t = interleaved(runs, repeats=args.repeats, sync=device_sync(args.device))
            for k in depths:
                checks = max(0, min(k, L - 1) - args.first_check + 1)
                row = {"tokens": n, "batch": b, "exit_layer": k, "checks": checks, "ideal": L / k,
                       "dense_ms": 1000 * t["dense"], "no_check_ms": 1000 * t[f"stop{k}"],
                       **{f"{kind}_ms": 1000 * t[f"{kind}{k}"] for kind in kinds}}
                for kind in (*kinds, "no_check"):
                    row[f"{kind}_speedup"] = t["dense"] / t[f"stop{k}" if kind == "no_check" else f"{kind}{k}"]
                    row[f"{kind}_realised/ideal"] = row[f"{kind}_speedup"] / row["ideal"]
                saved = t["dense"] - t[f"stop{k}"]
                for kind in kinds:
                    overhead = t[f"{kind}{k}"] - t[f"stop{k}"]
                    row[f"{kind}_check_overhead/saved"] = overhead / saved if saved > 0 else None
                rows.append(row)
                print_table(rows[-1:], ["tokens", "batch", "exit_layer", "checks", "ideal", "dense_ms", "no_check_ms",
                                        "vocab_ms", "vocab8_ms", "cand_ms", "vocab_realised/ideal",
                                        "vocab8_realised/ideal", "cand_realised/ideal"])
    cols = ["tokens", "batch", "exit_layer", "ideal", "no_check_speedup", "cand_speedup", "cand_realised/ideal",
            "vocab_speedup", "vocab_realised/ideal", "vocab8_speedup", "vocab8_realised/ideal",
            "cand_check_overhead/saved", "vocab_check_overhead/saved", "vocab8_check_overhead/saved"]
    print()
    print_table(rows, cols)
    write_json(args.out, {"benchmark": "forced exit depths vs dense", "machine": machine(), "device": args.device,
                          "model": str(args.model),
                          "dtype": str(model.dtype)[6:], "first_check": args.first_check,
                          "candidates": args.candidates, "repeats": args.repeats, "rows": rows})


if __name__ == "__main__":
    main()
