"""Block-size sweep of the Triton top-2 kernel on a GPU (where its defaults come from).

    python benchmarks/sweep_kernel_gpu.py [--out results/sweep_kernel_gpu.json]
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_gpu import copy_bandwidth, gpu_time  # noqa: E402
from common import machine, print_table, write_json  # noqa: E402

from adainfer.kernels.top2 import lm_head_top2_triton  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("results/sweep_kernel_gpu.json"))
    args = p.parse_args()
    bw = copy_bandwidth()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for V, d in ((32000, 4096), (49152, 576)):
        w = (torch.randn(V, d, device="cuda") * 0.02).to(torch.bfloat16)
        nw = torch.ones(d, device="cuda", dtype=torch.bfloat16)
        gb = w.numel() * 2 / 1e9
        gemv = {}
        for B in (1, 8):
            h = torch.randn(B, d, device="cuda", dtype=torch.bfloat16)
            gemv[B] = gpu_time(lambda: h @ w.T)
            results = []
            for bv, bd, warps, per_sm, stages in itertools.product((32, 64, 128), (128, 256, 512), (4, 8),
                                                                   (4, 8), (3, 4)):
                if bv * bd > 64 * 512 or bd > d * 2:
                    continue
                try:
                    t = gpu_time(lambda: lm_head_top2_triton(h, w, nw, 1e-5, bv, bd, per_sm * sms, warps, stages))
                except Exception as e:  # a config the compiler refuses (shared memory): skip it
                    print(f"skip {bv, bd, warps, per_sm, stages}: {type(e).__name__}")
                    continue
                results.append((t, (bv, bd, per_sm, warps, stages)))
            results.sort()
            for t, cfg in results[:3]:
                rows.append({"head": f"{V} x {d}", "batch": B, "config (block_v, block_d, per_sm, warps, stages)":
                             str(cfg), "us": 1e6 * t, "GBps": gb / t, "fraction_of_copy_bw": gb / t / bw,
                             "cublas_gemv_us": 1e6 * gemv[B], "cublas_fraction": gb / gemv[B] / bw})
            print_table(rows[-3:], list(rows[-1]))
    print()
    print_table(rows, list(rows[0]))
    write_json(args.out, {"benchmark": "top-2 kernel block-size sweep", "machine": machine(),
                          "copy_bandwidth_GBps": bw, "rows": rows})


if __name__ == "__main__":
    main()
