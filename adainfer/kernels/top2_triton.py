"""The Triton kernels of kernels.top2 (imported on first use: importing kernels.top2 never imports triton).

Stage 1 (`top2_partial`): each program owns tiles of the vocabulary for a block of batch rows and keeps a running
top-2 and an online-softmax sum per row. Stage 2 (`merge_row`): one row's result from its programs' partials, either
as a second launch (`top2_merge`, one program a row) or, with FUSED_MERGE, by whichever stage-1 program finishes last.
"""

import triton
import triton.language as tl


@triton.jit
def top2_partial(
    h_ptr, w_ptr, nw_ptr, ws_ptr, m1_ptr, m2_ptr, i1_ptr, s_ptr, count_ptr, top1_ptr, p1_ptr, p2_ptr,
    B, V, D, stride_h, stride_w, stride_ws, eps, tiles_per_prog,
    HAS_NORM: tl.constexpr, HAS_SCALE: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT: tl.constexpr, DOT_DTYPE: tl.constexpr, FUSED_MERGE: tl.constexpr, BLOCK_P: tl.constexpr,
    PIPE: tl.constexpr, LOOP_STAGES: tl.constexpr,
):
    # One program owns tiles of BLOCK_V vocabulary rows (interleaved over programs, so tails are balanced) for a
    # block of BLOCK_B batch rows: each weight tile is read once for all of them. PIPE: the tile and feature loops
    # flattened into one, its loads pipelined LOOP_STAGES deep (the launch's num_stages pipelines only loads that
    # feed a tl.dot), so the next tile's reads overlap a tile's top-2 and softmax update; otherwise plain loops.
    # HAS_SCALE: the head is int8 with a float32 scale per row and GROUP columns (quantize_int8's Q8_0 layout): about
    # half a 16-bit head's bytes read, each product summed over its group before the group's scale multiplies it.
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
    for t in tl.range(0, tiles_per_prog, flatten=PIPE):
        v = (prog + t * n_progs) * BLOCK_V + v_offs
        v_mask = v < V
        acc = tl.zeros([BLOCK_B, BLOCK_V], dtype=tl.float32)
        for d0 in tl.range(0, D, BLOCK_D, num_stages=LOOP_STAGES):
            d = d0 + d_offs
            d_mask = d < D
            x = tl.load(h_ptr + b[:, None] * stride_h + d[None, :], mask=b_mask[:, None] & d_mask[None, :],
                        other=0.0).to(tl.float32)  # (BLOCK_B, BLOCK_D)
            if HAS_NORM:
                x = x * inv_rms[:, None] * tl.load(nw_ptr + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
            w = tl.load(w_ptr + v[:, None] * stride_w + d[None, :], mask=v_mask[:, None] & d_mask[None, :],
                        other=0.0)  # (BLOCK_V, BLOCK_D)
            if DOT:  # tensor cores: a block of rows against the tile, float32 accumulation
                # (an int8 tile: one group of columns a step; its integers are exact in DOT_DTYPE and each row's
                # scale of the group multiplies the product)
                if HAS_SCALE:
                    tl.static_assert(BLOCK_D == GROUP)
                wt = tl.trans(w.to(DOT_DTYPE))
                hi = x.to(DOT_DTYPE)
                part = tl.dot(hi, wt, input_precision="ieee")
                if DOT_DTYPE != tl.float32:  # x = hi + lo in two half-precision parts: ~16 bits of x kept
                    part += tl.dot((x - hi.to(tl.float32)).to(DOT_DTYPE), wt, input_precision="ieee")
                if HAS_SCALE:
                    part *= tl.load(ws_ptr + v * stride_ws + d0 // GROUP, mask=v_mask, other=0.0)[None, :]
                acc += part
            elif HAS_SCALE:  # one row of an int8 head: products summed within each group of GROUP columns, then
                # scaled (one scale a row and group: BLOCK_D a multiple of GROUP)
                g = d0 // GROUP + tl.arange(0, BLOCK_D // GROUP)
                ws = tl.load(ws_ptr + v[:, None] * stride_ws + g[None, :],
                             mask=v_mask[:, None] & (g * GROUP < D)[None, :], other=0.0)  # (BLOCK_V, BLOCK_D / GROUP)
                xg = tl.reshape(x, (BLOCK_B, 1, BLOCK_D // GROUP, GROUP))
                wg = tl.reshape(w.to(tl.float32), (1, BLOCK_V, BLOCK_D // GROUP, GROUP))
                acc += tl.sum(tl.sum(xg * wg, axis=3) * ws[None, :, :], axis=2)
            else:  # one row, by default: a plain multiply-reduce (on long rows a GEMV gains nothing from tensor cores)
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
    if FUSED_MERGE:
        # The last program to finish merges every row (one launch instead of two): the barrier has all of this
        # program's stores issued, the counter's release/acquire orders everyone's stores before the merge's loads.
        tl.debug_barrier()
        done = tl.atomic_add(count_ptr, 1, sem="acq_rel")
        if done == n_progs * tl.num_programs(1) - 1:
            for row in range(0, B):
                merge_row(m1_ptr, m2_ptr, i1_ptr, s_ptr, top1_ptr, p1_ptr, p2_ptr, n_progs, row, BLOCK_P)
            tl.atomic_xchg(count_ptr, 0, sem="relaxed")  # ready for the next launch (a CUDA graph's next replay)


@triton.jit
def top2_merge(m1_ptr, m2_ptr, i1_ptr, s_ptr, top1_ptr, p1_ptr, p2_ptr, P, BLOCK_P: tl.constexpr):
    merge_row(m1_ptr, m2_ptr, i1_ptr, s_ptr, top1_ptr, p1_ptr, p2_ptr, P, tl.program_id(0), BLOCK_P)


@triton.jit
def merge_row(m1_ptr, m2_ptr, i1_ptr, s_ptr, top1_ptr, p1_ptr, p2_ptr, P, row, BLOCK_P: tl.constexpr):
    """One row's top-2 and probabilities from its P programs' partials."""
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
    tl.store(top1_ptr + row, best.to(tl.int64))
    tl.store(p1_ptr + row, p1)
    tl.store(p2_ptr + row, p1 * tl.exp(second - big))
