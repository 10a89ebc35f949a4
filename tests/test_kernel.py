"""The Triton last-token LM-head top-2 kernel (under TRITON_INTERPRET=1 on CPU) against the plain-torch reference.

The kernel multiplies in float32 whatever the input dtype, so it is compared with the reference run on the same
values upcast to float32: p1, p2 within 1e-5, and the same top-1 unless the reference's p1 - p2 < 1e-3 (a near tie
may break either way). The CPU reference in the model's own dtype is checked against that too, looser for bf16/fp16
(its logits are rounded to the dtype). Shapes are odd on purpose: partial vocabulary tiles (333, 1000, 4097 rows
against 64-row tiles), a partial feature block (37 against 32) and a row count off the 16-row blocks (3 rows); one row
takes the GEMV branch by default, several the tl.dot one (every configuration the autotuner may pick, one row through
tl.dot and the pipelined loops included: test_every_candidate_configuration_matches_the_reference)."""

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from adainfer.kernels.top2 import lm_head_top2, lm_head_top2_reference, lm_head_top2_triton, rms_norm_reference

pytest.importorskip("triton")
# On a GPU machine (TRITON_INTERPRET=0) the same tests run the compiled kernel on CUDA tensors.
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
assert DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"

REF_ATOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}
# The every-configuration tests in this many parts, each a share of the configurations: on a GPU each configuration is
# a Triton compile, and benchmarks/gpu_check.py deals the parts to different processes.
PARTS = 3


def check(h, w, nw=None, eps=1e-5):
    h, w, nw = h.to(DEVICE), w.to(DEVICE), None if nw is None else nw.to(DEVICE)
    got = lm_head_top2_triton(h, w, nw, eps, block_v=64, block_d=32)
    want = lm_head_top2_reference(h.float(), w.float(), None if nw is None else nw.float(), eps)
    assert torch.isfinite(got.p1).all() and torch.isfinite(got.p2).all()
    assert (got.p1 - want.p1).abs().max() <= 1e-5
    assert (got.p2 - want.p2).abs().max() <= 1e-5
    clear = (want.p1 - want.p2) >= 1e-3
    assert torch.equal(got.top1[clear], want.top1[clear])
    return got, want


@pytest.mark.parametrize("V, d", [(333, 37), (1000, 64), (4097, 96)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B", [1, 3])
def test_kernel_matches_reference(V, d, dtype, B):
    g = torch.Generator().manual_seed(V + d)
    h = torch.randn(B, d, generator=g).to(dtype)
    w = (torch.randn(V, d, generator=g) * 0.5).to(dtype)
    nw = (1 + 0.3 * torch.randn(d, generator=g)).to(dtype)
    got, want = check(h, w, nw)
    own = lm_head_top2_reference(h, w, nw, 1e-5)  # the CPU path, in the model's dtype
    assert (own.p1 - want.p1.cpu()).abs().max() <= REF_ATOL[dtype]


def test_ties_keep_the_smallest_index():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(1000, 64, generator=g)
    h = torch.randn(1, 64, generator=g)
    best = int((h @ w.T).argmax())
    w[777] = w[best]  # an exact tie, in another program's slice
    w[3] = w[best]  # and one before it
    got, want = check(h, w)
    assert got.top1.item() == 3 == want.top1.item()
    assert got.p1.item() == pytest.approx(got.p2.item(), abs=1e-7)


def test_all_equal_logits():
    got, _ = check(torch.randn(2, 64), torch.zeros(1000, 64))
    assert got.top1.tolist() == [0, 0]
    assert torch.allclose(got.p1.cpu(), torch.full((2,), 1e-3)) and torch.allclose(got.p2, got.p1)


def test_very_large_logits_do_not_overflow():
    g = torch.Generator().manual_seed(2)
    h = torch.randn(2, 64, generator=g) * 1e3
    got, want = check(h, torch.randn(1000, 64, generator=g))  # logits ~ 1e4: exp would overflow unshifted
    assert (got.p1 > 0.99).all()


def test_dispatch_sends_cpu_to_the_reference_and_cuda_to_triton(monkeypatch):
    """lm_head_top2 is a dispatch: spies in place of both paths record which one it called, and with what."""
    import adainfer.kernels.top2 as top2

    calls = []

    def spy(name):
        return lambda *args, scale=None: calls.append((name, args, scale)) or name

    monkeypatch.setattr(top2, "lm_head_top2_reference", spy("reference"))
    monkeypatch.setattr(top2, "lm_head_top2_triton", spy("triton"))
    w, nw = torch.randn(50, 16), torch.ones(16)
    cpu_h = torch.randn(1, 16)
    cuda_h = SimpleNamespace(is_cuda=True)  # stands for a CUDA tensor: the dispatch reads .is_cuda only

    def called(h, *rest, scale=None):
        calls.clear()
        out = lm_head_top2(h, *rest, scale=scale)
        assert len(calls) == 1 and calls[0][0] == out
        args = calls[0][1]
        assert args[0] is h and args[1] is w and args[2] is (rest[1] if len(rest) > 1 else None)
        assert args[3] == (rest[2] if len(rest) > 2 else 1e-5) and calls[0][2] is scale
        return out

    monkeypatch.setattr(top2, "_triton_ok", True)  # triton imports
    assert called(cpu_h, w, nw, 1e-6) == "reference"
    assert called(cuda_h, w, nw, 1e-6) == "triton"
    assert called(cuda_h, w) == "triton"
    assert called(cuda_h, w, nw, 1e-6, scale=nw) == "triton" and called(cpu_h, w, scale=nw) == "reference"
    monkeypatch.setattr(top2, "_triton_ok", False)  # triton missing or broken: the reference serves CUDA too
    assert called(cuda_h, w, nw, 1e-6) == "reference"
    assert called(cpu_h, w) == "reference"


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU")
def test_exit_loop_on_gpu_matches_cpu(converted):
    """The whole loop on CUDA (Triton probe, deferred reads, checks replayed as CUDA graphs) exits where the CPU
    reference path does."""
    import numpy as np

    from adainfer.exit import ExitRule, Plan, gap_rule
    from adainfer.generate import left_pad
    from adainfer.loading import load_model
    from adainfer.traces import collect

    folder = converted("llama-gqa-tied")[1]
    cpu, _ = load_model(folder, "float32")
    gpu, _ = load_model(folder, "float32", "cuda")
    g = torch.Generator().manual_seed(3)
    batch = [torch.randint(0, 256, (int(torch.randint(4, 30, (1,), generator=g)),), generator=g).tolist()
             for _ in range(8)]
    traces = collect(cpu, batch, progress=False)
    rule = gap_rule(float(np.median(traces.features["gap"][:, :2])))
    tokens, mask = left_pad(batch, 0)
    want = cpu(tokens, pad_mask=mask, plan=Plan(exit=ExitRule(rule)))
    gpu_rule = ExitRule(rule, "cuda")
    for window in (1, 2):
        runs = [gpu(tokens.cuda(), pad_mask=None if mask is None else mask.cuda(),
                    plan=Plan(exit=gpu_rule, sync_every=window, capture_checks=capture)) for capture in (False, True)]
        for got in runs:
            assert torch.equal(got.layers_run.cpu(), want.layers_run)
            assert torch.equal(got.token.cpu(), want.token)
            assert (got.logits.cpu() - want.logits).abs().max() <= 1e-4
        assert torch.equal(runs[0].logits, runs[1].logits), "the checks' CUDA graphs replay the same kernels"
    assert all(g.graph is not None for g in gpu_rule.check_graphs.graphs.values())


def test_many_rows_span_row_blocks():
    g = torch.Generator().manual_seed(4)
    h = torch.randn(20, 64, generator=g)  # two blocks of 16 rows
    w = torch.randn(1000, 64, generator=g) * 0.3
    check(h, w, 1 + 0.2 * torch.randn(64, generator=g))


@pytest.mark.parametrize("B", [1, 3, 20])
def test_fused_merge_equals_the_merge_kernel(B):
    """fused_merge: the last stage-1 program to finish merges every row (one launch). The same top-1 as the merge
    kernel, and the same probabilities up to float32 rounding (the merge compiled inside another kernel may sum the
    partials in another order: 1e-5 relative); the counter is back at zero after each launch, so launches (and a
    CUDA graph's replays) can follow one another. The fused launch runs first: a merge that read the partials before
    every program had written them would find the last call's (another h) and miss by far more. On a GPU this also
    runs the real head shapes, where programs finish in any order."""
    import adainfer.kernels.top2 as top2

    shapes = [(1000, 64)] if DEVICE == "cpu" else [(1000, 64), (32000, 4096), (49152, 2048), (49152, 576)]
    small = dict(block_v=64, block_d=32) if DEVICE == "cpu" else {}
    for V, d in shapes:
        g = torch.Generator().manual_seed(V + B)
        w = (torch.randn(V, d, generator=g) * 0.05).to(DEVICE)
        nw = (1 + 0.3 * torch.randn(d, generator=g)).to(DEVICE)
        for _ in range(3):
            h = torch.randn(B, d, generator=g).to(DEVICE)
            one = lm_head_top2_triton(h, w, nw, 1e-5, fused_merge=True, **small)
            two = lm_head_top2_triton(h, w, nw, 1e-5, fused_merge=False, **small)
            assert torch.equal(one.top1, two.top1)
            for a, b in zip(one[1:], two[1:]):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=0)
            assert int(top2._counters[h.device].item()) == 0


@pytest.mark.parametrize("part", range(PARTS))
@pytest.mark.parametrize("B", [1, 3])
def test_every_candidate_configuration_matches_the_reference(B, part):
    """Each configuration the autotuner may pick (adainfer.kernels.top2.candidates: one row, several, short rows;
    one row of a short head also through tensor cores, padded to 16; one tile a program; loops flattened and
    pipelined) gives the reference's top-2 on a head of short rows (600: a partial last feature block for every
    block_d) and a partial last vocabulary tile; programs as on a 2-SM machine in the interpreter, as on this GPU's
    on CUDA, in bfloat16 there (what is tuned: float32 heads keep the fixed defaults)."""
    import adainfer.kernels.top2 as top2

    g = torch.Generator().manual_seed(B)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    h, w = torch.randn(B, 600, generator=g).to(dtype), (torch.randn(1500, 600, generator=g) * 0.05).to(dtype)
    nw = (1 + 0.2 * torch.randn(600, generator=g)).to(dtype)
    want = lm_head_top2_reference(h.float(), w.float(), nw.float(), 1e-5)
    sms = torch.cuda.get_device_properties(0).multi_processor_count if DEVICE == "cuda" else 2
    configs = top2.candidates(B, 600, sms, pipe=True)
    assert any(c["pipe"] for c in configs) and any(c["dot"] for c in configs) and len(configs) > 10
    for c in configs[part::PARTS]:
        got = lm_head_top2_triton(h.to(DEVICE), w.to(DEVICE), nw.to(DEVICE), 1e-5, **c)
        clear = (want.p1 - want.p2) >= 1e-3
        assert torch.equal(got.top1.cpu()[clear], want.top1[clear]), c
        torch.testing.assert_close(got.p1.cpu(), want.p1, rtol=0, atol=1e-5)
        torch.testing.assert_close(got.p2.cpu(), want.p2, rtol=0, atol=1e-5)


def test_agreeing_answers():
    """The autotuner keeps only configurations whose answer agrees with the defaults': the same top-1 where the top
    two are apart, probabilities within 1e-3."""
    import adainfer.kernels.top2 as top2

    want = top2.Top2(torch.tensor([5, 7]), torch.tensor([0.6, 0.3004]), torch.tensor([0.2, 0.3]))
    assert top2.agreeing(top2.Top2(torch.tensor([5, 9]), want.p1 + 1e-4, want.p2), want)  # row 2: a near-tie
    assert not top2.agreeing(top2.Top2(torch.tensor([6, 7]), want.p1, want.p2), want)  # row 1 is clear
    assert not top2.agreeing(top2.Top2(want.top1, want.p1 + torch.tensor([0.0, 0.01]), want.p2), want)
    assert not top2.agreeing(top2.Top2(want.top1, want.p1, want.p2 - 0.002), want)


def test_fastest_keeps_the_quickest_configuration():
    import adainfer.kernels.top2 as top2

    configs = [{"block_v": 64}, {"block_v": 128}, {"block_v": 256}, {"block_v": 32}]
    times = {64: 3.0, 128: 1.0, 256: 1.0, 32: 2.0}
    assert top2.fastest(configs, lambda c: c["block_v"], times.get) == {"block_v": 128}  # the first of a tie

    def timer(v):  # 128 and 256 cannot run here (a Triton compile or launch error)
        if v >= 128:
            raise RuntimeError("out of resource: shared memory")
        return times[v]

    assert top2.fastest(configs, lambda c: c["block_v"], timer) == {"block_v": 32}
    assert top2.fastest(configs[1:3], lambda c: c["block_v"], timer) == {"block_v": 256}  # all fail: the last

    seen, drift = [], {64: [1.0, 3.0], 32: [2.0, 2.0]}  # 64 timed 1.0 in the first round, 3.0 in the second

    def drifting(v):
        seen.append(v)
        return drift[v][sum(s == v for s in seen) - 1]

    assert top2.fastest([{"block_v": 64}, {"block_v": 32}], lambda c: c["block_v"], drifting) == {"block_v": 64}
    assert seen == [64, 32, 64, 32], "each configuration timed once a round, in turn"


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU")
def test_the_launcher_tunes_once_per_head_and_batch_bucket():
    """On a GPU the launcher's first call on a head shape and batch bucket times the candidates and keeps the
    fastest; later calls (another batch size in the bucket included) reuse it, and the answers are the reference's."""
    import adainfer.kernels.top2 as top2

    g = torch.Generator().manual_seed(7)
    w = (torch.randn(8000, 576, generator=g) * 0.05).to("cuda", torch.bfloat16)  # (float32 heads are not tuned)
    nw = (1 + 0.2 * torch.randn(576, generator=g)).to("cuda", torch.bfloat16)
    top2._tuned.clear()
    for B in (1, 3, 5):
        h = torch.randn(B, 576, generator=g).to("cuda", torch.bfloat16)
        got, want = lm_head_top2_triton(h, w, nw, 1e-5), lm_head_top2_reference(h.float(), w.float(), nw.float())
        clear = (want.p1 - want.p2) >= 1e-3
        assert torch.equal(got.top1[clear], want.top1[clear])
        torch.testing.assert_close(got.p1, want.p1, rtol=0, atol=1e-5)
    assert len(top2._tuned) == 2  # (B 1) and (B 2-16)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for B, cfg in zip((1, 3), top2._tuned.values()):  # one of the bucket's candidates, or the defaults
        assert cfg in top2.candidates(B, 576, sms) + [top2._default_config(w.device, B, 576)]
    h = h.float()  # a float32 head keeps the fixed defaults, nothing tuned
    assert top2.config(h, w.float(), nw.float(), 1e-5) == top2._default_config(h.device, len(h), 576)
    assert len(top2._tuned) == 2


@pytest.mark.parametrize("V, d", [(333, 96), (4097, 608)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B, dot", [(1, False), (1, True), (3, True), (3, False)])
def test_int8_head_matches_the_reference(V, d, dtype, B, dot):
    """An int8 head (--check-head int8: adainfer.quant.quantize_int8's values and per-32-column scales, read as
    1.125 bytes a weight): the kernel, through its GEMV loop (scales widened per tile) and through tensor cores (one
    group a step, the integers exact, the scale after), against the reference on the dequantized head in float32;
    that reference is the model's own int8 head dequantized (the same weights the CPU check reads). Shapes: partial
    vocabulary tiles, a feature count off the 64-column blocks (608 = 19 groups)."""
    from adainfer.kernels.top2 import dequantize_head, top2_from_logits
    from adainfer.quant import dequantize_int8, quantize_int8

    g = torch.Generator().manual_seed(V + d + B)
    h = torch.randn(B, d, generator=g).to(dtype)
    w = (torch.randn(V, d, generator=g) * 0.05).to(dtype)
    nw = (1 + 0.2 * torch.randn(d, generator=g)).to(dtype)
    q, scale = quantize_int8(w)
    # the rounding: within half a step of the weights it stands for (plus float32's rounding of q * scale, up to 127
    # steps in size)
    step = scale.repeat_interleave(32, dim=1)
    assert ((dequantize_head(q, scale) - w.float()).abs() <= step * (0.5 + 127 * 2**-23)).all()
    want = lm_head_top2_reference(h.float(), q, nw.float(), 1e-5, scale=scale)
    plain = top2_from_logits(rms_norm_reference(h.float(), nw.float(), 1e-5) @ dequantize_int8(q, scale).T)
    assert all(torch.equal(a, b) for a, b in zip(want, plain))
    got = lm_head_top2_triton(h.to(DEVICE), q.to(DEVICE), nw.to(DEVICE), 1e-5, scale=scale.to(DEVICE), dot=dot,
                              **({"block_v": 64, "block_d": 64} if DEVICE == "cpu" else {}))
    clear = (want.p1 - want.p2) >= 1e-3
    assert torch.equal(got.top1.cpu()[clear], want.top1[clear])
    torch.testing.assert_close(got.p1.cpu(), want.p1, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.p2.cpu(), want.p2, rtol=0, atol=1e-5)
    full = lm_head_top2_reference(h.float(), w.float(), nw.float(), 1e-5)  # the head it stands for: close
    assert (got.p1.cpu() - full.p1).abs().max() < 0.02


@pytest.mark.parametrize("part", range(PARTS))
@pytest.mark.parametrize("B", [1, 3])
def test_every_int8_candidate_configuration_matches_the_reference(B, part):
    """The autotuner's configurations for an int8 head (--check-head int8): its tensor-core ones take one group of
    columns a step (block_d 32), each distinct configuration once; every one gives the reference's top-2."""
    import adainfer.kernels.top2 as top2
    from adainfer.quant import quantize_int8

    g = torch.Generator().manual_seed(10 + B)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    h, nw = torch.randn(B, 608, generator=g).to(dtype), (1 + 0.2 * torch.randn(608, generator=g)).to(dtype)
    q, scale = quantize_int8(torch.randn(700, 608, generator=g) * 0.05)
    want = lm_head_top2_reference(h.float(), q, nw.float(), 1e-5, scale=scale)
    sms = torch.cuda.get_device_properties(0).multi_processor_count if DEVICE == "cuda" else 2
    configs = top2.candidates(B, 608, sms, pipe=True, int8=True)
    assert all(c["block_d"] == top2.GROUP for c in configs if c["dot"]) and any(c["dot"] for c in configs)
    assert len({tuple(c.items()) for c in configs}) == len(configs)
    for c in configs[part::PARTS]:
        got = lm_head_top2_triton(h.to(DEVICE), q.to(DEVICE), nw.to(DEVICE), 1e-5, **c, scale=scale.to(DEVICE))
        clear = (want.p1 - want.p2) >= 1e-3
        assert torch.equal(got.top1.cpu()[clear], want.top1[clear]), c
        torch.testing.assert_close(got.p1.cpu(), want.p1, rtol=0, atol=1e-5)
        torch.testing.assert_close(got.p2.cpu(), want.p2, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_the_kernel_compiles_for_an_h100(tmp_path):
    """Without a GPU: the kernel compiled for sm_90 by Triton's own ptxas (tests/sm90_compile.py, in a process
    without the interpreter), 16-bit and int8 heads, rows of 2048 and 576 features, one row and several: the fixed
    defaults a GPU falls back on and every configuration the autotuner may time (~90 compiles, ~20 s). A Triton
    construct that does not lower for Hopper fails here instead of on a lent GPU's clock; shared memory within the
    H100's 227 KB a block."""
    import json
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path / "triton"))
    proc = subprocess.run([sys.executable, str(Path(__file__).parent / "sm90_compile.py")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(rows) > 80 and {r["head"] for r in rows} == {"bf16", "int8"}
    assert {r["config"]["pipe"] for r in rows} == {r["config"]["dot"] for r in rows} == {False, True}
    assert [r for r in rows if "error" in r] == []
    assert all(0 <= r["shared"] <= 227 * 1024 for r in rows)
