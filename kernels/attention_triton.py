"""The Triton kernel of kernels/attention.py: one new query a row over a KV cache (a decode step's attention)."""

import triton
import triton.language as tl


@triton.jit
def decode_attention_kernel(q_ptr, k_ptr, v_ptr, valid_ptr, out_ptr, S, Hkv, scale,
                            stride_qb, stride_qh, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
                            stride_mb, stride_ob, stride_oh,
                            G: tl.constexpr, HD: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr,
                            BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """Program (b, kv head): the G query heads that read this kv head (padded to BLOCK_G rows, tl.dot's smallest is
    16) over the S slots in tiles of BLOCK_S, with an online softmax (running max m, sum total, output acc), slots where
    valid is False left out. Scores and the softmax in float32; the products' operands in DOT_DTYPE (the model's
    dtype on a GPU, the probabilities cast to it as flash attention does; float32 without TF32 rounding for float32
    models and in Triton's interpreter, whose 16-bit tl.dot is not exact)."""
    pid = tl.program_id(0)
    b = pid // Hkv
    kh = pid % Hkv
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    gd = (g[:, None] < G) & (d[None, :] < HD)
    heads = kh * G + g
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=gd, other=0.0).to(DOT_DTYPE)
    m = tl.full([BLOCK_G], -1e30, tl.float32)  # finite: a tile with no valid slot leaves everything as it was
    total = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        ok = tl.load(valid_ptr + b * stride_mb + s, mask=s < S, other=0) != 0
        sd = ok[:, None] & (d[None, :] < HD)  # (slots not valid are not read: whatever they hold, NaN included)
        k = tl.load(k_ptr + b * stride_kb + kh * stride_kh + s[:, None] * stride_ks + d[None, :], mask=sd,
                    other=0.0).to(DOT_DTYPE)
        scores = tl.dot(q, tl.trans(k), input_precision="ieee")  # (ieee: no TF32 for float32; 16-bit: exact anyway)
        scores = tl.where(ok[None, :], scores * scale, float("-inf"))  # (BLOCK_G, BLOCK_S)
        m_new = tl.maximum(m, tl.max(scores, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])
        total = total * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + b * stride_vb + kh * stride_vh + s[:, None] * stride_vs + d[None, :], mask=sd,
                    other=0.0).to(DOT_DTYPE)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v, input_precision="ieee")
        m = m_new
    out = acc / total[:, None]
    tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=gd)
