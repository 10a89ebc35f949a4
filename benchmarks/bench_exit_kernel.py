"""The exit check for one token: last-token LM head -> softmax top-2, ours vs the naive torch.softmax(W @ h).topk(2).

On CPU "ours" is the production path (adainfer.kernels.top2.lm_head_top2_reference: one GEMV, argmax and logsumexp, no
softmax tensor); on a GPU it is the Triton kernel, which never writes the logits. Heads: the default model's
(49152 x 576, its real weights) and a Llama-2-7B-shaped one (32000 x 4096, random). Reported: ms per check and
GB/s of weight read, against the machine's measured read (CPU) or copy (GPU) bandwidth.

    python benchmarks/bench_exit_kernel.py [--device cpu|cuda] [--dtypes float32 bfloat16] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import check_device, machine, median_time, print_table, write_json  # noqa: E402

from adainfer.kernels.top2 import lm_head_top2, lm_head_top2_reference  # noqa: E402


def naive(h, w):
    return torch.softmax((h @ w.T).float(), dim=-1).topk(2, dim=-1)


def read_bandwidth(device: str) -> float:
    """GB/s: CPU, a sum over 256 MB (read only); GPU, a device-to-device copy of 1 GB (read + write counted)."""
    if device == "cuda":
        x = torch.empty(256 * 1024 * 1024, dtype=torch.float32, device="cuda")
        y = torch.empty_like(x)
        t = median_time(lambda: y.copy_(x), repeats=10, sync=torch.cuda.synchronize)
        return 2 * x.numel() * 4 / t / 1e9
    x = torch.ones(64 * 1024 * 1024, dtype=torch.float32)
    return x.numel() * 4 / median_time(lambda: x.sum(), repeats=10) / 1e9


def heads(device: str, dtype: torch.dtype, model_dir: Path | None):
    from adainfer.loading import load_model

    if model_dir is None:
        from adainfer.default_model import default_model_dir

        model_dir = default_model_dir(progress=False)
    model, _ = load_model(model_dir, dtype, device)
    yield "SmolLM2-135M head", model.head_weight, model.norm.weight
    g = torch.Generator().manual_seed(0)
    yield "Llama-2-7B-shaped head", (torch.randn(32000, 4096, generator=g) * 0.02).to(dtype).to(device), \
        torch.ones(4096, dtype=dtype, device=device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"],
                   help="where the heads and checks run (default: cuda where there is a GPU)")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--model", type=Path)
    p.add_argument("--out", type=Path, default=Path("results/bench_exit_kernel.json"))
    args = p.parse_args()
    check_device(args.device)
    torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if args.device == "cuda" else None
    bw = read_bandwidth(args.device)
    print(f"measured {'copy' if args.device == 'cuda' else 'read'} bandwidth: {bw:.1f} GB/s")
    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for name, w, nw in heads(args.device, dtype, args.model):
            h = torch.randn(args.batch, w.shape[1], dtype=dtype, device=args.device)
            gb = w.numel() * w.element_size() / 1e9
            ours = median_time(lambda: lm_head_top2(h, w, nw), args.repeats, 3, sync)
            ref = median_time(lambda: lm_head_top2_reference(h, w, nw), args.repeats, 3, sync)
            base = median_time(lambda: naive(h, w), args.repeats, 3, sync)
            got, want = lm_head_top2(h, w, nw), lm_head_top2_reference(h.float(), w.float(), nw.float())
            rows.append({"head": name, "dtype": dtype_name, "V x d": f"{w.shape[0]} x {w.shape[1]}",
                         "ours_ms": 1000 * ours, "reference_ms": 1000 * ref, "naive_ms": 1000 * base,
                         "speedup_vs_naive": base / ours, "ours_GBps": gb / ours, "fraction_of_bw": gb / ours / bw,
                         "same_top1": bool(torch.equal(got.top1.cpu(), want.top1.cpu()))})
            print_table(rows[-1:], list(rows[-1]))
    print()
    print_table(rows, ["head", "dtype", "ours_ms", "reference_ms", "naive_ms", "speedup_vs_naive", "ours_GBps",
                       "fraction_of_bw", "same_top1"])
    write_json(args.out, {"benchmark": "exit check kernel (one token)", "device": args.device, "machine": machine(),
                          "bandwidth_GBps": bw, "batch": args.batch, "rows": rows})


if __name__ == "__main__":
    main()
