"""Decoders of the Llama family (Llama, Qwen2, Qwen3, Mistral, Gemma 3) and OPT with one explicit block loop, where
exit, skip and layer-plan decisions live. The families differ only in small named pieces that their config switches
on (adainfer.config): q/k/v biases, per-head q/k norms, Gemma's (1 + w) RMSNorm, the gated MLP's activation, sandwich
norms, the attention scale, sliding-window layers with their own rotary base, and final logit soft-capping.

Read top to bottom: the linear layer, norms and rotary helpers, attention, MLPs, the block, the per-forward context,
then `Decoder.forward` and its loop. The KV cache is adainfer.kv_cache; weights come from `adainfer.loading`. The
same modules serve every path: the eager loop, and the compiled decode step of adainfer.fast_decode
(`Context.quantized` there switches a quantized model's products to the int4 / int8 kernels).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from adainfer.config import ModelConfig
from adainfer.errors import AdainferError
from adainfer.exit import CheckGraphs, Exits, Output, Plan, probe
from adainfer.kernels.attention import decode_attention
from adainfer.kv_cache import KVCache
from adainfer.quant import QuantWeight, head_logits, linear, load_q4q8_kernel, quantize_int8, upcasts


class Linear(nn.Linear):
    """nn.Linear through quant.linear; once adainfer.fast_decode.quantize_model set `q4`, a quantized forward
    (a compiled decode step) reads the int4 copy through the kernel instead."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__(in_features, out_features, bias=bias)
        self.q4: QuantWeight | None = None
        self.reduce = None  # tensor parallel (adainfer.parallel.Shard): a row-parallel layer's partial sums add up
        self.parts: tuple[int, ...] | None = None  # a fused matrix: the rows of the file's tensors (loading.FUSED)

    def forward(self, x: torch.Tensor, quantized: bool = False) -> torch.Tensor:
        if quantized and self.q4 is not None:
            y = self.q4(x).to(x.dtype)
            return y if self.bias is None else y + self.bias
        if self.reduce is not None:  # each rank holds some input columns; the bias is added once, after the sum
            y = self.reduce.all_reduce(linear(x, self.weight))
            return y if self.bias is None else y + self.bias
        return linear(x, self.weight, self.bias)


# ---------------------------------------------------------------- norms and rotary embeddings


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, unit_offset: bool = False):
        super().__init__()
        self.eps, self.unit_offset = eps, unit_offset
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # As Hugging Face: normalise in float32; Llama casts back, then scales; Gemma scales by (1 + w) in float32,
        # then casts back (parity depends on the order).
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:
            return (y * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * y.to(x.dtype)


def make_norm(config: ModelConfig, dim: int) -> nn.Module:
    if config.rotary:
        return RMSNorm(dim, config.norm_eps, config.norm_unit_offset)
    return nn.LayerNorm(dim, eps=config.norm_eps)


def rope_inv_freq(config: ModelConfig, local: bool = False) -> torch.Tensor:
    """Rotary inverse frequencies (head_dim // 2,), float32, with the Llama-3 (or linear) scaling rule applied;
    local=True: the sliding layers' own base, unscaled (Gemma 3's rope_local_base_freq)."""
    hd = config.head_dim
    theta = config.rope_local_theta if local else config.rope_theta
    inv_freq = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    scaling = None if local else config.rope_scaling
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return inv_freq / scaling["factor"]
    # Llama 3.1: keep high frequencies, divide low ones by `factor`, interpolate smoothly in between.
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """positions (B, T) -> cos, sin (B, 1, T, head_dim) in `dtype`, computed in float32 as Hugging Face does."""
    freqs = positions[..., None].float() * inv_freq  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, hd), the rotate-half layout of Hugging Face Llama (the converter undoes GGUF's interleave)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


# ---------------------------------------------------------------- attention, MLPs, block


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        opt = config.arch == "opt"
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.q_size = config.n_heads * config.head_dim
        self.kv_size = config.n_kv_heads * config.head_dim
        self.wqkv = Linear(config.dim, self.q_size + 2 * self.kv_size, bias=opt or config.qkv_bias)  # q, k, v fused
        self.wqkv.parts = (self.q_size, self.kv_size, self.kv_size)
        self.wo = Linear(self.q_size, config.dim, bias=opt or config.o_bias)
        self.rotary = config.rotary
        # Qwen3 / Gemma 3: each head of q and k normalised before rotary.
        self.q_norm = make_norm(config, config.head_dim) if config.qk_norm else None
        self.k_norm = make_norm(config, config.head_dim) if config.qk_norm else None
        self.scale = config.attn_scale  # None: SDPA's head_dim ** -0.5
        self.sliding = config.sliding(layer)  # attends through ctx.local_mask
        self.local_rope = self.sliding and config.rope_local_theta is not None  # rotates by ctx.cos_local

    def project_kv(self, x: torch.Tensor, ctx: Context) -> tuple[torch.Tensor, torch.Tensor]:
        """Only the K/V rows of wqkv: x (b, T, dim) -> k, v (b, Hkv, T, hd), normalised and rotated."""
        rows = slice(self.q_size, None)
        bias = None if self.wqkv.bias is None else self.wqkv.bias[rows]
        k, v = linear(x, self.wqkv.weight[rows], bias).split([self.kv_size, self.kv_size], dim=-1)
        return self.rotate(self.norm_heads(heads(k, self.n_kv_heads), self.k_norm), ctx), heads(v, self.n_kv_heads)

    @staticmethod
    def norm_heads(x: torch.Tensor, norm: nn.Module | None) -> torch.Tensor:
        return x if norm is None else norm(x)

    def rotate(self, x: torch.Tensor, ctx: Context, last: bool = False) -> torch.Tensor:
        if not self.rotary:
            return x
        cos, sin = (ctx.cos_local, ctx.sin_local) if self.local_rope else (ctx.cos, ctx.sin)
        return apply_rope(x, cos[:, :, -1:], sin[:, :, -1:]) if last else apply_rope(x, cos, sin)

    def forward(self, x: torch.Tensor, ctx: Context, layer: int, last_only: bool = False) -> torch.Tensor:
        """x (b, T, dim) -> (b, T, dim); with last_only, keys and values for all T but the output for the last
        position only, (b, 1, dim) (the final block of a run, when nothing reads the other positions)."""
        b, T, _ = x.shape
        mask, causal = (ctx.local_mask, False) if self.sliding else (ctx.mask, ctx.is_causal)
        if last_only and T > 1:
            k, v = self.project_kv(x, ctx)
            q = linear(x[:, -1:], self.wqkv.weight[:self.q_size],
                       None if self.wqkv.bias is None else self.wqkv.bias[:self.q_size])
            q = self.rotate(self.norm_heads(heads(q, self.n_heads), self.q_norm), ctx, last=True)
            mask, causal, T = (None if mask is None else mask[:, :, -1:]), False, 1
        else:
            q, k, v = self.wqkv(x, ctx.quantized).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q = self.rotate(self.norm_heads(heads(q, self.n_heads), self.q_norm), ctx)
            k = self.rotate(self.norm_heads(heads(k, self.n_kv_heads), self.k_norm), ctx)
            v = heads(v, self.n_kv_heads)
        if ctx.cache is not None:
            k, v = ctx.cache.update(layer, k, v, ctx)
        if ctx.attention == "triton" and ctx.write_pos is not None and T == 1 and mask is not None:
            y = decode_attention(q, k, v, mask[:, 0, 0], self.scale)  # (mask (B, 1, 1, S): the slots a row reads)
        elif ctx.write_pos is not None and not q.is_cuda:
            y = cache_attention(q, k, v, mask, self.scale)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale,
                                               enable_gqa=self.n_kv_heads != self.n_heads)
        return self.wo(y.transpose(1, 2).reshape(b, T, self.q_size), ctx.quantized)  # (b, T, H * hd)


def cache_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                    scale: float | None = None) -> torch.Tensor:
    """Attention of a few queries a row, q (B, H, T, hd), over a whole KV cache k, v (B, Hkv, S, hd) where mask
    (B, 1, T, S), in float32, written as products and sums: in a compiled CPU decode step inductor turns them into a
    few loops, where SDPA or a bmm of a single query costs 80-250 us a call (measured). T is 1 in a decode step, the
    drafts plus one in a speculative verify step."""
    B, H, T, hd = q.shape
    Hkv = k.shape[1]
    qg = q.reshape(B, Hkv, H // Hkv, T, 1, hd).float()  # (B, Hkv, g, T, 1, hd): query head h reads kv head h // g
    keys, values = k[:, :, None, None].float(), v[:, :, None, None].float()  # (B, Hkv, 1, 1, S, hd)
    scores = (qg * keys).sum(-1) * (hd ** -0.5 if scale is None else scale)  # (B, Hkv, g, T, S)
    p = scores.masked_fill(~mask[:, :, None], float("-inf")).softmax(-1)
    y = (p[..., None] * values).sum(-2)  # (B, Hkv, g, T, hd)
    return y.to(q.dtype).reshape(B, H, T, hd)


def heads(x: torch.Tensor, n: int) -> torch.Tensor:
    """(b, T, n * hd) -> (b, n, T, hd)."""
    b, T, _ = x.shape
    return x.view(b, T, n, -1).transpose(1, 2)


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): SwiGLU (silu; Llama, Qwen, Mistral) or GeGLU (tanh GELU; Gemma). Gate and up are
    the two row blocks of one matrix, w13 (the file keeps them apart as w1 and w3: adainfer.loading.FUSED)."""

    # One product of the fused matrix, or two of its row blocks (views, no copy): see gate_up_split.
    SPLIT: bool | None = None  # None: gate_up_split decides; True / False: forced (benchmarks/bench_gate_up.py)

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gelu = config.activation == "gelu_tanh"
        self.hidden = config.hidden_dim
        self.w13 = Linear(config.dim, 2 * config.hidden_dim, bias=False)  # gate rows, then up rows
        self.w13.parts = (config.hidden_dim, config.hidden_dim)
        self.w2 = Linear(config.hidden_dim, config.dim, bias=False)  # down

    def forward(self, x: torch.Tensor, quantized: bool = False) -> torch.Tensor:
        split = gate_up_split(x) if self.SPLIT is None else self.SPLIT
        if split and not (quantized and self.w13.q4 is not None):  # (int4: one kernel call either way)
            w = self.w13.weight  # (2 * hidden, dim)
            gate, up = linear(x, w[:self.hidden]), linear(x, w[self.hidden:])
        else:
            gate, up = self.w13(x, quantized).chunk(2, dim=-1)  # (b, T, 2 * hidden) -> 2 x (b, T, hidden)
        gate = F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)
        return self.w2(gate * up, quantized)


@contextmanager
def gate_up_way(split: bool | None):
    """GatedMLP.SPLIT set to `split` inside the block (None: gate_up_split decides), put back after."""
    before, GatedMLP.SPLIT = GatedMLP.SPLIT, split
    try:
        yield
    finally:
        GatedMLP.SPLIT = before


def gate_up_split(x: torch.Tensor) -> bool:
    """Whether gate and up run as two products: where the product runs in float32 on a CPU (a float32 model, or
    bfloat16 upcast on a CPU without bfloat16 units: quant.linear). There one product of the fused matrix was no
    faster: 10-30% slower in MKL for 16-256 rows on an AVX2 EPYC, level to 1.6% slower on an EPYC with AVX512-BF16.
    In bfloat16 on the latter one product was 3-10% faster in prefill and level in decode (benchmarks/RESULTS.md,
    benchmarks/bench_gate_up.py); on a GPU one GEMV launches where two did (not yet timed there)."""
    return not x.is_cuda and (x.dtype == torch.float32 or upcasts(x))


class ReluMLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.w1 = Linear(config.dim, config.hidden_dim, bias=True)
        self.w2 = Linear(config.hidden_dim, config.dim, bias=True)

    def forward(self, x: torch.Tensor, quantized: bool = False) -> torch.Tensor:
        return self.w2(F.relu(self.w1(x, quantized)), quantized)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.pre_norm = config.pre_norm
        self.attention_norm = make_norm(config, config.dim)
        self.attention = Attention(config, layer)
        self.ffn_norm = make_norm(config, config.dim)
        self.feed_forward = ReluMLP(config) if config.arch == "opt" else GatedMLP(config)
        # Gemma 3's sandwich: each sublayer's output normalised again before its residual add.
        self.post_attention_norm = make_norm(config, config.dim) if config.sandwich_norm else None
        self.post_ffn_norm = make_norm(config, config.dim) if config.sandwich_norm else None

    def forward(self, x: torch.Tensor, ctx: Context, layer: int, skip_attn: bool = False,
                last_only: bool = False) -> torch.Tensor:
        """x (b, T, dim) -> (b, T, dim), or (b, 1, dim) with last_only (see Attention.forward). Pre-norm (with
        Gemma 3's post-sublayer norms), or OPT's post-LN (opt-350m: the norm after each residual add)."""
        a = self._attend(self.attention_norm(x) if self.pre_norm else x, ctx, layer, skip_attn, last_only)
        if self.post_attention_norm is not None and not skip_attn:
            a = self.post_attention_norm(a)
        x = (x[:, -1:] if a.shape[1] != x.shape[1] else x) + a
        if self.pre_norm:
            m = self.feed_forward(self.ffn_norm(x), ctx.quantized)
            if self.post_ffn_norm is not None:
                m = self.post_ffn_norm(m)
            x = x + m
        else:
            x = self.attention_norm(x)
            m = self.feed_forward(x, ctx.quantized)
            x = self.ffn_norm(x + m)
        if ctx.record is not None:
            ctx.record["attn"], ctx.record["mlp"] = a[:, -1], m[:, -1]
        return x

    def _attend(self, x: torch.Tensor, ctx: Context, layer: int, skip: bool, last_only: bool) -> torch.Tensor:
        if not skip:
            return self.attention(x, ctx, layer, last_only)
        # A skipped attention sublayer adds nothing, but later tokens may still attend to this layer's keys.
        if ctx.cache is not None:
            ctx.cache.update(layer, *self.attention.project_kv(x, ctx), ctx)
        return torch.zeros_like(x[:, -1:] if last_only else x)


# ---------------------------------------------------------------- the per-forward context


@dataclass
class Context:
    """What every block of one forward shares. `select` keeps a subset of rows (batch compaction)."""

    cos: torch.Tensor | None  # (b, 1, T, hd) rotary tables, rotary families only
    sin: torch.Tensor | None
    mask: torch.Tensor | None  # (b, 1, T, S) bool, True = may attend; None with is_causal or full attention
    is_causal: bool
    cache: KVCache | None
    rows: torch.Tensor | None = None  # rows of the cache this batch holds; None = all, in order
    record: dict | None = None  # when set, blocks leave their last-token attention / MLP outputs here
    write_pos: torch.Tensor | None = None  # (T,) int64: a decode graph's cache slots for its T tokens
    quantized: bool = False  # products through a quantized model's int4 / int8 kernels (decode steps)
    local_mask: torch.Tensor | None = None  # (b, 1, T, S) the sliding layers' mask (the window on top of `mask`)
    cos_local: torch.Tensor | None = None  # the sliding layers' rotary tables, where their base differs (Gemma 3)
    sin_local: torch.Tensor | None = None
    attention: str = "sdpa"  # a decode step's attention on a GPU: "triton", adainfer.kernels.attention.decode_attention

    def select(self, keep: torch.Tensor, rows: torch.Tensor) -> Context:
        pick = (lambda t: None if t is None else t[keep])
        record = None if self.record is None else {k: v[keep] for k, v in self.record.items()}
        return Context(pick(self.cos), pick(self.sin), pick(self.mask), self.is_causal, self.cache, rows, record,
                       local_mask=pick(self.local_mask), cos_local=pick(self.cos_local),
                       sin_local=pick(self.sin_local))


# ---------------------------------------------------------------- the decoder


class Decoder(nn.Module):
    def __init__(self, config: ModelConfig, shard=None):
        """`shard` (adainfer.parallel.Shard): this rank's slice of a tensor-parallel replica; `config` stays the whole
        model's, `local` is the slice's (its heads and MLP units), and the vocabulary rows are the shard's."""
        super().__init__()
        self.config, self.shard = config, shard
        self.local = config if shard is None else shard.local(config)
        opt = config.arch == "opt"
        vocab = config.vocab_size if shard is None else shard.hi - shard.lo
        self.tok_embeddings = nn.Embedding(vocab, config.embed_dim)
        # OPT's learned positions start at index 2 (a fairseq leftover); Llama rotates q and k instead.
        self.pos_embeddings = nn.Embedding(config.max_seq_len + 2, config.dim) if opt else None
        proj = opt and config.embed_dim != config.dim
        self.project_in = Linear(config.embed_dim, config.dim, bias=False) if proj else None
        self.project_out = Linear(config.dim, config.embed_dim, bias=False) if proj else None
        self.layers = nn.ModuleList(Block(self.local, i) for i in range(config.n_layers))
        if shard is not None:  # o and down are row-parallel
            for block in self.layers:
                block.attention.wo.reduce = block.feed_forward.w2.reduce = shard
        self.norm = make_norm(config, config.dim) if (config.pre_norm and config.final_norm) else None
        self.output = None if config.tie_embeddings else Linear(config.embed_dim, vocab, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(config) if not opt else torch.zeros(0), persistent=False)
        local = config.rope_local_theta is not None
        self.register_buffer("inv_freq_local", rope_inv_freq(config, local=True) if local else torch.zeros(0),
                             persistent=False)
        self.embed_mult = config.embed_scale  # rounded to the model's dtype by adainfer.loading, as Gemma does
        self.head_q8: QuantWeight | None = None  # the head rounded to int8: the int8 check head, int4 decoding
        # A prefill's blocks through inductor (set by adainfer.fast_prefill.compile_prefill): called as
        # prefill_block(block, h, ctx, layer, skip_attn, last_only) in place of block(h, ctx, layer, ...).
        self.prefill_block = None

    @property
    def head_weight(self) -> torch.Tensor:
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_embeddings.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.weight.device

    def head_input(self, h: torch.Tensor) -> torch.Tensor:
        """Block output -> what the LM head reads: final norm, then OPT-350m's project_out."""
        if self.norm is not None:
            h = self.norm(h)
        if self.project_out is not None:
            h = self.project_out(h)
        return h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """States (..., dim) -> logits (..., V) over the whole vocabulary."""
        if self.shard is not None:
            return self.head(h.reshape(-1, h.shape[-1])).view(*h.shape[:-1], -1)
        return self.softcap(linear(self.head_input(h), self.head_weight))

    def head(self, h: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Last-token states (b, dim) -> float32 logits (b, V) over head rows `weight` (default: all; see
        head_rows): the final norm, the head, the family's soft-capping. Tensor parallel: each rank scores its
        vocabulary rows and the whole is gathered (head(h, model.head_weight): this rank's rows' logits only)."""
        logits = self.softcap(head_logits(self.head_input(h), self.head_weight if weight is None else weight))
        return self.shard.gather(logits) if weight is None and self.shard is not None else logits

    def head_rows(self, ids: torch.Tensor | None) -> torch.Tensor | None:
        """The head rows of token `ids` (k, dim) for head(h, weight) and the exit check; None (all rows) for None."""
        if ids is None:
            return None
        if self.shard is not None:
            return self.shard.rows(self.head_weight, ids)
        # Kept for the next call with the same ids (a draft head of thousands of rows is gathered once, not per step).
        # The key: the ids, and the head's storage, version (in-place edits), dtype and device (.data swaps, .to()).
        w = self.head_weight
        key = (w.data_ptr(), w._version, w.dtype, w.device)
        memo = getattr(self, "_head_rows", None)
        if memo is None or memo[1] != key or memo[0].device != ids.device or not torch.equal(memo[0], ids):
            memo = self._head_rows = (ids.clone(), key, w[ids])
        return memo[2]

    def softcap(self, logits: torch.Tensor) -> torch.Tensor:
        """Gemma's final_logit_softcapping, cap * tanh(logits / cap); the identity for the other families."""
        cap = self.config.final_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def int8_head(self) -> QuantWeight:
        """The head rounded to int8 (quant.quantize_int8), built on first use (~0.3 s for the default model, and on
        the CPU the kernels' build the first time on a machine; a GPU reads it through the Triton top-2 kernel) and
        again when the head's weights have been replaced."""
        if self.shard is not None:
            raise AdainferError("--check-head", "the int8 check head is not built for tensor-parallel runs (--tp)")
        if self.head_q8 is None or self.head_q8.built_from != self.head_weight.data_ptr():
            if self.device.type == "cpu":
                load_q4q8_kernel(what="--check-head int8")
            self.head_q8 = QuantWeight(*quantize_int8(self.head_weight))
            self.head_q8.built_from = self.head_weight.data_ptr()
        return self.head_q8

    def context(self, positions: torch.Tensor, pad_mask: torch.Tensor | None, cache: KVCache | None,
                rows: torch.Tensor | None = None) -> Context:
        """Masks and rotary tables for one forward over tokens at `positions` (B, T), on cache rows `rows`."""
        B, T = positions.shape
        cos, sin = self.rotary_tables(positions)
        start = cache.length if cache is not None else 0
        S = start + T
        padded = pad_mask is not None and not bool(pad_mask.all())
        sel = slice(None) if rows is None else rows
        if cache is not None:
            cache.valid[sel, start:S] = True if pad_mask is None else pad_mask
            cache.padded |= padded
            padded = cache.padded
        valid = cache.valid[sel, :S] if cache is not None else pad_mask  # (B, S) or None
        local = self.local_tables(positions, start, valid, B, T, S, None if cache is None else cache.ring)
        if not padded and (start == 0 or T == 1):
            # Plain causal attention (a single new token attends to every cached key).
            return Context(cos, sin, None, T > 1, cache, rows, **local)
        keys = torch.arange(S, device=positions.device)
        queries = start + torch.arange(T, device=positions.device)
        mask = (keys[None, :] <= queries[:, None])[None] & valid[:, None, :]  # (B, T, S)
        # A padding query sees no key at all, and SDPA would return NaN for it, which then leaks through the
        # zero attention weights of later queries (0 * NaN). Let every query see its own position.
        mask |= (keys[None, :] == queries[:, None])[None]
        return Context(cos, sin, mask[:, None], False, cache, rows, **local)

    def rotary_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """cos, sin (B, 1, T, hd) for positions (B, T); (None, None) for OPT's learned positions."""
        if not self.config.rotary:
            return None, None
        return rope_cos_sin(self.inv_freq, positions, self.dtype)

    def local_tables(self, positions: torch.Tensor, start, valid: torch.Tensor | None, B: int, T: int, S: int,
                     ring: int | None = None, written: bool = False) -> dict:
        """The sliding layers' mask and rotary tables (Context fields) for queries at cache slots start..start+T-1
        (start: an int, or a (1,) tensor in a decode graph): a query sees itself and the window - 1 keys before it.
        Slots, not positions: left padding shifts a row's positions and slots alike, so the window is the same.
        The keys are slots 0..S-1, or with a ring cache (KVCache.ring) the ring's entries, each holding the newest
        slot of its residue below `start` (`written`: up to the query itself, which a decode graph wrote first),
        followed by the new slots unless `written`. valid (B, >= S) says which slots hold real tokens."""
        config = self.config
        if config.sliding_window is None or not any(config.sliding(i) for i in range(config.n_layers)):
            return {}
        device = positions.device
        queries = start + torch.arange(T, device=device)
        if ring is None:
            keys = torch.arange(S, device=device)
            seen = None if valid is None else valid[:, :S]
        else:
            r = torch.arange(ring, device=device)
            newest = queries[-1:] if written else start - 1 + torch.zeros(1, dtype=torch.long, device=device)
            keys = newest - torch.remainder(newest - r, ring)  # (ring,) slot held by each entry; < 0: none yet
            if not written:
                keys = torch.cat([keys, queries])
            seen = valid[:, keys.clamp(min=0)] & (keys >= 0)  # (B, K)
        window = (keys[None, :] <= queries[:, None]) & (keys[None, :] > queries[:, None] - config.sliding_window)
        local = window[None] if seen is None else window[None] & seen[:, None, :]  # (B or 1, T, K)
        local = (local | (keys[None, :] == queries[:, None])[None]).expand(B, T, keys.shape[0])
        tables = {"local_mask": local[:, None]}
        if config.rope_local_theta is not None:
            tables["cos_local"], tables["sin_local"] = rope_cos_sin(self.inv_freq_local, positions, self.dtype)
        return tables

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens) if self.shard is None else self.shard.embed(self.tok_embeddings.weight, tokens)
        if self.embed_mult != 1.0:
            h = h * self.embed_mult
        if self.project_in is not None:
            h = self.project_in(h)
        if self.pos_embeddings is not None:
            h = h + self.pos_embeddings(positions + 2)
        return h

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None, pad_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, plan: Plan | None = None, rows: torch.Tensor | None = None) -> Output:
        """tokens (B, T) left-padded, pad_mask (B, T) True on real tokens, positions (B, T) counted from each row's
        first real token (derived when not given). Runs the blocks of `plan`, each row stopping where its exit
        rule fires. With a cache, K/V of every block run are written at cache.length (into cache rows `rows`, all
        by default); the caller advances cache.length."""
        plan = plan or Plan()
        B, T = tokens.shape
        if positions is None:
            positions = default_positions(pad_mask, cache, rows, B, T, tokens.device)
        ctx = self.context(positions, pad_mask, cache, rows)
        h = self.embed(tokens, positions)
        order = list(range(self.config.n_layers)) if plan.layers is None else list(plan.layers)
        n_run = len(order) if plan.exit_at is None else min(plan.exit_at, len(order))
        rule, reader = plan.exit, plan.translator
        weight = self.head_rows(plan.candidates)  # None: the whole vocabulary
        exits = Exits(lambda x: self.head(x, weight), B, n_run, plan.sync_every)
        features, hiddens = [], ([h] if plan.hidden_states else None)
        ctx.record = {} if rule is not None and rule.needs_record else None
        state = {"hidden": h[:, -1]}  # per-row memory of the exit rule (previous block's states, CRF scores)
        # Compiled blocks serve a prompt written from an empty cache (the eager loop writes at cache.length, an int
        # a compiled block would be specialised on: a compile per length); later calls take the modules.
        compiled = self.prefill_block is not None and T > 1 and (cache is None or cache.length == 0)
        run = self.prefill_block if compiled else nn.Module.__call__  # run(block, h, ctx, layer, ...)

        for step, i in enumerate(order[:n_run]):
            # The last block of the run only has to produce the last position (its keys still cover all).
            last_only = step == n_run - 1 and not plan.hidden_states
            h = run(self.layers[i], h, ctx, i, skip_attn=i in plan.skip_attn, last_only=last_only)
            n = step + 1  # blocks run so far
            if hiddens is not None:
                hiddens.append(h)
            if rule is not None and n < n_run and rule.should_check(n):
                head = plan.check_head if plan.candidates is None else "full"
                live = exits.live
                if plan.capture_checks and CheckGraphs.covers(rule, self, plan):  # one replay (the head later)
                    if exits.window > 1:  # the replay notes the decisions into the window's buffers
                        window = rule.check_graphs.window(h[:, -1])
                        rule.check_graphs(self, n, h[:, -1], reader, weight, head, window, opens=exits.open is None)
                        keep = exits.noted(window, n)
                    else:
                        read, fire = rule.check_graphs(self, n, h[:, -1], reader, weight, head)
                        keep = exits.check(fire, n, None, read)
                else:
                    read = h[:, -1] if reader is None else reader.read(n, h[:, -1])  # what the check reads
                    top2, logits = probe(self, read, weight, head)
                    feats, fire, state = rule.decide(top2, h[:, -1], ctx.record, state)
                    if plan.record_features:
                        features.append({"layer": n, "rows": exits.live, "top1": top2.top1, **feats})
                        if plan.record_logits:
                            features[-1]["logits"] = exits.head(read) if logits is None else logits
                    keep = exits.check(fire, n, logits, read)  # rows that stay, once some have left
                if keep is not None:
                    if plan.fill_skipped_kv and cache is not None:
                        gone = live[~keep.cpu()] if rows is None else rows[live[~keep.cpu()]]
                        self.fill_kv(h[~keep], ctx.select(~keep, gone), order[n:])
                    if not bool(keep.any()):
                        break
                    h, state = h[keep], {k: v[keep] for k, v in state.items()}
                    ctx = ctx.select(keep, None if cache is None else (exits.live if rows is None else
                                                                        rows[exits.live]))
            if rule is not None:
                state = rule.remember(h[:, -1], ctx.record, state)
        else:  # a run stopped before the model's last block (exit_at, a layer subset) reads through its map too
            if not plan.answer and rule is None:
                return Output(None, exits.layers, None, features, hiddens)
            through = reader is not None and reader.reads(n_run, self.config.n_layers)
            exits.finish(reader.read(n_run, h[:, -1]) if through else h[:, -1])
        logits, layers = exits.answers()
        token = logits.argmax(-1)
        return Output(logits, layers, token if plan.candidates is None else plan.candidates[token], features, hiddens)

    def fill_kv(self, h: torch.Tensor, ctx: Context, layers: list[int]) -> None:
        """CALM's state propagation: for rows that exit with hidden states h (b, T, dim), the keys and values of the
        blocks they skip, projected from h through each skipped block's attention norm (only K/V run)."""
        for j in layers:
            block = self.layers[j]
            x = block.attention_norm(h) if block.pre_norm else h
            ctx.cache.update(j, *block.attention.project_kv(x, ctx), ctx)


def default_positions(pad_mask: torch.Tensor | None, cache: KVCache | None, rows: torch.Tensor | None, B: int, T: int,
                      device) -> torch.Tensor:
    """Positions from 0 at each row's first real token, continuing after what the cache holds; padding gets 0."""
    rel = torch.arange(T, device=device).expand(B, T) if pad_mask is None else \
        (pad_mask.long().cumsum(-1) - 1).clamp(min=0)
    if cache is None or cache.length == 0:
        return rel
    valid = cache.valid[:, :cache.length] if rows is None else cache.valid[rows, :cache.length]
    return rel + valid.sum(-1, keepdim=True)
