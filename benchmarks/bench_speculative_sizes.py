"""At which model sizes self-speculation pays on this machine: verify and draft steps against a decode step, by size.

Speculation trades g draft steps and one verify step of g + 1 tokens for tau dense steps. On a CPU the verify step
costs more than a decode step wherever the matrix products are bound by arithmetic rather than by reading the
weights, which a small model's weights (cached) are; a large model's are not. For Llama shapes of growing size
(SmolLM2's 135M, 360M and 1.7B shapes, random weights: the costs do not depend on the values), batch 1 after a
prompt of --context tokens: a dense decode step, a verify step of g + 1 tokens, and draft steps of a share of the
blocks with a head of --head-rows rows, each the median of --repeats, in int4 (the kernels; the eager step function,
not the compiled graph, so every size pays the same per-block Python overhead) or float32. From them the speed a draft
predicts at first-draft acceptance alpha, tokens per round (1 - alpha^(g+1)) / (1 - alpha) over (g draft steps + one
verify step) in dense steps, and the acceptance it needs for --target.

CPU only, by subject (when a CPU's arithmetic makes verifying cost more than a step; the int4 kernels are the CPU's).

    python benchmarks/bench_speculative_sizes.py [--modes int4 float32] [--sizes 135M 360M 1.7B]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, median_time, print_table, write_json  # noqa: E402

from adainfer.config import ModelConfig  # noqa: E402
from adainfer.fast_decode import DecodeGraph, quantize_model  # noqa: E402
from adainfer.kv_cache import KVCache  # noqa: E402
from adainfer.model import Decoder  # noqa: E402
from adainfer.speculative import Draft, Steps, tokens_per_round  # noqa: E402

SHAPES = {  # SmolLM2's shapes (vocabulary 49152, tied head)
    "135M": dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536),
    "360M": dict(dim=960, n_layers=32, n_heads=15, n_kv_heads=5, hidden_dim=2560),
    "1.7B": dict(dim=2048, n_layers=24, n_heads=32, n_kv_heads=32, hidden_dim=8192),
}


def build(shape: str) -> Decoder:
    config = ModelConfig(arch="llama", vocab_size=49152, max_seq_len=8192, tie_embeddings=True, **SHAPES[shape])
    torch.manual_seed(0)
    model = Decoder(config).eval().requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    return model


def median_ms(fn, repeats: int) -> float:
    return 1e3 * median_time(fn, repeats)


def needed(target: float, g: int, draft: float, verify: float) -> float | None:
    """The first-draft acceptance at which (tau x 1) / (g x draft + verify) reaches target (costs in dense steps)."""
    lo, hi = 0.0, 1.0
    if tokens_per_round(hi, g) / (g * draft + verify) < target:
        return None
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if tokens_per_round(mid, g) / (g * draft + verify) < target else (lo, mid)
    return hi


def measure(shape: str, mode: str, args) -> list[dict]:
    """The rows of one size in one mode (the model is freed on return)."""
    model = build(shape)
    if mode == "int4":
        quantize_model(model)
    graph = DecodeGraph(model, "int4" if mode == "int4" else "compiled", compile=False)
    L = model.config.n_layers
    ids = torch.randint(0, 49152, (1, args.context + 8))
    cache = KVCache(model.local, 1, args.context + 8, model.dtype)
    model(ids[:, :args.context], cache=cache)
    vocab = torch.arange(args.head_rows)

    def at_end(fn):  # every step writes at the slot after the prompt
        def run():
            cache.length = args.context
            return fn()
        return run

    dense = median_ms(at_end(lambda: Steps(model, Draft(None, 1), cache, graph).dense(ids[0, :1])), args.repeats)
    verify = {g: median_ms(at_end(lambda g=g: Steps(model, Draft(None, g), cache, graph).verify(ids[:, :g + 1])),
                           args.repeats) / dense for g in args.lengths}
    rows = []
    for share in args.shares:
        n = max(1, round(share * L))
        steps = Steps(model, Draft(list(range(L - n, L)), 1, vocab=vocab), cache, graph)
        draft = median_ms(at_end(lambda: steps.draft(ids[0, :1])), args.repeats) / dense
        for g in args.lengths:
            rows.append({"size": shape, "mode": mode, "dense_step_ms": dense, "g": g, "verify_steps": verify[g],
                         "draft_share": round(n / L, 3), "draft_steps": draft,
                         **{f"speed_at_{a}": tokens_per_round(a, g) / (g * draft + verify[g]) for a in args.alphas},
                         f"alpha_for_{args.target}x": needed(args.target, g, draft, verify[g])})
            print_table(rows[-1:], list(rows[-1]))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--modes", nargs="+", default=["int4", "float32"], choices=["int4", "float32"])
    p.add_argument("--context", type=int, default=200)
    p.add_argument("--lengths", nargs="+", type=int, default=[1, 2, 3], help="draft lengths g")
    p.add_argument("--shares", nargs="+", type=float, default=[0.5, 0.67, 0.8], help="shares of the blocks drafting")
    p.add_argument("--head-rows", type=int, default=8192)
    p.add_argument("--alphas", nargs="+", type=float, default=[0.6, 0.7, 0.8, 0.9])
    p.add_argument("--target", type=float, default=1.15)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", type=Path, default=Path("results/bench_speculative_sizes.json"))
    args = p.parse_args()
    rows = []
    for shape in args.sizes:
        for mode in args.modes:
            rows += measure(shape, mode, args)
    print()
    print_table(rows, list(rows[0]))
    write_json(args.out, {"benchmark": "self-speculation costs by model size", "machine": machine(),
                          "threads": torch.get_num_threads(), "head_rows": args.head_rows, "context": args.context,
                          "command": " ".join(sys.argv), "rows": rows})


if __name__ == "__main__":
    main()
