"""The MLP's gate and up as one product of the fused matrix or as two of its row blocks, in one process, interleaved.

Gate and up are one matrix (GatedMLP.w13); model.gate_up_split picks two products where they run in float32 on a CPU
and one elsewhere. This times both on the same model by forcing GatedMLP.SPLIT (model.gate_up_way): greedy decode,
ms per generated token ((time for 1 + N tokens - time for 1 token) / N, as bench_decode), and prefill, ms for the
last-token logits of a prompt of each --lengths, in each --dtypes. `default` says which one gate_up_split picks
there. --decode compiled times the decode graph instead of the eager loop (adainfer.fast_decode: on a GPU CUDA
graphs of inductor's blocks, one graph per way, each compiled and captured under its own setting before the clock
starts).

    python benchmarks/bench_gate_up.py [--dtypes float32 bfloat16] [--new-tokens 32] [--lengths 64 256]
                                       [--decode eager|compiled] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    add_device,
    check_device,
    device_sync,
    interleaved,
    load_ours,
    machine,
    print_table,
    write_json,
)

from adainfer.fast_decode import DecodeGraph  # noqa: E402
from adainfer.generate import generate  # noqa: E402
from adainfer.model import gate_up_split, gate_up_way  # noqa: E402

PROMPT = "Q: What is the capital of France?\nA: Paris\n\nQ: Name a primary colour.\nA:"


def forced(split: bool, fn):
    """fn() with gate and up run one way (model.gate_up_way)."""
    def run():
        with gate_up_way(split):
            return fn()
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="a converted folder (default: the default model)")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--lengths", nargs="+", type=int, default=[64, 256])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--decode", default="eager", choices=["eager", "compiled"])
    p.add_argument("--out", type=Path, default=Path("results/bench_gate_up.json"))
    add_device(p)
    args = p.parse_args()
    check_device(args.device)
    torch.set_num_threads(args.threads)
    from adainfer.default_model import default_model_dir

    folder = args.model or default_model_dir(progress=False)
    sync, n = device_sync(args.device), args.new_tokens
    rows = []
    for dtype in args.dtypes:
        model, tok = load_ours(folder, dtype, args.device)
        ids = tok.encode(PROMPT)
        probe = torch.zeros(1, 1, model.config.dim, dtype=model.dtype, device=model.device)
        default = "two" if gate_up_split(probe) else "one"
        fns = {}
        for split in (True, False):
            graph = DecodeGraph(model, "compiled") if args.decode == "compiled" else None
            fns[("decode", 1, split)] = forced(split, lambda g=graph: generate(model, [ids], 1, graph=g))
            fns[("decode", 1 + n, split)] = forced(split, lambda g=graph: generate(model, [ids], 1 + n, graph=g))
            for T in args.lengths:
                x = torch.randint(0, model.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(T))
                x = x.to(args.device)
                fns[("prefill", T, split)] = forced(split, lambda x=x: model(x))
        # (the first call of each way compiles and captures its graph, before the clock)
        same = [fns[("decode", 1 + n, s)]()[0].token_ids for s in (True, False)]
        times = interleaved(fns, repeats=args.repeats, sync=sync)
        for split, name in ((True, "two"), (False, "one")):
            decode = 1000 * (times[("decode", 1 + n, split)] - times[("decode", 1, split)]) / n
            rows.append({"dtype": dtype, "gate_up": name, "default": name == default,
                         "decode_ms_per_token": decode,
                         **{f"prefill_{T}_ms": 1000 * times[("prefill", T, split)] for T in args.lengths}})
        for key in ["decode_ms_per_token", *(f"prefill_{T}_ms" for T in args.lengths)]:
            rows[-1][key + "_vs_two"] = rows[-2][key] / rows[-1][key]
        rows[-1]["same_tokens"] = same[0] == same[1]
    cols = ["dtype", "gate_up", "default", "decode_ms_per_token", *(f"prefill_{T}_ms" for T in args.lengths),
            "decode_ms_per_token_vs_two", "same_tokens"]
    print_table(rows, cols)
    write_json(args.out, {"benchmark": "gate and up: one product or two", "machine": machine(),
                          "device": args.device, "decode": args.decode, "threads": args.threads, "new_tokens": n,
                          "rows": rows})


if __name__ == "__main__":
    main()
