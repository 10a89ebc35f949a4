"""What a product costs for a few rows at once: what a speculative verify step (and a small batch) pays per row.

For 1-16 rows: the block matrices of one decode step of the default model's shape (q/k/v 960 x 576, o 576 x 576,
gate+up 3072 x 576, down 576 x 1536, times 30 blocks) through the int4 kernel, and the 49152 x 576 LM head as
float32 `x @ W.T`, as `W @ x.T` (the tall form quant.head_logits takes for quant.TALL_HEAD_ROWS), and through the int8
kernel. Random weights (costs do not depend on the values); each figure the minimum over --rounds of a median of
--repeats, in milliseconds.

CPU only, by subject: the int4 / int8 kernels are C++ for the CPU.

    python benchmarks/bench_rows.py [--rows 1 2 3 4 8 16]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, median_time, print_table, write_json  # noqa: E402

from adainfer.quant import QuantWeight, load_q4q8_kernel, quantize_int4, quantize_int8  # noqa: E402

BLOCK = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # qkv, o, gate+up, down: (out, in)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", nargs="+", type=int, default=[1, 2, 3, 4, 5, 8, 12, 16])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("results/bench_rows.json"))
    args = p.parse_args()
    load_q4q8_kernel()
    torch.manual_seed(0)
    block = [QuantWeight.int4(*quantize_int4(torch.randn(n, k) * 0.02)) for n, k in BLOCK]
    head = torch.randn(49152, 576) * 0.02
    head_q8 = QuantWeight(*quantize_int8(head))

    def ms(fn) -> float:
        return 1e3 * min(median_time(fn, args.repeats) for _ in range(args.rounds))

    rows = []
    for M in args.rows:
        xs = {k: torch.randn(M, k) for k in (576, 1536)}
        x = xs[576]
        row = {"rows": M,
               "int4_block_ms_x30": 30 * ms(lambda: [w(xs[w.scale.shape[1] * 32]) for w in block]),
               "head_x_wT_ms": ms(lambda: F.linear(x, head)),
               "head_w_xT_ms": ms(lambda: (head @ x.T).T),
               "head_int8_ms": ms(lambda: head_q8(x))}
        rows.append(row)
        print_table(rows[-1:], list(row))
    print()
    print_table(rows, list(rows[0]))
    write_json(args.out, {"benchmark": "products over a few rows", "machine": machine(),
                          "threads": torch.get_num_threads(), "command": " ".join(sys.argv), "rows": rows})


if __name__ == "__main__":
    main()
