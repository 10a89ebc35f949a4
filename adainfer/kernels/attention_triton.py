"""The Triton kernels of attention.py beside it: one new query a row over a KV cache (a decode step's attention), in
one pass, or split along the cache (flash-decoding: a long cache's slots in several programs) and then combined."""

import triton
import triton.language as tl


@triton.jit
def decode_attention_kernel(q_ptr, k_ptr, v_ptr, valid_ptr, out_ptr, part_acc_ptr, part_ml_ptr, S, Hkv, scale, chunk,
                            stride_qb, stride_qh, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
                            stride_mb, stride_ob, stride_oh,
                            G: tl.constexpr, HD: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr,
                            BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr, SPLIT: tl.constexpr):
    """Program (b, kv head; split): the G query heads that read this kv head (padded to BLOCK_G rows, tl.dot's
    smallest is 16) over slots [split * chunk, split * chunk + chunk) of the S (all of them unless SPLIT) in tiles of
    BLOCK_S, with an online softmax (running max m, sum total, output acc), slots where valid is False left out.
    Scores and the softmax in float32; the products' operands in DOT_DTYPE (the model's dtype on a GPU, the
    probabilities cast to it as flash attention does; float32 without TF32 rounding for float32 models and in Triton's
    interpreter, whose 16-bit tl.dot is not exact). Unsplit it writes the output; split, its m, total and
    unnormalised acc for decode_attention_combine (padded blocks: (B * Hkv, splits, BLOCK_G, BLOCK_D) and
    (B * Hkv, splits, 2, BLOCK_G), float32)."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
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
    start = split * chunk
    for s0 in range(start, tl.minimum(start + chunk, S), BLOCK_S):
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
    if SPLIT:
        part = pid * tl.num_programs(1) + split
        tl.store(part_acc_ptr + (part * BLOCK_G + g[:, None]) * BLOCK_D + d[None, :], acc)
        tl.store(part_ml_ptr + part * 2 * BLOCK_G + g, m)
        tl.store(part_ml_ptr + (part * 2 + 1) * BLOCK_G + g, total)
    else:
        out = acc / total[:, None]
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=gd)


@triton.jit
def decode_attention_combine(part_acc_ptr, part_ml_ptr, out_ptr, splits, Hkv, stride_ob, stride_oh,
                             G: tl.constexpr, HD: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (b, kv head): its splits' partial softmaxes merged in order (each rescaled to the running max; a split
    with no valid slot, m = -1e30 and nothing summed, adds nothing), normalised, written as the output."""
    pid = tl.program_id(0)
    b = pid // Hkv
    kh = pid % Hkv
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    m = tl.full([BLOCK_G], -1e30, tl.float32)
    total = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for i in range(0, splits):
        part = pid * splits + i
        m_i = tl.load(part_ml_ptr + part * 2 * BLOCK_G + g)
        total_i = tl.load(part_ml_ptr + (part * 2 + 1) * BLOCK_G + g)
        acc_i = tl.load(part_acc_ptr + (part * BLOCK_G + g[:, None]) * BLOCK_D + d[None, :])
        m_new = tl.maximum(m, m_i)
        alpha, beta = tl.exp(m - m_new), tl.exp(m_i - m_new)
        total = total * alpha + total_i * beta
        acc = acc * alpha[:, None] + acc_i * beta[:, None]
        m = m_new
    out = acc / total[:, None]
    heads = kh * G + g
    tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=(g[:, None] < G) & (d[None, :] < HD))
