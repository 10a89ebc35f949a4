"""Last-token LM head reduced to its softmax top-2: h (B, d) -> (top1 id, p1, p2), never writing the logits.

This is the exit check of AdaInfer: after a block, the last token's hidden state goes through the final norm and
the LM head, and only the two largest probabilities matter (features gap = p1 - p2 and top_prob = p1).

Read top to bottom: the plain-torch reference (the CPU path and the test oracle), the Triton kernel (stage 1:
each program owns a slice of the vocabulary and keeps a running top-2 and an online-softmax sum; stage 2 merges
the partials of one row), the launcher, and the dispatch.

Memory traffic of one check, V x d head in bytes-per-weight b: the reference reads V*d*b and writes then reads
back the V logits (4V bytes twice, fp32); the kernel reads V*d*b and writes 16 bytes per program.
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


def lm_head_top2_reference(h: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor | None = None,
                           eps: float = 1e-5) -> Top2:
    """h (B, d), weight (V, d), optional RMSNorm weight (d,) -> Top2. Writes the (B, V) logits."""
    if norm_weight is not None:
        h = rms_norm_reference(h, norm_weight, eps)
    return top2_from_logits(h @ weight.T)


# ---------------------------------------------------------------- Triton

_triton_kernels = None


def _build_triton():
    """Define the kernels on first use, so that importing this module never imports triton."""
    import triton
    import triton.language as tl

    @triton.jit
    def _top2_partial_kernel(
        h_ptr, w_ptr, nw_ptr, m1_ptr, m2_ptr, i1_ptr, s_ptr,
        B, V, D, stride_h, stride_w, eps, tiles_per_prog,
        HAS_NORM: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
        DOT: tl.constexpr, DOT_DTYPE: tl.constexpr,
    ):
        # One program owns tiles of BLOCK_V vocabulary rows (interleaved over programs, so tails are balanced) for a
        # block of BLOCK_B batch rows: each weight tile is read once for all of them.
        prog = tl.program_id(0)
        n_progs = tl.num_programs(0)
        b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
        b_mask = b < B
        d_offs = tl.arange(0, BLOCK_D)

        inv_rms = tl.full([BLOCK_B], 1.0, dtype=tl.float32)
        if HAS_NORM:
            sq = tl.zeros([BLOCK_B], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                d = d0 + d_offs
                x = tl.load(h_ptr + b[:, None] * stride_h + d[None, :], mask=b_mask[:, None] & (d < D)[None, :],
                            other=0.0).to(tl.float32)
                sq += tl.sum(x * x, axis=1)
            inv_rms = 1.0 / tl.sqrt(sq / D + eps)

        m1 = tl.full([BLOCK_B], -float("inf"), dtype=tl.float32)
        m2 = tl.full([BLOCK_B], -float("inf"), dtype=tl.float32)
        i1 = tl.zeros([BLOCK_B], dtype=tl.int32)
        s = tl.zeros([BLOCK_B], dtype=tl.float32)
        v_offs = tl.arange(0, BLOCK_V)
        for t in range(0, tiles_per_prog):
            v = (prog + t * n_progs) * BLOCK_V + v_offs
            v_mask = v < V
            acc = tl.zeros([BLOCK_B, BLOCK_V], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                d = d0 + d_offs
                d_mask = d < D
                x = tl.load(h_ptr + b[:, None] * stride_h + d[None, :], mask=b_mask[:, None] & d_mask[None, :],
                            other=0.0).to(tl.float32)  # (BLOCK_B, BLOCK_D)
                if HAS_NORM:
                    x = x * inv_rms[:, None] * tl.load(nw_ptr + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
                w = tl.load(w_ptr + v[:, None] * stride_w + d[None, :], mask=v_mask[:, None] & d_mask[None, :],
                            other=0.0)  # (BLOCK_V, BLOCK_D)
                if DOT:  # tensor cores: a block of rows against the tile, float32 accumulation
                    wt = tl.trans(w.to(DOT_DTYPE))
                    hi = x.to(DOT_DTYPE)
                    acc += tl.dot(hi, wt, input_precision="ieee")
                    if DOT_DTYPE != tl.float32:  # x = hi + lo in two half-precision parts: ~16 bits of x kept
                        acc += tl.dot((x - hi.to(tl.float32)).to(DOT_DTYPE), wt, input_precision="ieee")
                else:  # one row: a plain multiply-reduce (a GEMV has nothing for tensor cores)
                    acc += tl.sum(x[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
            logits = tl.where(v_mask[None, :], acc, -float("inf"))  # (BLOCK_B, BLOCK_V)
            t_max = tl.max(logits, axis=1)
            t_idx = tl.min(tl.where(logits == t_max[:, None], v[None, :], 2147483647), axis=1)
            t_second = tl.max(tl.where(v[None, :] == t_idx[:, None], -float("inf"), logits), axis=1)
            new_m1 = tl.maximum(m1, t_max)
            # Online softmax: rescale the running sum to the new maximum (exp(-inf) = 0 on the first tile).
            s = s * tl.exp(m1 - new_m1) + tl.sum(tl.where(v_mask[None, :], tl.exp(logits - new_m1[:, None]), 0.0),
                                                 axis=1)
            take = t_max > m1  # strict: on a tie the earlier (smaller) index stays top-1
            m2 = tl.where(take, tl.maximum(m1, t_second), tl.maximum(m2, t_max))
            i1 = tl.where(take, t_idx, i1)
            m1 = new_m1
        out = b * n_progs + prog
        tl.store(m1_ptr + out, m1, mask=b_mask)
        tl.store(m2_ptr + out, m2, mask=b_mask)
        tl.store(i1_ptr + out, i1, mask=b_mask)
        tl.store(s_ptr + out, s, mask=b_mask)

    @triton.jit
    def _top2_merge_kernel(m1_ptr, m2_ptr, i1_ptr, s_ptr, top1_ptr, p1_ptr, p2_ptr, P, BLOCK_P: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK_P)
        mask = offs < P
        m1 = tl.load(m1_ptr + row * P + offs, mask=mask, other=-float("inf"))
        m2 = tl.load(m2_ptr + row * P + offs, mask=mask, other=-float("inf"))
        i1 = tl.load(i1_ptr + row * P + offs, mask=mask, other=2147483647)
        s = tl.load(s_ptr + row * P + offs, mask=mask, other=0.0)
        big = tl.max(m1, axis=0)
        best = tl.min(tl.where(m1 == big, i1, 2147483647), axis=0)  # smallest vocabulary index among ties
        # The second largest logit: the best of the other programs' maxima and the winner's own second.
        second = tl.maximum(tl.max(tl.where(i1 == best, -float("inf"), m1), axis=0),
                            tl.max(tl.where(i1 == best, m2, -float("inf")), axis=0))
        total = tl.sum(tl.where(mask, s * tl.exp(m1 - big), 0.0), axis=0)
        p1 = 1.0 / total
        tl.store(top1_ptr + row, best)
        tl.store(p1_ptr + row, p1)
        tl.store(p2_ptr + row, p1 * tl.exp(second - big))

    return triton, _top2_partial_kernel, _top2_merge_kernel


def lm_head_top2_triton(h: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor | None = None,
                        eps: float = 1e-5, block_v: int | None = None, block_d: int | None = None,
                        programs: int | None = None, num_warps: int | None = None,
                        num_stages: int | None = None) -> Top2:
    """The Triton version of lm_head_top2_reference: same signature, no (B, V) logits in memory. Block sizes
    default to the best of a sweep on an H100 (benchmarks/sweep_kernel_gpu.py); the interpreter gets small ones."""
    global _triton_kernels
    if _triton_kernels is None:
        _triton_kernels = _build_triton()
    triton, partial_kernel, merge_kernel = _triton_kernels
    assert h.dim() == 2 and weight.dim() == 2 and h.shape[1] == weight.shape[1], (h.shape, weight.shape)
    h = h.contiguous()
    weight = weight.contiguous()
    B, D = h.shape
    V = weight.shape[0]
    cfg = _default_config(h.device, B, D)
    block_v, block_d = block_v or cfg["block_v"], block_d or cfg["block_d"]
    num_warps, num_stages = num_warps or cfg["num_warps"], num_stages or cfg["num_stages"]
    n_tiles = triton.cdiv(V, block_v)
    programs = max(1, min(programs or cfg["programs"], n_tiles))
    tiles_per_prog = triton.cdiv(n_tiles, programs)
    # One row: a GEMV. Several: blocks of 16 rows through tl.dot (its smallest shape), the weights read once.
    dot = B > 1
    block_b = 16 if dot else 1
    interpret = not h.is_cuda
    dot_dtype = _tl_dtype(torch.float32 if interpret or weight.dtype == torch.float32 else weight.dtype)
    part = torch.empty(4, B * programs, device=h.device, dtype=torch.float32)
    i1 = torch.empty(B * programs, device=h.device, dtype=torch.int32)
    nw = norm_weight if norm_weight is not None else h  # any pointer; unused without HAS_NORM
    partial_kernel[(programs, triton.cdiv(B, block_b))](
        h, weight, nw, part[0], part[1], i1, part[3], B, V, D, h.stride(0), weight.stride(0), eps, tiles_per_prog,
        HAS_NORM=norm_weight is not None, BLOCK_B=block_b, BLOCK_V=block_v, BLOCK_D=block_d, DOT=dot,
        DOT_DTYPE=dot_dtype, num_warps=num_warps, num_stages=num_stages,
    )
    top1 = torch.empty(B, device=h.device, dtype=torch.int32)
    p = torch.empty(2, B, device=h.device, dtype=torch.float32)
    merge_kernel[(B,)](part[0], part[1], i1, part[3], top1, p[0], p[1], programs,
                       BLOCK_P=triton.next_power_of_2(programs))
    return Top2(top1.long(), p[0], p[1])


def _tl_dtype(dtype: torch.dtype):
    import triton.language as tl

    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


def _default_config(device: torch.device, B: int, D: int) -> dict:
    """Measured on an H100 (bf16, 32000 x 4096 head): one row, 64 x 512 tiles, 4 programs per SM, 4 warps, 4
    stages (80% of copy bandwidth); 2+ rows, 64 x 128 tiles, 8 per SM, 8 warps, 3 stages (80%)."""
    if device.type != "cuda":  # the interpreter: small tiles, few programs
        return {"block_v": 64, "block_d": 64, "programs": 8, "num_warps": 4, "num_stages": 1}
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    if B == 1:
        return {"block_v": 64, "block_d": 512 if D >= 2048 else 256, "programs": 4 * sms, "num_warps": 4,
                "num_stages": 4}
    return {"block_v": 64, "block_d": 128, "programs": 8 * sms, "num_warps": 8, "num_stages": 3}


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
                 eps: float = 1e-5) -> Top2:
    """Triton on a CUDA tensor when triton imports, else the torch reference (the CPU production path)."""
    if h.is_cuda and triton_available():
        return lm_head_top2_triton(h, weight, norm_weight, eps)
    return lm_head_top2_reference(h, weight, norm_weight, eps)
