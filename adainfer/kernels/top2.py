"""Last-token LM head reduced to its softmax top-2: h (B, d) -> (top1 id, p1, p2), never writing the logits.

This is the exit check of AdaInfer: after a block, the last token's hidden state goes through the final norm and
the LM head, and only the two largest probabilities matter (features gap = p1 - p2 and top_prob = p1).

Read top to bottom: the plain-torch reference (the CPU path and the test oracle), the launcher of the Triton
kernels (top2_triton.py beside it; stage 1: each program owns a slice of the vocabulary and keeps a running top-2 and
an online-softmax sum; stage 2 merges the partials of one row), and the dispatch.

Memory traffic of one check, V x d head in bytes-per-weight b: the reference reads V*d*b and writes then reads
back the V logits (4V bytes twice, fp32); the kernel reads V*d*b and writes 16 bytes per program. An int8 head
(`scale` given: int8 values and a float32 scale per row and group of 32 columns, w ~ scale * q, llama.cpp's Q8_0)
is read as 1.125 bytes a weight and widened in registers.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Top2(NamedTuple):
    top1: torch.Tensor  # (B,) int64, the smallest index among equal maxima
    p1: torch.Tensor  # (B,) float32, softmax probability of top1
    p2: torch.Tensor  # (B,) float32, the second largest probability (== p1 on a tie)


# ---------------------------------------------------------------- reference


def rms_norm_reference(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm as Hugging Face computes it: in float32, cast back, then scaled."""
    x = h.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(h.dtype)


def top2_from_logits(logits: torch.Tensor) -> Top2:
    """Softmax top-2 of (B, V) logits, computed in float32."""
    logits = logits.float()
    top1 = logits.argmax(-1)  # argmax returns the first maximal index; topk's order among ties is unspecified
    m1 = logits.gather(-1, top1[:, None])[:, 0]
    m2 = logits.scatter(-1, top1[:, None], float("-inf")).amax(-1)
    lse = torch.logsumexp(logits, -1)
    return Top2(top1, torch.exp(m1 - lse), torch.exp(m2 - lse))


GROUP = 32  # columns sharing one scale in an int8 head


def dequantize_head(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """An int8 matrix q (V, d) and its scales (V, d // group), one a row and group of columns (GROUP for the kernel)
    -> float32 weights (V, d). The plain-torch reference of the int8 format (adainfer.quant.dequantize_int8 is it)."""
    V, d = q.shape
    return (q.float().view(V, scale.shape[1], -1) * scale.float()[..., None]).view(V, d)


def lm_head_top2_reference(h: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor | None = None,
                           eps: float = 1e-5, scale: torch.Tensor | None = None) -> Top2:
    """h (B, d), weight (V, d), optional RMSNorm weight (d,) -> Top2. Writes the (B, V) logits. With `scale`, weight
    is an int8 head (dequantize_head), multiplied in float32."""
    if norm_weight is not None:
        h = rms_norm_reference(h, norm_weight, eps)
    if scale is not None:
        return top2_from_logits(h.float() @ dequantize_head(weight, scale).T)
    return top2_from_logits(h @ weight.T)


# ---------------------------------------------------------------- Triton


def lm_head_top2_triton(h: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor | None = None,
                        eps: float = 1e-5, block_v: int | None = None, block_d: int | None = None,
                        programs: int | None = None, num_warps: int | None = None,
                        num_stages: int | None = None, fused_merge: bool | None = None,
                        dot: bool | None = None, pipe: bool | None = None, scale: torch.Tensor | None = None) -> Top2:
    """The Triton version of lm_head_top2_reference: same signature, no (B, V) logits in memory. Block sizes not
    given come from `config` (on a GPU the fastest of CANDIDATES for this head shape and batch bucket, timed on the
    first call; the interpreter gets small ones). fused_merge: the last stage-1 program merges the rows (one
    launch; default FUSED_MERGE) instead of a second kernel. dot: rows through tensor cores in blocks of 16 (default:
    the configuration's, which is several rows; one row may take it too, padded: on short rows that beat the GEMV
    loop on an H100). pipe: the loops flattened and every load pipelined (default: the configuration's, off).
    scale: weight is an int8 head with these scales (V, d // GROUP), as lm_head_top2_reference takes it."""
    import triton  # on first use: importing this module never imports triton

    from adainfer.kernels.top2_triton import top2_merge, top2_partial

    assert h.dim() == 2 and weight.dim() == 2 and h.shape[1] == weight.shape[1], (h.shape, weight.shape)
    h = h.contiguous()
    weight = weight.contiguous()
    B, D = h.shape
    V = weight.shape[0]
    if scale is not None:
        assert weight.dtype == torch.int8 and scale.shape == (V, D // GROUP) and D % GROUP == 0, (weight.dtype,
                                                                                                scale.shape)
        scale = scale.float().contiguous()
    given = (block_v, block_d, programs, num_warps, num_stages)
    # None given: the tuned configuration; some: the fixed defaults for the rest; all: as given (the tuner's calls).
    cfg = config(h, weight, norm_weight, eps, scale) if all(v is None for v in given) else \
        _default_config(h.device, B, D, scale is not None) if None in given else {}
    block_v, block_d = block_v or cfg["block_v"], block_d or cfg["block_d"]
    num_warps, num_stages = num_warps or cfg["num_warps"], num_stages or cfg["num_stages"]
    n_tiles = triton.cdiv(V, block_v)
    programs = max(1, min(programs or cfg["programs"], n_tiles))  # (at most one tile each)
    tiles_per_prog = triton.cdiv(n_tiles, programs)
    # One row: a GEMV (or, where tuned so, a block padded to 16 rows). Several: blocks of 16 rows through tl.dot (its
    # smallest shape), the weights read once.
    dot = cfg.get("dot", B > 1) if dot is None else dot
    pipe = cfg.get("pipe", False) if pipe is None else pipe
    block_b = 16 if dot else 1
    if scale is not None:  # an int8 head: through tensor cores one group of columns a step, else whole groups
        block_d = GROUP if dot else block_d
        assert block_d % GROUP == 0, block_d
    interpret = not h.is_cuda
    # (an int8 head's integers enter tensor cores in the rows' dtype, where they are exact)
    wide = h.dtype if scale is not None else weight.dtype
    dot_dtype = tl_dtype(torch.float32 if interpret or wide == torch.float32 else wide)
    part = torch.empty(4, B * programs, device=h.device, dtype=torch.float32)
    i1 = torch.empty(B * programs, device=h.device, dtype=torch.int32)
    nw = norm_weight if norm_weight is not None else h  # any pointer; unused without HAS_NORM
    top1 = torch.empty(B, device=h.device, dtype=torch.int64)  # written as int64: no cast launch after
    p = torch.empty(2, B, device=h.device, dtype=torch.float32)
    count = _counter(h.device) if (FUSED_MERGE if fused_merge is None else fused_merge) else None
    block_p = triton.next_power_of_2(programs)
    top2_partial[(programs, triton.cdiv(B, block_b))](
        h, weight, nw, h if scale is None else scale,  # (h: any pointer, unused without HAS_SCALE)
        part[0], part[1], i1, part[3], i1 if count is None else count,  # (i1: unused without it)
        top1, p[0], p[1],
        B, V, D, h.stride(0), weight.stride(0), 0 if scale is None else scale.stride(0), eps, tiles_per_prog,
        HAS_NORM=norm_weight is not None, HAS_SCALE=scale is not None, GROUP=GROUP,
        BLOCK_B=block_b, BLOCK_V=block_v, BLOCK_D=block_d, DOT=dot, DOT_DTYPE=dot_dtype,
        FUSED_MERGE=count is not None, BLOCK_P=block_p, PIPE=pipe,
        LOOP_STAGES=num_stages if pipe else None, num_warps=num_warps, num_stages=num_stages,
    )
    if count is None:
        top2_merge[(B,)](part[0], part[1], i1, part[3], top1, p[0], p[1], programs, BLOCK_P=block_p)
    return Top2(top1, p[0], p[1])


# Off: correct on an H100, but slower than the two launches from Python on 5 of gpu_check run 3's 6 heads and batches
# (faster only where a launch dominates: 49152 x 576 at batch 1, 59 vs 102 us), and a graph replays both cheaply.
FUSED_MERGE = False
_counters: dict[torch.device, torch.Tensor] = {}


def _counter(device: torch.device) -> torch.Tensor | None:
    """The device's finished-programs counter of the fused merge (zero between launches: the merging program resets
    it). Made outside any CUDA-graph capture (inside one a zero fill would only be recorded, not run): None there
    until it exists, and the launch merges in a second kernel."""
    if device not in _counters:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        _counters[device] = torch.zeros(1, dtype=torch.int32, device=device)
    return _counters[device]


def tl_dtype(dtype: torch.dtype):
    """Triton's name for a float32 / bfloat16 / float16 torch dtype (the kernels' DOT_DTYPE)."""
    import triton.language as tl

    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


# ---------------------------------------------------------------- configurations

# Configurations a GPU's first call on a head shape and batch bucket times (AUTOTUNE), keeping the fastest, as
# (block_v, block_d, programs per SM, warps, stages): the best three of the sweep on an H100 for one row and for
# several (benchmarks/sweep_kernel_gpu.py, results/sweep_kernel_gpu_h100.json); for rows of d <= 1024 (the
# 49152 x 576 head, where the sweep's best reached 30-39% of copy bandwidth) wider vocabulary tiles in shorter steps
# (more work between the top-2 updates of a tile). Two more kinds, not yet timed on a GPU, for the heads whose reads
# fell furthest under the GEMV's (run 3: 69% of copy bandwidth on 49152 x 2048, 55% on 49152 x 576, 83% on
# 32000 x 4096; less the shorter the rows, as if a tile's top-2 and softmax update were not hidden behind reads):
# "grid", one tile a program (64 a SM is more than any head here has tiles; the launcher caps programs at the
# tiles), so the hardware balances the tail that 768 tiles over 528 programs leave; and "pipe", a few programs a SM
# each looping over many tiles with the loops flattened and pipelined (PIPE in the kernel; with TRY_PIPE).
CANDIDATES = {
    "one": [(64, 512, 4, 4, 4), (32, 512, 8, 4, 3), (64, 256, 4, 4, 4), (128, 128, 4, 8, 3)],
    "rows": [(64, 128, 8, 8, 3), (64, 128, 4, 8, 3), (128, 256, 8, 8, 4), (128, 128, 4, 4, 4)],
    "short": [(256, 64, 4, 8, 3), (256, 128, 2, 8, 3), (128, 64, 8, 4, 3), (512, 64, 2, 8, 3)],
    "grid_one": [(32, 512, 64, 4, 3), (64, 256, 64, 4, 4)],
    "grid_rows": [(32, 128, 64, 4, 3), (64, 128, 64, 8, 3)],
    "pipe_one": [(32, 512, 2, 4, 3), (64, 256, 3, 4, 3)],
    "pipe_rows": [(32, 128, 2, 4, 3), (64, 128, 3, 8, 3)],
}
AUTOTUNE = True  # False: the fixed defaults (_default_config) everywhere; float32 heads always take them
# The pipelined candidates (the flattened loops): tried since an H100 run showed them compile and win for one row
# (gpu_check run 5: 89.3 against 107.4 us on the 49152 x 2048 head, 1.05x the GEMV's time against 1.25x; 112.7 against
# 113.4 on 32000 x 4096). False: the tuning a user's first call does leaves them out.
TRY_PIPE = True
_tuned: dict[tuple, dict] = {}


def candidates(B: int, D: int, sms: int, pipe: bool | None = None, int8: bool = False) -> list[dict]:
    """The configurations the autotuner times for B rows of D features on a GPU of `sms` SMs (launcher arguments);
    the pipelined ones with pipe (default TRY_PIPE). int8: for an int8 head, whose tensor-core path takes one group
    of columns a step (block_d GROUP), each distinct configuration once."""
    kind = "one" if B == 1 else "rows"
    options = [(c, B > 1, False) for c in CANDIDATES[kind] + CANDIDATES[f"grid_{kind}"]]
    options += [(c, B > 1, True) for c in CANDIDATES[f"pipe_{kind}"] if (TRY_PIPE if pipe is None else pipe)]
    if D <= 1024:  # short rows: one row also through tensor cores (37 vs 57 us on the 49152 x 576 head, H100)
        options += [(c, dot, False) for c in CANDIDATES["short"] for dot in ((False, True) if B == 1 else (True,))]
    configs = [{"block_v": v, "block_d": GROUP if int8 and dot else d, "programs": per_sm * sms, "num_warps": w,
                "num_stages": s, "dot": dot, "pipe": pipe} for (v, d, per_sm, w, s), dot, pipe in options]
    return [c for i, c in enumerate(configs) if c not in configs[:i]]


def config(h: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor | None, eps: float,
           scale: torch.Tensor | None = None) -> dict:
    """Block sizes, programs, warps, stages and the dot / pipe flags for this call. On a GPU with AUTOTUNE, the
    fastest of the candidates for (device, head shape, dtypes, norm, batch bucket: 1, 2-16, 17+), each timed replayed
    from a CUDA graph (its kernels alone: a launch from Python costs more than the kernel on small heads), chosen on
    the first call and kept for the process; inside a CUDA-graph capture (nothing can be timed there) the fixed
    defaults until then. A candidate that does not compile or launch here (shared memory, registers), or whose answer
    on this call's rows does not agree with the fixed defaults' (`agreeing`), counts as infinitely slow; float32
    heads (tiles twice the size, not what the sweep measured) keep the defaults."""
    B, D = h.shape
    fixed = _default_config(h.device, B, D, scale is not None)
    if not AUTOTUNE or h.device.type != "cuda" or weight.dtype == torch.float32:
        return fixed
    key = (h.device, tuple(weight.shape), weight.dtype, h.dtype, norm_weight is not None, min(B, 2) + (B > 16))
    if key not in _tuned:
        if torch.cuda.is_current_stream_capturing():
            return fixed
        want = lm_head_top2_triton(h, weight, norm_weight, eps, **fixed, scale=scale)
        configs = candidates(B, D, torch.cuda.get_device_properties(h.device).multi_processor_count,
                             int8=scale is not None)

        def call(c: dict):
            if not agreeing(lm_head_top2_triton(h, weight, norm_weight, eps, **c, scale=scale), want):
                raise ValueError(f"configuration {c} disagrees with the defaults")
            return lambda: lm_head_top2_triton(h, weight, norm_weight, eps, **c, scale=scale)

        _tuned[key] = fastest(configs + [fixed], call, _graph_time)  # (the defaults: the fallback, should all fail)
    return _tuned[key]


def agreeing(got: Top2, want: Top2, tol: float = 1e-3) -> bool:
    """Whether two top-2 answers for the same rows agree: probabilities within tol, and the same top-1 wherever the
    top two are further apart than tol (closer, summation order may break the near-tie either way)."""
    clear = (want.p1 - want.p2) > tol
    return bool(torch.equal(got.top1[clear], want.top1[clear]) and (got.p1 - want.p1).abs().max() <= tol
                and (got.p2 - want.p2).abs().max() <= tol)


def fastest(configs: list[dict], call, timer, rounds: int = 2) -> dict:
    """The configuration whose call(config) (a function of no arguments) `timer` (seconds) finds fastest, each timed
    `rounds` times in turn and its best kept (a drift of the GPU's clocks meets every configuration alike); the first
    on a tie; one whose call or timing raises (a Triton compile or launch error, a wrong answer) never, unless all
    do: then the last."""
    fns = []
    for c in configs:
        try:
            fns.append(call(c))
        except Exception:  # noqa: BLE001 (out of shared memory, registers, a wrong answer: not this GPU's)
            fns.append(None)
    best = [float("inf")] * len(configs)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            if fn is None:
                continue
            try:
                best[i] = min(best[i], timer(fn))
            except Exception:  # noqa: BLE001
                fns[i], best[i] = None, float("inf")
    return configs[best.index(min(best))] if min(best) < float("inf") else configs[-1]


def _graph_time(fn, replays: int = 20) -> float:
    """Seconds of one fn() replayed from a CUDA graph of 10 calls (after a warm-up that compiles it)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(10):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / (10 * replays)


def _default_config(device: torch.device, B: int, D: int, int8: bool = False) -> dict:
    """Measured on an H100 (bf16, 32000 x 4096 head): one row, 64 x 512 tiles, 4 programs per SM, 4 warps, 4
    stages (80% of copy bandwidth); 2+ rows, 64 x 128 tiles, 8 per SM, 8 warps, 3 stages (80%). int8: an int8
    head's tensor-core path takes one group of columns a step."""
    if device.type != "cuda":  # the interpreter: small tiles, few programs
        return {"block_v": 64, "block_d": GROUP if int8 and B > 1 else 64, "programs": 8, "num_warps": 4,
                "num_stages": 1, "dot": B > 1, "pipe": False}
    return gpu_defaults(B, D, torch.cuda.get_device_properties(device).multi_processor_count, int8)


def gpu_defaults(B: int, D: int, sms: int, int8: bool = False) -> dict:
    """_default_config on a GPU of `sms` SMs."""
    if B == 1:
        return {"block_v": 64, "block_d": 512 if D >= 2048 else 256, "programs": 4 * sms, "num_warps": 4,
                "num_stages": 4, "dot": False, "pipe": False}
    return {"block_v": 64, "block_d": GROUP if int8 else 128, "programs": 8 * sms, "num_warps": 8, "num_stages": 3,
            "dot": True, "pipe": False}


# ---------------------------------------------------------------- dispatch

_triton_ok: bool | None = None


def triton_available() -> bool:
    global _triton_ok
    if _triton_ok is None:
        try:
            import triton  # noqa: F401

            _triton_ok = True
        except Exception:  # triton missing or broken: the reference serves
            _triton_ok = False
    return _triton_ok


def lm_head_top2(h: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor | None = None,
                 eps: float = 1e-5, scale: torch.Tensor | None = None) -> Top2:
    """Triton on a CUDA tensor when triton imports, else the torch reference (the CPU production path)."""
    if h.is_cuda and triton_available():
        return lm_head_top2_triton(h, weight, norm_weight, eps, scale=scale)
    return lm_head_top2_reference(h, weight, norm_weight, eps, scale=scale)
