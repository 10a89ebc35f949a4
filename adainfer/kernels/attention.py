"""A decode step's attention: one new query a row, q (B, H, 1, hd), over a KV cache k, v (B, Hkv, S, hd), the slots a
row may read marked in valid (B, S); grouped-query heads (H a multiple of Hkv).

Read top to bottom: the plain-torch reference (the test oracle), the launcher of the Triton kernels
(attention_triton.py beside it: one program a row and kv head, its query heads through tensor cores in a block of
16, the slots in tiles with an online softmax; a long cache with few rows split over several programs, then combined),
and the same launch as an opaque torch.library op (`decode_attention`) that torch.compile keeps as one call inside
a compiled block. A decode step on a GPU calls it with DecodeGraph(attention="triton") instead of SDPA with a
boolean mask: not the default, not yet timed on a GPU.
"""

from __future__ import annotations

import torch


def decode_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor,
                               scale: float | None = None) -> torch.Tensor:
    """q (B, H, 1, hd), k, v (B, Hkv, S, hd), valid (B, S) bool -> (B, H, 1, hd) in q's dtype, in float32 inside:
    query head h reads kv head h // (H // Hkv)."""
    B, H, _, hd = q.shape
    Hkv = k.shape[1]
    qg = q.float().reshape(B, Hkv, H // Hkv, hd)  # (B, Hkv, g, hd)
    scores = torch.einsum("bkgd,bksd->bkgs", qg, k.float()) * (hd ** -0.5 if scale is None else scale)
    p = scores.masked_fill(~valid[:, None, None, :], float("-inf")).softmax(-1)  # (B, Hkv, g, S)
    return torch.einsum("bkgs,bksd->bkgd", p, v.float()).reshape(B, H, 1, hd).to(q.dtype)


def block_slots(hd: int) -> int:
    """Slots a step for heads of hd features: 64, or 32 past 128 features (a float32 tile pair of 256-wide heads
    takes ~150 KB of shared memory at 64, over what GPUs before the H100 / A100 have)."""
    return 64 if hd <= 128 else 32


SPLIT_PROGRAMS = 128  # a cache is split until about this many programs run (an H100 has 132 SMs)
SPLIT_MIN_TILES = 4  # ... each over at least this many tiles of slots: a short cache runs in one pass


def cache_splits(B: int, Hkv: int, S: int, block_s: int) -> int:
    """Programs a row and kv head's S slots are split over (flash-decoding): 1 (one pass, no combine) unless the
    B * Hkv programs are few and the cache long; then enough for about SPLIT_PROGRAMS, each over SPLIT_MIN_TILES
    tiles or more. A decode graph's S is its cache's capacity, so one graph always launches the same split."""
    tiles = -(-S // block_s)
    return max(1, min(-(-SPLIT_PROGRAMS // (B * Hkv)), tiles // SPLIT_MIN_TILES))


def decode_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor,
                            scale: float | None = None, block_s: int | None = None, num_warps: int = 4,
                            num_stages: int = 2, splits: int | None = None) -> torch.Tensor:
    """The Triton version of decode_attention_reference, same arguments (q, k, v may be strided views with their
    last dimension contiguous, valid any (B, S) view). block_s: slots a step (default: block_slots); splits:
    programs each row and kv head's slots are split over (default: cache_splits), their partial softmaxes then
    combined by a second kernel."""
    import triton  # on first use: importing this module never imports triton

    from adainfer.kernels.attention_triton import decode_attention_combine, decode_attention_kernel
    from adainfer.kernels.top2 import tl_dtype

    B, H, T, hd = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    assert T == 1 and H % Hkv == 0 and k.shape == v.shape == (B, Hkv, S, hd) and valid.shape == (B, S), (
        q.shape, k.shape, v.shape, valid.shape)
    assert q.stride(-1) == k.stride(-1) == v.stride(-1) == 1 and valid.stride(-1) == 1
    out = torch.empty(B, H, 1, hd, dtype=q.dtype, device=q.device)
    G = H // Hkv
    block_s = max(16, block_s or block_slots(hd))
    block_g, block_d = max(16, triton.next_power_of_2(G)), max(16, triton.next_power_of_2(hd))
    splits = cache_splits(B, Hkv, S, block_s) if splits is None else splits
    tiles = -(-S // block_s)
    chunk = -(-tiles // splits) * block_s  # slots a split: whole tiles
    splits = -(-S // chunk)  # (none left empty)
    # the splits' partial results, padded blocks (float32); one element each when unsplit (not written)
    part_acc = torch.empty(B * Hkv * splits * block_g * block_d if splits > 1 else 1, dtype=torch.float32,
                           device=q.device)
    part_ml = torch.empty(B * Hkv * splits * 2 * block_g if splits > 1 else 1, dtype=torch.float32, device=q.device)
    # (CPU tensors: Triton's interpreter, whose 16-bit tl.dot is not exact: float32 there, as kernels.top2 does)
    dot_dtype = tl_dtype(q.dtype if q.is_cuda else torch.float32)
    decode_attention_kernel[(B * Hkv, splits)](
        q, k, v, valid, out, part_acc, part_ml, S, Hkv, hd ** -0.5 if scale is None else scale, chunk,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        valid.stride(0), out.stride(0), out.stride(1),
        G=G, HD=hd, BLOCK_G=block_g, BLOCK_S=block_s, BLOCK_D=block_d, DOT_DTYPE=dot_dtype, SPLIT=splits > 1,
        num_warps=num_warps, num_stages=num_stages)
    if splits > 1:
        decode_attention_combine[(B * Hkv,)](part_acc, part_ml, out, splits, Hkv, out.stride(0), out.stride(1),
                                             G=G, HD=hd, BLOCK_G=block_g, BLOCK_D=block_d, num_warps=num_warps)
    return out


@torch.library.custom_op("adainfer::decode_attention", mutates_args=())
def decode_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor,
                        scale: float) -> torch.Tensor:
    """decode_attention_triton as the opaque torch.library op adainfer::decode_attention: torch.compile keeps it as
    one call inside a compiled block (its shape from the fake below) instead of tracing into the launcher."""
    return decode_attention_triton(q, k, v, valid, scale)


@decode_attention_op.register_fake
def _(q, k, v, valid, scale):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)  # (contiguous, as the launcher's)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor,
                     scale: float | None = None) -> torch.Tensor:
    """decode_attention_triton through its op (what a decode step on a GPU calls with attention="triton")."""
    return decode_attention_op(q, k, v, valid, q.shape[-1] ** -0.5 if scale is None else scale)
