"""Llama- and OPT-family decoders with one explicit block loop, where exit, skip and layer-plan decisions live.

Read top to bottom: norms and rotary helpers, attention, MLPs, the block, the KV cache, the per-forward context,
then `Decoder.forward` and its loop. Weights come from `adainfer.loading`; tensor names on disk are listed there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from adainfer.config import ModelConfig
from kernels.top2 import Top2, lm_head_top2, top2_from_logits

# ---------------------------------------------------------------- linear layers


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return {flag for line in f if line.startswith("flags") for flag in line.split(":", 1)[1].split()}
    except OSError:
        return set()


_FLAGS = _cpu_flags()
# On a CPU without bfloat16 units (AVX2 only), a bfloat16/float16 matmul of 8+ rows runs 4-6x slower than the
# same matmul in float32 (measured, benchmarks/README.md). There we compute it in float32 and round the output:
# a bfloat16 product is exact in float32, so this is a bfloat16 matmul with float32 accumulation, like the native one.
UPCAST_ROWS = 0 if _FLAGS & {"avx512_bf16", "amx_bf16"} else 8
# Which dtype `--dtype auto` takes on the CPU: bfloat16 only with AMX tiles. With AVX512-BF16 alone (an Intel Xeon,
# 2 threads, torch 2.13) every bfloat16 matmul we run was slower than float32's: 256 x 576 @ 576 x 1536 2.5 ms vs
# 1.6, a 49152 x 576 head GEMV 2.0 vs 2.0; prefill 1.4-1.6x and eager decode 1.1x slower (benchmarks/RESULTS.md).
CPU_PREFERS_BF16 = "amx_bf16" in _FLAGS


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if UPCAST_ROWS and x.dtype != torch.float32 and not x.is_cuda and x.numel() >= UPCAST_ROWS * x.shape[-1]:
        return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)
    return F.linear(x, weight, bias)


def head_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Last-token LM head, x (b, d) against head rows weight (V, d) -> float32 logits (b, V). On the CPU a few rows
    go as weight @ x.T: MKL runs that tall-skinny GEMM ~1.8x faster than x @ weight.T for 2-16 rows of a
    49k x 576 head (measured; one row is a GEMV either way)."""
    if x.is_cuda or x.shape[0] == 1 or x.shape[0] > 16:
        return linear(x, weight).float()
    if UPCAST_ROWS and x.dtype != torch.float32 and x.shape[0] >= UPCAST_ROWS:
        x, weight = x.float(), weight.float()
    return (weight @ x.T).T.float()


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


# ---------------------------------------------------------------- norms and rotary embeddings


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # As Hugging Face: normalise in float32, cast back, then scale (parity depends on the order).
    y = x.float()
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


def make_norm(config: ModelConfig, dim: int) -> nn.Module:
    if config.arch == "llama":
        return RMSNorm(dim, config.norm_eps)
    return nn.LayerNorm(dim, eps=config.norm_eps)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Rotary inverse frequencies (head_dim // 2,), float32, with the Llama-3 (or linear) scaling rule applied."""
    hd = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    scaling = config.rope_scaling
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
    def __init__(self, config: ModelConfig, bias: bool):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.q_size = config.n_heads * config.head_dim
        self.kv_size = config.n_kv_heads * config.head_dim
        self.wqkv = Linear(config.dim, self.q_size + 2 * self.kv_size, bias=bias)  # q, k, v fused
        self.wo = Linear(self.q_size, config.dim, bias=bias)
        self.rotary = config.arch == "llama"

    def project_kv(self, x: torch.Tensor, ctx: Context) -> tuple[torch.Tensor, torch.Tensor]:
        """Only the K/V rows of wqkv: x (b, T, dim) -> k, v (b, Hkv, T, hd), rotated."""
        b, T, _ = x.shape
        w = self.wqkv.weight[self.q_size:]
        bias = None if self.wqkv.bias is None else self.wqkv.bias[self.q_size:]
        k, v = linear(x, w, bias).split([self.kv_size, self.kv_size], dim=-1)
        k = k.view(b, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (b, Hkv, T, hd)
        v = v.view(b, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.rotary:
            k = apply_rope(k, ctx.cos, ctx.sin)
        return k, v

    def forward(self, x: torch.Tensor, ctx: Context, layer: int, last_only: bool = False) -> torch.Tensor:
        """x (b, T, dim) -> (b, T, dim); with last_only, keys and values for all T but the output for the last
        position only, (b, 1, dim) (the final block of a run, when nothing reads the other positions)."""
        b, T, _ = x.shape
        if last_only and T > 1:
            k, v = self.project_kv(x, ctx)
            q = linear(x[:, -1:], self.wqkv.weight[:self.q_size],
                       None if self.wqkv.bias is None else self.wqkv.bias[:self.q_size])
            q = q.view(b, 1, self.n_heads, self.head_dim).transpose(1, 2)  # (b, H, 1, hd)
            if self.rotary:
                q = apply_rope(q, ctx.cos[:, :, -1:], ctx.sin[:, :, -1:])
            mask, causal, T = (None if ctx.mask is None else ctx.mask[:, :, -1:]), False, 1
        else:
            q, k, v = self.wqkv(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q = q.view(b, T, self.n_heads, self.head_dim).transpose(1, 2)  # (b, H, T, hd)
            k = k.view(b, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (b, Hkv, T, hd)
            v = v.view(b, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
            if self.rotary:
                q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
            mask, causal = ctx.mask, ctx.is_causal
        if ctx.cache is not None:
            k, v = ctx.cache.update(layer, k, v, ctx)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           enable_gqa=self.n_kv_heads != self.n_heads)
        y = y.transpose(1, 2).reshape(b, T, self.q_size)  # (b, T, H * hd)
        return self.wo(y)


class SwiGLU(nn.Module):
    # Gate and up stay two matmuls: fused into one (N = 2 x hidden) they ran 10-30% slower in MKL float32 for
    # 16-256 rows on an AVX2 CPU, and no faster for one row (measured; benchmarks/README.md).
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.w1 = Linear(config.dim, config.hidden_dim, bias=False)  # gate
        self.w3 = Linear(config.dim, config.hidden_dim, bias=False)  # up
        self.w2 = Linear(config.hidden_dim, config.dim, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class ReluMLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.w1 = Linear(config.dim, config.hidden_dim, bias=True)
        self.w2 = Linear(config.hidden_dim, config.dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.relu(self.w1(x)))


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        opt = config.arch == "opt"
        self.pre_norm = config.pre_norm
        self.attention_norm = make_norm(config, config.dim)
        self.attention = Attention(config, bias=opt)
        self.ffn_norm = make_norm(config, config.dim)
        self.feed_forward = ReluMLP(config) if opt else SwiGLU(config)

    def forward(self, x: torch.Tensor, ctx: Context, layer: int, skip_attn: bool = False,
                last_only: bool = False) -> torch.Tensor:
        """x (b, T, dim) -> (b, T, dim), or (b, 1, dim) with last_only (see Attention.forward)."""
        record = ctx.record
        if self.pre_norm:
            a = self._attend(self.attention_norm(x), ctx, layer, skip_attn, last_only)
            x = (x[:, -1:] if a.shape[1] != x.shape[1] else x) + a
            m = self.feed_forward(self.ffn_norm(x))
            x = x + m
        else:  # OPT post-LN (opt-350m): the norm comes after each residual add
            a = self._attend(x, ctx, layer, skip_attn, last_only)
            x = self.attention_norm((x[:, -1:] if a.shape[1] != x.shape[1] else x) + a)
            m = self.feed_forward(x)
            x = self.ffn_norm(x + m)
        if record is not None:
            record["attn"], record["mlp"] = a[:, -1], m[:, -1]
        return x

    def _attend(self, x: torch.Tensor, ctx: Context, layer: int, skip: bool, last_only: bool) -> torch.Tensor:
        if not skip:
            return self.attention(x, ctx, layer, last_only)
        # A skipped attention sublayer adds nothing, but later tokens may still attend to this layer's keys.
        if ctx.cache is not None:
            ctx.cache.update(layer, *self.attention.project_kv(x, ctx), ctx)
        return torch.zeros_like(x)


# ---------------------------------------------------------------- KV cache and per-forward context


class KVCache:
    """Preallocated keys and values for every layer: (n_layers, B, Hkv, max_len, hd), written at `length`.

    Rows are left-padded: `valid[b, s]` says whether key position s of row b holds a real token.
    """

    def __init__(self, config: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, device="cpu"):
        shape = (config.n_layers, batch, config.n_kv_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.length = 0  # positions written so far, the same for every row
        self.padded = False  # whether any row holds padding (then attention needs an explicit mask)
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, ctx: Context):
        """Write k, v (b, Hkv, T, hd) at [length, length + T) for the rows in ctx.rows; return the keys so far."""
        end = self.length + k.shape[2]
        if ctx.rows is None:
            self.k[layer, :, :, self.length:end] = k
            self.v[layer, :, :, self.length:end] = v
            return self.k[layer, :, :, :end], self.v[layer, :, :, :end]
        self.k[layer, ctx.rows, :, self.length:end] = k
        self.v[layer, ctx.rows, :, self.length:end] = v
        return self.k[layer, ctx.rows, :, :end], self.v[layer, ctx.rows, :, :end]


@dataclass
class Context:
    """What every block of one forward shares. `select` keeps a subset of rows (batch compaction)."""

    cos: torch.Tensor | None  # (b, 1, T, hd) rotary tables, Llama only
    sin: torch.Tensor | None
    mask: torch.Tensor | None  # (b, 1, T, S) bool, True = may attend; None with is_causal or full attention
    is_causal: bool
    cache: KVCache | None
    rows: torch.Tensor | None = None  # rows of the cache this batch holds; None = all, in order
    record: dict | None = None  # when set, blocks leave their last-token attention / MLP outputs here

    def select(self, keep: torch.Tensor, rows: torch.Tensor) -> Context:
        pick = (lambda t: None if t is None else t[keep])
        record = None if self.record is None else {k: v[keep] for k, v in self.record.items()}
        return Context(pick(self.cos), pick(self.sin), pick(self.mask), self.is_causal, self.cache, rows, record)


# ---------------------------------------------------------------- what a run may ask of the loop


@dataclass
class Plan:
    """Which blocks run, which sublayers are skipped, and where the loop may stop.

    layers: block indices in the order they run (None = all). skip_attn: blocks whose attention is skipped.
    exit: an exit rule (adainfer.exit) or None. exit_at: force every row to stop after this many blocks.
    candidates: token ids the answer and the exit features are restricted to. record_features: keep every
    checked layer's features (for calibration and analysis). hidden_states: keep every block's output.
    """

    layers: list[int] | None = None
    skip_attn: frozenset[int] = frozenset()
    exit: object | None = None
    exit_at: int | None = None
    candidates: torch.Tensor | None = None
    record_features: bool = False
    record_logits: bool = False  # with record_features: also keep each check's float32 logits
    hidden_states: bool = False
    sync_every: int = 1  # read exit decisions every N checks (one host sync for N layers; for GPUs)
    fill_skipped_kv: bool = False  # rows that exit get K/V for the blocks they skip, from their exit state (CALM)
    check_head: str = "full"  # "int8": CPU exit features from an int8 copy of the head; answers at full precision


@dataclass
class Output:
    logits: torch.Tensor  # (B, V) or (B, n_candidates), float32: the last token at each row's exit layer
    layers_run: torch.Tensor  # (B,) int64: blocks each row ran
    token: torch.Tensor  # (B,) int64: argmax of logits, mapped back to vocabulary ids in candidate mode
    features: list = field(default_factory=list)  # with record_features: one dict per checked layer
    hidden_states: list | None = None  # with hidden_states: embeddings, then each block's output (B, T, dim)


# ---------------------------------------------------------------- the decoder


class Decoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        opt = config.arch == "opt"
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.embed_dim)
        # OPT's learned positions start at index 2 (a fairseq leftover); Llama rotates q and k instead.
        self.pos_embeddings = nn.Embedding(config.max_seq_len + 2, config.dim) if opt else None
        proj = opt and config.embed_dim != config.dim
        self.project_in = Linear(config.embed_dim, config.dim, bias=False) if proj else None
        self.project_out = Linear(config.dim, config.embed_dim, bias=False) if proj else None
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = make_norm(config, config.dim) if (config.pre_norm and config.final_norm) else None
        self.output = None if config.tie_embeddings else Linear(config.embed_dim, config.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(config) if not opt else torch.zeros(0), persistent=False)

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
        return linear(self.head_input(h), self.head_weight)

    def probe(self, h_last: torch.Tensor, weight: torch.Tensor, check_head: str = "full"
              ) -> tuple[Top2, torch.Tensor | None]:
        """The exit check on last-token states (b, dim) against head rows `weight`: Top2, and on the CPU path the
        float32 logits it computed (so that an exiting row need not run the head again). check_head "int8": the
        features come from the full head rounded to int8 (a quarter of float32's bytes; adainfer.fast_decode's
        kernel) and no logits are returned, so a row that exits takes its answer from the head at full precision."""
        if h_last.is_cuda:  # fused kernel, logits never written; a final RMSNorm is folded in
            if isinstance(self.norm, RMSNorm) and self.project_out is None:
                return lm_head_top2(h_last, weight, self.norm.weight, self.config.norm_eps), None
            return lm_head_top2(self.head_input(h_last), weight), None
        if check_head == "int8":
            from adainfer.fast_decode import int8_head_logits

            return top2_from_logits(int8_head_logits(self, self.head_input(h_last))), None
        logits = head_logits(self.head_input(h_last), weight)
        return top2_from_logits(logits), logits

    def context(self, positions: torch.Tensor, pad_mask: torch.Tensor | None, cache: KVCache | None,
                rows: torch.Tensor | None = None) -> Context:
        """Masks and rotary tables for one forward over tokens at `positions` (B, T), on cache rows `rows`."""
        B, T = positions.shape
        cos = sin = None
        if self.config.arch == "llama":
            cos, sin = rope_cos_sin(self.inv_freq, positions, self.dtype)
        start = cache.length if cache is not None else 0
        S = start + T
        padded = pad_mask is not None and not bool(pad_mask.all())
        sel = slice(None) if rows is None else rows
        if cache is not None:
            cache.valid[sel, start:S] = True if pad_mask is None else pad_mask
            cache.padded |= padded
            padded = cache.padded
        if not padded and (start == 0 or T == 1):
            # Plain causal attention (a single new token attends to every cached key).
            return Context(cos, sin, None, T > 1, cache, rows)
        valid = cache.valid[sel, :S] if cache is not None else pad_mask  # (B, S)
        keys = torch.arange(S, device=positions.device)
        queries = start + torch.arange(T, device=positions.device)
        mask = (keys[None, :] <= queries[:, None])[None] & valid[:, None, :]  # (B, T, S)
        # A padding query sees no key at all, and SDPA would return NaN for it, which then leaks through the
        # zero attention weights of later queries (0 * NaN). Let every query see its own position.
        mask |= (keys[None, :] == queries[:, None])[None]
        return Context(cos, sin, mask[:, None], False, cache, rows)

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
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
        rule = plan.exit
        weight = self.head_weight if plan.candidates is None else self.head_weight[plan.candidates]
        exits = Exits(self, weight, B, n_run, plan.sync_every)
        features, hiddens = [], ([h] if plan.hidden_states else None)
        if rule is not None and rule.needs_record:
            ctx.record = {}
        state = {"hidden": h[:, -1]}  # per-row memory of the exit rule (previous block's states, CRF scores)

        for step, i in enumerate(order[:n_run]):
            # The last block of the run only has to produce the last position (its keys still cover all).
            last_only = step == n_run - 1 and not plan.hidden_states
            h = self.layers[i](h, ctx, i, skip_attn=i in plan.skip_attn, last_only=last_only)
            n = step + 1  # blocks run so far
            if hiddens is not None:
                hiddens.append(h)
            if rule is not None and n < n_run and rule.should_check(n):
                top2, logits = self.probe(h[:, -1], weight, plan.check_head if plan.candidates is None else "full")
                feats, fire, state = rule.decide(top2, h[:, -1], ctx.record, state)
                if plan.record_features:
                    features.append({"layer": n, "rows": exits.live, "top1": top2.top1, **feats})
                    if plan.record_logits:
                        features[-1]["logits"] = exits.head(h[:, -1]) if logits is None else logits
                live = exits.live
                keep = exits.check(fire, n, logits, h[:, -1])  # rows that stay, once some have left
                if keep is not None:
                    if plan.fill_skipped_kv and cache is not None:
                        gone = live[~keep.cpu()] if rows is None else rows[live[~keep.cpu()]]
                        self.fill_kv(h[~keep], ctx.select(~keep, gone), order[n:])
                    if not bool(keep.any()):
                        break
                    h, state = h[keep], {k: v[keep] for k, v in state.items()}
                    kept = None if cache is None else (exits.live if rows is None else rows[exits.live])
                    ctx = ctx.select(keep, kept)
            if rule is not None:
                state = rule.remember(h[:, -1], ctx.record, state)
        else:
            exits.finish(h[:, -1])
        return exits.output(plan.candidates, features, hiddens)


    def fill_kv(self, h: torch.Tensor, ctx: Context, layers: list[int]) -> None:
        """CALM's state propagation: for rows that exit with hidden states h (b, T, dim), the keys and values of the
        blocks they skip, projected from h through each skipped block's attention norm (only K/V run)."""
        for j in layers:
            block = self.layers[j]
            x = block.attention_norm(h) if block.pre_norm else h
            ctx.cache.update(j, *block.attention.project_kv(x, ctx), ctx)


class Exits:
    """The answers of one forward, row by row: logits at each row's exit layer and the blocks it ran.

    A row whose rule fires leaves the batch (the others are compacted). With `window` > 1 the decisions stay on the
    device and are read once every `window` checks, one host synchronisation for several layers: a row that fired
    inside a window runs on to its end, but answers with the logits of the layer where it fired."""

    def __init__(self, model: Decoder, weight: torch.Tensor, B: int, n_run: int, window: int = 1):
        self.model, self.weight = model, weight
        self.logits: list = [None] * B
        self.layers = torch.full((B,), n_run, dtype=torch.int64)
        self.live = torch.arange(B)  # input rows the (compacted) batch still holds
        self.window, self.pending = max(1, window), None  # pending: (fired, layer, logits or hidden) on device

    def head(self, h_last: torch.Tensor) -> torch.Tensor:
        return head_logits(self.model.head_input(h_last), self.weight)

    def check(self, fire: torch.Tensor, n: int, logits: torch.Tensor | None, h_last: torch.Tensor):
        """Note one check's decisions; return the keep-mask once rows have left the batch, else None."""
        payload = (logits, True) if logits is not None else (h_last, False)  # CPU: logits; GPU: the head later
        if self.window == 1:
            fired, at, value = fire, None, payload[0]
        else:
            fired, at, value = self._accumulate(fire, n, *payload)
            if self.pending[3] < self.window:
                return None
            self.pending = None
        if not bool(fired.any()):  # the one host synchronisation of a check (or of a window)
            return None
        out = value[fired] if payload[1] else self.head(value[fired])
        layers = [n] * int(fired.sum()) if at is None else at[fired].tolist()
        fired_cpu = fired.cpu()
        for j, r in enumerate(self.live[fired_cpu].tolist()):
            self.logits[r], self.layers[r] = out[j], layers[j]
        self.live = self.live[~fired_cpu]
        return ~fired

    def _accumulate(self, fire, n, value, is_logits):
        if self.pending is None:
            at = torch.full(fire.shape, n, dtype=torch.int64, device=fire.device)
            self.pending = [fire, at, value, 1, is_logits]
        else:
            fired, at, old, count, _ = self.pending
            new = fire & ~fired
            at = torch.where(new, n, at)
            value = torch.where(new[:, None], value, old)
            self.pending = [fired | fire, at, value, count + 1, is_logits]
        return self.pending[0], self.pending[1], self.pending[2]

    def finish(self, h_last: torch.Tensor) -> None:
        """After the last block: rows that fired in an open window keep that answer, the rest take this one."""
        final = self.head(h_last)
        fired = None
        if self.pending is not None:
            fired, at, value, _, is_logits = self.pending
            if not is_logits:
                value = self.head(value)
            final = torch.where(fired[:, None], value, final)
        for j, r in enumerate(self.live.tolist()):
            self.logits[r] = final[j]
            if fired is not None and bool(fired[j]):
                self.layers[r] = int(at[j])

    def output(self, candidates: torch.Tensor | None, features: list, hiddens: list | None) -> Output:
        logits = torch.stack(self.logits)
        token = logits.argmax(-1)
        if candidates is not None:
            token = candidates[token]
        return Output(logits, self.layers, token, features, hiddens)


def default_positions(pad_mask: torch.Tensor | None, cache: KVCache | None, rows: torch.Tensor | None, B: int, T: int,
                      device) -> torch.Tensor:
    """Positions from 0 at each row's first real token, continuing after what the cache holds; padding gets 0."""
    rel = torch.arange(T, device=device).expand(B, T) if pad_mask is None else \
        (pad_mask.long().cumsum(-1) - 1).clamp(min=0)
    if cache is None or cache.length == 0:
        return rel
    valid = cache.valid[:, :cache.length] if rows is None else cache.valid[rows, :cache.length]
    return rel + valid.sum(-1, keepdim=True)
