"""Dense prefill: our decoder vs transformers on the same converted weights, same dtype and threads.

transformers runs with logits_to_keep=1 and use_cache=False (ours computes the last token's logits only and keeps
no cache on a single-token answer). Ours runs twice: its modules (`ours`) and each block compiled by inductor
(`compiled`, --prefill compiled: fast_prefill.compile_prefill; its first call at each shape timed apart). All run in
this one process, interleaved, median of --repeats.

    python benchmarks/bench_dense.py [--model DIR] [--lengths 64 256 1024] [--dtypes float32 bfloat16] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    add_device,
    check_device,
    device_sync,
    hf_from_ours,
    interleaved,
    load_ours,
    machine,
    print_table,
    write_json,
)

from adainfer.fast_prefill import compile_prefill, prefill_mode  # noqa: E402


def compare(ours, hf, ids: torch.Tensor, repeats: int, sync=None) -> tuple[bool, dict]:
    """Top-1 agreement of ours (both prefill modes) with transformers, and the median seconds of each, interleaved;
    "compiled_first_s": the first compiled call at this shape (its compiles)."""
    prefill_mode(ours, "compiled")  # (checked once: a compiler is there)

    def run(mode):
        def call():
            compile_prefill(ours, mode == "compiled")
            return ours(ids)
        return call

    with torch.inference_mode():
        want = hf(ids, logits_to_keep=1, use_cache=False).logits[:, -1].argmax(-1)
        if sync:
            sync()
        t0 = time.perf_counter()
        compiled = run("compiled")()
        if sync:
            sync()
        first = time.perf_counter() - t0
        same = torch.equal(run("eager")().token, want) and torch.equal(compiled.token, want)
        t = interleaved({"ours": run("eager"), "compiled": run("compiled"),
                         "transformers": lambda: hf(ids, logits_to_keep=1, use_cache=False)}, repeats, sync=sync)
        compile_prefill(ours, False)
        return same, {**t, "compiled_first_s": first}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="converted Llama folder (default: the default model)")
    p.add_argument("--lengths", type=int, nargs="+", default=[64, 256, 1024])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("results/bench_dense.json"))
    add_device(p)
    args = p.parse_args()
    check_device(args.device)
    torch.set_num_threads(args.threads)
    if args.model is None:
        from adainfer.default_model import default_model_dir

        args.model = default_model_dir()

    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        ours, _ = load_ours(args.model, dtype, args.device)
        hf = hf_from_ours(args.model, dtype, args.device)
        for n in args.lengths:
            ids = torch.randint(0, ours.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n))
            same, t = compare(ours, hf, ids.to(args.device), args.repeats, device_sync(args.device))
            rows.append({"dtype": dtype_name, "tokens": n, "ours_ms": 1000 * t["ours"],
                         "compiled_ms": 1000 * t["compiled"], "transformers_ms": 1000 * t["transformers"],
                         "speedup": t["transformers"] / t["ours"],
                         "compiled_speedup": t["transformers"] / t["compiled"],
                         "compiled_first_s": t["compiled_first_s"], "same_top1": same})
            print_table(rows[-1:], list(rows[-1]))
        del ours, hf
    print()
    print_table(rows, ["dtype", "tokens", "ours_ms", "compiled_ms", "transformers_ms", "speedup", "compiled_speedup",
                       "compiled_first_s", "same_top1"])
    write_json(args.out, {"benchmark": "dense prefill, ours vs transformers", "machine": machine(),
                          "device": args.device, "model": str(args.model), "repeats": args.repeats, "rows": rows})


if __name__ == "__main__":
    main()
