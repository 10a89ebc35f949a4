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
        V, D, stride_h, stride_w, eps, tiles_per_prog,
        HAS_NORM: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        row = tl.program_id(0)  # rows vary fastest, so programs that share a weight slice run together
        prog = tl.program_id(1)
        n_progs = tl.num_programs(1)
        d_offs = tl.arange(0, BLOCK_D)

        inv_rms = 1.0
        if HAS_NORM:
            sq = tl.zeros([BLOCK_D], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                x = tl.load(h_ptr + row * stride_h + d0 + d_offs, mask=d0 + d_offs < D, other=0.0).to(tl.float32)
                sq += x * x
            inv_rms = 1.0 / tl.sqrt(tl.sum(sq, axis=0) / D + eps)

        m1 = -float("inf")
        m2 = -float("inf")
        i1 = 0
        s = 0.0
        v_offs = tl.arange(0, BLOCK_V)
        for t in range(0, tiles_per_prog):
            v = (prog + t * n_progs) * BLOCK_V + v_offs  # tiles interleaved over programs: balanced tails
            v_mask = v < V
            acc = tl.zeros([BLOCK_V], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                d = d0 + d_offs
                d_mask = d < D
                x = tl.load(h_ptr + row * stride_h + d, mask=d_mask, other=0.0).to(tl.float32)
                if HAS_NORM:
                    x = x * inv_rms * tl.load(nw_ptr + d, mask=d_mask, other=0.0).to(tl.float32)
                w = tl.load(w_ptr + v[:, None] * stride_w + d[None, :], mask=v_mask[:, None] & d_mask[None, :],
                            other=0.0).to(tl.float32)
                acc += tl.sum(w * x[None, :], axis=1)
            logits = tl.where(v_mask, acc, -float("inf"))
            t_max = tl.max(logits, axis=0)
            t_idx = tl.min(tl.where(logits == t_max, v, 2147483647), axis=0)
            t_second = tl.max(tl.where(v == t_idx, -float("inf"), logits), axis=0)
            new_m1 = tl.maximum(m1, t_max)
            # Online softmax: rescale the running sum to the new maximum (exp(-inf) = 0 on the first tile).
            s = s * tl.exp(m1 - new_m1) + tl.sum(tl.where(v_mask, tl.exp(logits - new_m1), 0.0), axis=0)
            take = t_max > m1  # strict: on a tie the earlier (smaller) index stays top-1
            m2 = tl.where(take, tl.maximum(m1, t_second), tl.maximum(m2, t_max))
            i1 = tl.where(take, t_idx, i1)
            m1 = new_m1
        out = row * n_progs + prog
        tl.store(m1_ptr + out, m1)
        tl.store(m2_ptr + out, m2)
        tl.store(i1_ptr + out, i1)
        tl.store(s_ptr + out, s)

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
                        eps: float = 1e-5, block_v: int = 64, block_d: int = 128, programs: int | None = None) -> Top2:
    """The Triton version of lm_head_top2_reference: same signature, no (B, V) logits in memory."""
    global _triton_kernels
    if _triton_kernels is None:
        _triton_kernels = _build_triton()
    triton, partial_kernel, merge_kernel = _triton_kernels
    assert h.dim() == 2 and weight.dim() == 2 and h.shape[1] == weight.shape[1], (h.shape, weight.shape)
    h = h.contiguous()
    weight = weight.contiguous()
    B, D = h.shape
    V = weight.shape[0]
    n_tiles = triton.cdiv(V, block_v)
    if programs is None:
        programs = _default_programs(h.device, n_tiles, B)
    programs = max(1, min(programs, n_tiles))
    tiles_per_prog = triton.cdiv(n_tiles, programs)
    part = torch.empty(4, B * programs, device=h.device, dtype=torch.float32)
    i1 = torch.empty(B * programs, device=h.device, dtype=torch.int32)
    nw = norm_weight if norm_weight is not None else h  # any pointer; unused without HAS_NORM
    partial_kernel[(B, programs)](
        h, weight, nw, part[0], part[1], i1, part[3], V, D, h.stride(0), weight.stride(0), eps, tiles_per_prog,
        HAS_NORM=norm_weight is not None, BLOCK_V=block_v, BLOCK_D=block_d,
    )
    top1 = torch.empty(B, device=h.device, dtype=torch.int32)
    p = torch.empty(2, B, device=h.device, dtype=torch.float32)
    merge_kernel[(B,)](part[0], part[1], i1, part[3], top1, p[0], p[1], programs,
                       BLOCK_P=triton.next_power_of_2(programs))
    return Top2(top1.long(), p[0], p[1])


def _default_programs(device: torch.device, n_tiles: int, batch: int) -> int:
    """Enough programs to cover every SM a few times over; the interpreter wants few."""
    if device.type != "cuda":
        return min(n_tiles, 8)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return min(n_tiles, max(1, 4 * sms // max(batch, 1)))


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
