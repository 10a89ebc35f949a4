"""GPU figures (run where a CUDA GPU is available): the Triton exit-check kernel's bandwidth and speed against torch,
and early exit end to end on a Llama-2-7B-shaped random-init model in bfloat16 (timing only).

1. Kernel: last-token LM head -> top-2 for heads of 32000 x 4096 and 49152 x 576, batch 1 and 8, Triton vs
   torch.topk(softmax(W @ h)) vs our torch reference; GB/s of weight read against a measured device copy.
2. End to end: prefill of 256/1024/2048 tokens, batch 1 and 8; dense vs forced exits after L/4, L/2, 3L/4 blocks,
   (a) without any check, (b) checking after every block with one host synchronisation per check (the loop's
   `fire.any()`), (c) the same checks with the flags read once every 4 checks (Plan.sync_every=4), (d) only the
   last 4 layers before the exit checked (as a calibrated first-check layer does). Twice: with every block captured
   as a CUDA graph (GraphedBlocks: the GPU-side cost) and in the eager loop (Python launch overhead included).

    python benchmarks/bench_gpu.py [--out results/bench_gpu.json] [--quick]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, median_time, print_table, write_json  # noqa: E402

from adainfer.config import ModelConfig  # noqa: E402
from adainfer.exit import Plan, probe  # noqa: E402
from adainfer.kernels.top2 import lm_head_top2_reference, lm_head_top2_triton  # noqa: E402
from adainfer.model import Decoder, rope_inv_freq  # noqa: E402

LLAMA2_7B = ModelConfig(arch="llama", vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                        hidden_dim=11008, max_seq_len=4096, norm_eps=1e-5)


def sync():
    torch.cuda.synchronize()


def copy_bandwidth() -> float:
    x = torch.empty(512 * 1024 * 1024, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    t = median_time(lambda: y.copy_(x), repeats=20, warmup=3, sync=sync)
    return 2 * x.numel() / t / 1e9


def gpu_time(fn) -> float:
    """Seconds per call on the GPU with launches pipelined (triton.testing.do_bench: CUDA events, L2 flushed)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=200, return_mode="median") / 1e3


def bench_kernel(bw: float, repeats: int) -> list[dict]:
    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for V, d in ((32000, 4096), (49152, 576)):
        w = (torch.randn(V, d, generator=g, device="cuda") * 0.02).to(torch.bfloat16)
        nw = torch.ones(d, device="cuda", dtype=torch.bfloat16)
        for B in (1, 8):
            h = torch.randn(B, d, device="cuda", dtype=torch.bfloat16, generator=g)
            gb = w.numel() * w.element_size() / 1e9
            t_tri = gpu_time(lambda: lm_head_top2_triton(h, w, nw))  # the launcher's defaults
            t_naive = gpu_time(lambda: torch.softmax((h @ w.T).float(), -1).topk(2, -1))
            t_ref = gpu_time(lambda: lm_head_top2_reference(h, w, nw))
            got = lm_head_top2_triton(h, w, nw)
            want = lm_head_top2_reference(h.float(), w.float(), nw.float())
            rows.append({"head": f"{V} x {d}", "batch": B, "triton_us": 1e6 * t_tri, "torch_naive_us": 1e6 * t_naive,
                         "torch_reference_us": 1e6 * t_ref, "speedup_vs_naive": t_naive / t_tri,
                         "triton_GBps": gb / t_tri, "fraction_of_copy_bw": gb / t_tri / bw,
                         "same_top1": bool(torch.equal(got.top1, want.top1)),
                         "max_p1_err": float((got.p1 - want.p1).abs().max())})
            print_table(rows[-1:], list(rows[-1]))
    return rows


def random_model(config: ModelConfig) -> Decoder:
    with torch.device("meta"):
        model = Decoder(config)
    model = model.to_empty(device="cuda").to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    model.inv_freq = rope_inv_freq(config).cuda()
    return model.eval().requires_grad_(False)


class FireAt:
    """Checks after every block from `first` on (the real probe: Triton top-2 and the features), fires after
    block k."""

    needs_record = False

    def __init__(self, k: int, first: int = 1):
        self.k, self.first, self.n = k, first, 0

    def should_check(self, n: int) -> bool:
        self.n = n
        return n >= self.first

    def decide(self, top2, h_last, record, state):
        fire = torch.full_like(top2.p1, float(self.n == self.k)) > 0.5
        return {"gap": top2.p1 - top2.p2, "top_prob": top2.p1}, fire, state

    def remember(self, h_last, record, state):
        return state


class GraphedBlocks:
    """Every block of one (batch, tokens) shape captured as a CUDA graph, chained through static buffers, so that a
    forward costs one launch per block: the GPU-side cost of exits and checks without eager Python overhead."""

    def __init__(self, model: Decoder, ids: torch.Tensor):
        from adainfer.model import default_positions

        self.model = model
        B, T = ids.shape
        positions = default_positions(None, None, None, B, T, ids.device)
        ctx = model.context(positions, None, None)
        x = model.embed(ids, positions)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside capture (cuBLAS workspaces, Triton/SDPA autotune)
            y = x
            for i, block in enumerate(model.layers):
                y = block(y, ctx, i)
        torch.cuda.current_stream().wait_stream(side)
        self.graphs, self.outs, pool = [], [], None
        for i, block in enumerate(model.layers):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                x = block(x, ctx, i)
            pool = g.pool()
            self.graphs.append(g)
            self.outs.append(x)

    def run(self, k: int, check_from: int | None = None, window: int = 1):
        """Blocks 1..k; with check_from, the real exit check (Triton top-2 + features) after each block from there
        on, its flag read every `window` checks; then the answer's LM head."""
        model, weight, pending = self.model, self.model.head_weight, []
        for i in range(k):
            self.graphs[i].replay()
            n = i + 1
            if check_from is not None and check_from <= n < k + 1:
                top2, _ = probe(model, self.outs[i][:, -1], weight)
                pending.append((top2.p1 - top2.p2) > 2.0)  # never true: the timing is of the check itself
                if len(pending) == window:
                    bool(torch.stack(pending).any())  # the host synchronisation
                    pending = []
        return model.logits(self.outs[k - 1][:, -1:])


def bench_graphs(lengths, batches) -> list[dict]:
    model = random_model(LLAMA2_7B)
    L = LLAMA2_7B.n_layers
    rows = []
    for n in lengths:
        for b in batches:
            ids = torch.randint(0, LLAMA2_7B.vocab_size, (b, n), device="cuda")
            with torch.inference_mode():
                gb = GraphedBlocks(model, ids)
                dense = gpu_time(lambda: gb.run(L))
                for k in (L // 4, L // 2, 3 * L // 4):
                    t_stop = gpu_time(lambda k=k: gb.run(k))
                    t_all = gpu_time(lambda k=k: gb.run(k, 1))
                    t_win = gpu_time(lambda k=k: gb.run(k, 1, 4))
                    t_few = gpu_time(lambda k=k: gb.run(k, k - 3))
                    saved = dense - t_stop
                    rows.append({"tokens": n, "batch": b, "exit_layer": k, "ideal": L / k, "dense_ms": 1e3 * dense,
                                 "no_check_ms": 1e3 * t_stop, "r/i no check": dense / t_stop / (L / k),
                                 "r/i every layer": dense / t_all / (L / k),
                                 "r/i every layer, sync/4": dense / t_win / (L / k),
                                 "r/i 4 checks": dense / t_few / (L / k),
                                 "overhead/saved every layer": (t_all - t_stop) / saved,
                                 "overhead/saved sync/4": (t_win - t_stop) / saved,
                                 "overhead/saved 4 checks": (t_few - t_stop) / saved})
                    print_table(rows[-1:], list(rows[-1]))
                gb = None  # free the captured graphs before the next shape
                torch.cuda.empty_cache()
    return rows


def bench_e2e(repeats: int, lengths, batches) -> list[dict]:
    model = random_model(LLAMA2_7B)
    L = LLAMA2_7B.n_layers
    rows = []
    for n in lengths:
        for b in batches:
            ids = torch.randint(0, LLAMA2_7B.vocab_size, (b, n), device="cuda")
            with torch.inference_mode():
                dense = median_time(lambda: model(ids), repeats, 2, sync)
                for k in (L // 4, L // 2, 3 * L // 4):
                    t_stop = median_time(lambda k=k: model(ids, plan=Plan(exit_at=k)), repeats, 2, sync)
                    t_all = median_time(lambda k=k: model(ids, plan=Plan(exit=FireAt(k))), repeats, 2, sync)
                    t_win = median_time(lambda k=k: model(ids, plan=Plan(exit=FireAt(k), sync_every=4)), repeats,
                                        2, sync)
                    t_few = median_time(lambda k=k: model(ids, plan=Plan(exit=FireAt(k, k - 3))), repeats, 2, sync)
                    saved = dense - t_stop
                    rows.append({"tokens": n, "batch": b, "exit_layer": k, "ideal": L / k, "dense_ms": 1e3 * dense,
                                 "no_check_ms": 1e3 * t_stop, "every_layer_ms": 1e3 * t_all,
                                 "every_layer_sync4_ms": 1e3 * t_win, "last4_checks_ms": 1e3 * t_few,
                                 "r/i no check": dense / t_stop / (L / k),
                                 "r/i every layer": dense / t_all / (L / k),
                                 "r/i every layer, sync/4": dense / t_win / (L / k),
                                 "r/i 4 checks": dense / t_few / (L / k),
                                 "overhead/saved every layer": (t_all - t_stop) / saved,
                                 "overhead/saved sync/4": (t_win - t_stop) / saved,
                                 "overhead/saved 4 checks": (t_few - t_stop) / saved})
                    print_table(rows[-1:], list(rows[-1]))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="fewer lengths and repeats")
    p.add_argument("--graphs-only", action="store_true", help="skip the eager end-to-end table")
    p.add_argument("--out", type=Path, default=Path("results/bench_gpu.json"))
    args = p.parse_args()
    assert torch.cuda.is_available(), "bench_gpu.py needs a CUDA GPU"
    bw = copy_bandwidth()
    print(f"device copy bandwidth: {bw:.0f} GB/s ({torch.cuda.get_device_name()})")
    kernel = bench_kernel(bw, args.repeats)
    lengths, batches = ((256,), (1,)) if args.quick else ((256, 1024, 2048), (1, 8))
    graphs = bench_graphs((256, 1024), (1, 8)) if not args.quick else []
    e2e = bench_e2e(max(5, args.repeats // 4), lengths, batches) if not args.graphs_only else []
    print()
    print_table(kernel, list(kernel[0]))
    for table in (graphs, e2e):
        if table:
            print()
            print_table(table, list(table[0]))
    write_json(args.out, {"benchmark": "GPU: exit kernel and 7B-shaped early exit", "machine": machine(),
                          "copy_bandwidth_GBps": bw, "kernel": kernel, "e2e_graphs": graphs, "e2e_eager": e2e})


if __name__ == "__main__":
    main()
