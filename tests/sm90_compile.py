"""Compile the Triton top-2 kernel for an H100 (sm_90) without a GPU, through Triton's own ptxas: the configurations
a GPU run falls back on (the fixed defaults) and every one the autotuner may time (pipelined included), for 16-bit
and int8 heads, rows of 2048 and 576 features, one row and several. Prints one JSON line
a configuration: {"config", "head", "shared", "error"}. Run by tests/test_kernel.py in a process of its own (Triton's
interpreter, which the suite turns on, would not compile). With the argument `attention`: the decode-attention
kernels (adainfer/kernels/attention_triton.py: one pass, a split and the combine) instead, for each dtype, head size
and query group their launcher may pass (tests/test_attention.py)."""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ["TRITON_INTERPRET"] = "0"

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from adainfer.kernels.attention_triton import decode_attention_combine, decode_attention_kernel  # noqa: E402
from adainfer.kernels.top2_triton import top2_partial  # noqa: E402

ARGS = ["h_ptr", "w_ptr", "nw_ptr", "ws_ptr", "m1_ptr", "m2_ptr", "i1_ptr", "s_ptr", "count_ptr", "top1_ptr", "p1_ptr",
        "p2_ptr", "B", "V", "D", "stride_h", "stride_w", "stride_ws", "eps", "tiles_per_prog"]
ALIGNED = ["h_ptr", "w_ptr", "nw_ptr", "ws_ptr", "D", "stride_h", "stride_w"]  # as the launcher's tensors are
SMS = 132


def compile_one(head: str, block_v: int, block_d: int, num_warps: int, num_stages: int, dot: bool, pipe: bool):
    types = ["*bf16", "*i8" if head == "int8" else "*bf16", "*bf16", "*fp32", "*fp32", "*fp32", "*i32", "*fp32",
             "*i32", "*i64", "*fp32", "*fp32", "i32", "i32", "i32", "i32", "i32", "i32", "fp32", "i32"]
    const = dict(HAS_NORM=True, HAS_SCALE=head == "int8", GROUP=32, BLOCK_B=16 if dot else 1, BLOCK_V=block_v,
                 BLOCK_D=block_d, DOT=dot, DOT_DTYPE=tl.bfloat16, FUSED_MERGE=False, BLOCK_P=1024, PIPE=pipe,
                 LOOP_STAGES=num_stages if pipe else None)
    src = ASTSource(fn=top2_partial, signature={**dict(zip(ARGS, types)), **dict.fromkeys(const, "constexpr")},
                    constexprs=const, attrs={(ARGS.index(a),): [["tt.divisibility", 16]] for a in ALIGNED})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    return kernel.metadata.shared


def main():
    import adainfer.kernels.top2 as top2

    configs = []
    for head in ("bf16", "int8"):
        int8 = head == "int8"
        for B, D in ((1, 2048), (1, 576), (8, 2048), (8, 576)):  # long and short rows, one and several
            # the fixed defaults (what a failed tuning falls back on), then every candidate the tuning may time
            configs.append((head, top2.gpu_defaults(B, D, SMS, int8)))
            configs += [(head, c) for c in top2.candidates(B, D, SMS, pipe=True, int8=int8)]
    for head, c in configs:
        row = {"config": {k: c[k] for k in ("block_v", "block_d", "num_warps", "num_stages", "dot", "pipe")},
               "head": head}
        try:
            row["shared"] = compile_one(head, c["block_v"], c["block_d"], c["num_warps"], c["num_stages"], c["dot"],
                                        c["pipe"])
        except Exception as e:  # noqa: BLE001 (reported, the test names it)
            row["error"] = f"{type(e).__name__}: {e}"[:400]
        print(json.dumps(row), flush=True)


ATTENTION_ARGS = ["q_ptr", "k_ptr", "v_ptr", "valid_ptr", "out_ptr", "part_acc_ptr", "part_ml_ptr", "S", "Hkv", "scale",
                  "chunk", "stride_qb", "stride_qh", "stride_kb", "stride_kh", "stride_ks", "stride_vb", "stride_vh",
                  "stride_vs", "stride_mb", "stride_ob", "stride_oh"]
COMBINE_ARGS = ["part_acc_ptr", "part_ml_ptr", "out_ptr", "splits", "Hkv", "stride_ob", "stride_oh"]


def compile_attention(dtype: str, hd: int, G: int, split: bool, num_warps: int = 4, num_stages: int = 2):
    """The decode-attention kernel as adainfer.kernels.attention.decode_attention_triton launches it on a GPU (one
    pass, or one split of a long cache)."""
    from adainfer.kernels.attention import block_slots

    types = [f"*{dtype}"] * 3 + ["*i1", f"*{dtype}", "*fp32", "*fp32", "i32", "i32", "fp32", "i32"] + ["i32"] * 11
    dot = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32}[dtype]
    const = dict(G=G, HD=hd, BLOCK_G=max(16, triton.next_power_of_2(G)), BLOCK_S=block_slots(hd),
                 BLOCK_D=max(16, triton.next_power_of_2(hd)), DOT_DTYPE=dot, SPLIT=split)
    src = ASTSource(fn=decode_attention_kernel,
                    signature={**dict(zip(ATTENTION_ARGS, types)), **dict.fromkeys(const, "constexpr")},
                    constexprs=const)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    return kernel.metadata.shared


def compile_combine(dtype: str, hd: int, G: int, num_warps: int = 4):
    """The kernel that merges a split cache's partial softmaxes."""
    types = ["*fp32", "*fp32", f"*{dtype}"] + ["i32"] * 4
    const = dict(G=G, HD=hd, BLOCK_G=max(16, triton.next_power_of_2(G)), BLOCK_D=max(16, triton.next_power_of_2(hd)))
    src = ASTSource(fn=decode_attention_combine,
                    signature={**dict(zip(COMBINE_ARGS, types)), **dict.fromkeys(const, "constexpr")},
                    constexprs=const)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps}).metadata.shared


def attention():
    for dtype in ("bf16", "fp16", "fp32"):
        for hd, G in ((64, 4), (128, 4), (256, 2), (80, 8), (64, 32)):  # Llama, Qwen, Gemma 3, odd sizes, MQA-like
            row = {"dtype": dtype, "hd": hd, "G": G}
            try:
                row["shared"] = compile_attention(dtype, hd, G, split=False)
                row["shared_split"] = compile_attention(dtype, hd, G, split=True)
                row["shared_combine"] = compile_combine(dtype, hd, G)
            except Exception as e:  # noqa: BLE001 (reported, the test names it)
                row["error"] = f"{type(e).__name__}: {e}"[:400]
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    attention() if sys.argv[1:] == ["attention"] else main()
