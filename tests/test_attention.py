"""The decode-step attention kernel (adainfer/kernels/attention.py) against its plain-torch reference, under Triton's
interpreter on the CPU (on a GPU machine, TRITON_INTERPRET=0, the compiled kernel on CUDA tensors): float32 within
1e-5, 16-bit within the output dtype's rounding (the interpreter multiplies in float32; a GPU's 16-bit products
round the probabilities too: 2e-2 there). Odd shapes on purpose: slot counts off the 64-slot tiles, head sizes that
are not a power of two, query groups of 1 to 8 heads, strided q, k and v as the model hands them over. Then the
option that routes a decode step through it (DecodeGraph(attention="triton")), its refusals, and the kernel
compiled for an H100 without one."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adainfer.kernels.attention import (
    cache_splits,
    decode_attention,
    decode_attention_reference,
    decode_attention_triton,
)

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2 if DEVICE == "cuda" else 8e-3,
       torch.float16: 2e-3 if DEVICE == "cuda" else 1e-3}


def inputs(B, H, Hkv, S, hd, dtype, seed=0):
    """q (B, H, 1, hd) as heads() leaves it (a transposed view), k and v slices of a longer cache, valid with each
    row's last slot set (its own new token) and others random."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, 1, H, hd, generator=g).to(dtype).transpose(1, 2)
    k, v = (torch.randn(B, Hkv, S + 5, hd, generator=g).to(dtype)[:, :, :S] for _ in range(2))
    valid = torch.rand(B, S, generator=g) < 0.6
    valid[:, -1] = True
    return [t.to(DEVICE) for t in (q, k, v, valid)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B, H, Hkv, S, hd", [(1, 4, 2, 1, 16), (3, 6, 1, 70, 64), (2, 8, 8, 200, 80),
                                              (1, 32, 8, 129, 64)])
def test_the_kernel_matches_the_reference(B, H, Hkv, S, hd, dtype):
    q, k, v, valid = inputs(B, H, Hkv, S, hd, dtype)
    want = decode_attention_reference(q, k, v, valid)
    for got in (decode_attention_triton(q, k, v, valid, block_s=32), decode_attention(q, k, v, valid),
                decode_attention_triton(q, k, v, valid, block_s=16, splits=3)):  # (3 splits, or as many as S fills)
        assert got.shape == want.shape and got.dtype == dtype
        assert (got.float() - want.float()).abs().max() <= TOL[dtype]


def test_a_long_cache_with_few_rows_is_split_and_combined():
    """Flash-decoding: a long cache read by few programs (rows x kv heads) is split along its slots, each split's
    partial softmax merged by a second kernel; a short one stays one pass. Splits where no slot is valid (a row's
    cache mostly empty, what a pooled decode cache holds early on) add nothing; invalid slots are never read."""
    assert cache_splits(1, 8, 4096, 64) == 16 and cache_splits(8, 8, 4096, 64) == 2  # ~128 programs
    assert cache_splits(1, 8, 256, 64) == 1 and cache_splits(32, 8, 4096, 64) == 1  # short, or programs enough
    assert cache_splits(1, 2, 1000, 16) == 15  # at least 4 tiles a split
    q, k, v, valid = inputs(3, 8, 2, 700, 32, torch.float32, seed=5)
    valid[0] = False
    valid[0, 650:] = True  # row 0: the last 50 slots only; row 1: one slot
    valid[1] = False
    valid[1, 3] = True
    k, v = k.clone(), v.clone()
    k[~valid[:, None, :, None].expand_as(k)] = float("nan")
    want = decode_attention_reference(q, k.nan_to_num(), v, valid)
    for splits in (None, 2, 5, 44):  # (None: cache_splits' 11)
        got = decode_attention_triton(q, k, v, valid, block_s=16, splits=splits)
        assert (got - want).abs().max() <= 1e-5, splits


def test_the_op_is_one_call_inside_a_compiled_function():
    """torch.compile (inductor) keeps adainfer::decode_attention opaque: traced through its fake (shape and dtype),
    run as the kernel, the same answer as uncompiled."""
    q, k, v, valid = inputs(2, 4, 2, 40, 16, torch.float32, seed=1)
    compiled = torch.compile(lambda q, k, v, valid: decode_attention(q, k, v, valid) * 2, fullgraph=True)
    assert (compiled(q, k, v, valid) - 2 * decode_attention_reference(q, k, v, valid)).abs().max() <= 2e-5


def test_a_scale_and_masked_slots_are_honoured():
    """A given scale (Gemma's query_pre_attn_scalar) multiplies the scores; slots not valid are never read: their
    keys and values may be anything, NaN included."""
    q, k, v, valid = inputs(2, 4, 2, 100, 32, torch.float32, seed=3)
    want = decode_attention_reference(q, k, v, valid, scale=0.3)
    k, v = k.clone(), v.clone()
    k[~valid[:, None, :, None].expand_as(k)] = float("nan")
    v[~valid[:, None, :, None].expand_as(v)] = float("nan")
    got = decode_attention_triton(q, k, v, valid, scale=0.3, block_s=16)
    assert (got - want).abs().max() <= 1e-5


@pytest.mark.skipif(DEVICE == "cuda", reason="the interpreter's run of a CPU model (tests/test_cuda.py: on a GPU)")
@pytest.mark.parametrize("split", [False, True])
def test_decode_steps_through_the_kernel_give_the_same_tokens(tiny_model, split, monkeypatch):
    """DecodeGraph(attention="triton") runs each step's attention through the kernel (here through the
    interpreter: the step eagerly, and replayed from static buffers as a GPU's capture would): the greedy tokens of
    the default step (on the CPU its attention is model.cache_attention), logits within 1e-4. Split: a captured step's
    cache of 64 slots in tiles of 16, one a split, combined by the second kernel."""
    import adainfer.kernels.attention
    from adainfer.fast_decode import DecodeGraph
    from adainfer.generate import generate
    from adainfer.loading import load_model

    if split:
        monkeypatch.setattr(adainfer.kernels.attention, "block_slots", lambda hd: 16)
        monkeypatch.setattr(adainfer.kernels.attention, "SPLIT_MIN_TILES", 1)
    splits, cache_splits = [], adainfer.kernels.attention.cache_splits
    monkeypatch.setattr(adainfer.kernels.attention, "cache_splits",
                        lambda *a: splits.append(cache_splits(*a)) or splits[-1])
    model = load_model(tiny_model, "float32")[0]
    ids = [[5, 9, 14, 3, 8], [7, 2, 11]]
    want = [g.token_ids for g in generate(model, ids, 12, graph=DecodeGraph(model, compile=False))]
    for capture in (False, True):
        graph = DecodeGraph(model, compile=False, capture=capture, attention="triton")
        assert [g.token_ids for g in generate(model, ids, 12, graph=graph)] == want
    cache_a, cache_b = (g.cache(1, 16) for g in (DecodeGraph(model, compile=False),
                                                DecodeGraph(model, compile=False, attention="triton")))
    tokens = torch.tensor([[5]])
    a = DecodeGraph(model, compile=False)(tokens, cache_a)
    b = DecodeGraph(model, compile=False, attention="triton")(tokens, cache_b)
    assert (a - b).abs().max() <= 1e-4
    assert (4 in splits) if split else set(splits) == {1}, "a 64-slot cache's attention in 4 splits, or one pass"


def test_the_kernel_is_refused_where_it_cannot_run(tiny_model, monkeypatch):
    from adainfer.errors import AdainferError
    from adainfer.fast_decode import DecodeGraph
    from adainfer.loading import load_model

    model = load_model(tiny_model, "float32")[0]
    with pytest.raises(AdainferError, match="attention: unknown 'flash'"):
        DecodeGraph(model, compile=False, attention="flash")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(AdainferError, match="runs on a CUDA GPU"):
        DecodeGraph(model, compile=False, attention="triton")


@pytest.mark.slow
@pytest.mark.skipif(DEVICE == "cuda", reason="a GPU compiles it for itself")
def test_the_kernel_compiles_for_an_h100(tmp_path):
    """Without a GPU: the kernel compiled for sm_90 by Triton's own ptxas (tests/sm90_compile.py attention, in a
    process without the interpreter) for bf16, fp16 and fp32, head sizes 64 to 256 and groups of 2 to 32 query heads:
    a construct that does not lower for Hopper fails here, not on a lent GPU's clock; shared memory under 100 KB a
    block (adainfer.kernels.attention.block_slots), what GPUs smaller than an A100 or H100 have."""
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path / "triton"))
    proc = subprocess.run([sys.executable, str(Path(__file__).parent / "sm90_compile.py"), "attention"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(rows) == 15 and {r["dtype"] for r in rows} == {"bf16", "fp16", "fp32"}
    assert [r for r in rows if "error" in r] == []
    assert all(0 < r[k] <= 99 * 1024 for r in rows for k in ("shared", "shared_split", "shared_combine")), \
        "within every GPU's shared memory since Ampere's 100 KB"
