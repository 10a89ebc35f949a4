"""Captured decode: one new token per row through every block as one torch.compile graph, optionally on int4 weights.

Eager decoding of the default model at batch 1 spends ~15 ms a token dispatching ~60 small ops per block, and on an
AVX2 CPU a bfloat16 GEMV reads weights at ~8 GB/s (measured: benchmarks/README.md). Two levers, both opt-in:

  compiled  the dense decode step (embedding, every block, final norm, LM head) traced once by torch.compile: inductor
            fuses the norms, rotary, attention and SwiGLU elementwise work into a few C++ loops around the matmuls,
            and the whole step is one call. Same weights, same math; float rounding differs in the last bits.
  int4      the same graph with every block matrix rounded to 4 bits in groups of 32 input columns, scale and offset
            per group (GGUF's Q4_1), and the LM head to 8 bits (Q8_0), as the default model's Q4_1 GGUF ships them
            (on it the rounding recovers the distributed weights), run by adainfer's C++ kernels (csrc/q4q8.cpp,
            compiled on first use): activations rounded to int8 per group of 32 and the products summed in integers
            (AVX2), what llama.cpp runs for those files. float32 or bfloat16 models. The eager model (prefill, exit
            checks) is switched to the dequantized values, so prefill and decode compute with the same weights.
            Lossy (the activations' rounding, and the weights' on a model not from such a GGUF): see the tolerances
            in tests/test_fast_decode.py.

Only dense decode steps go through the graph (every row runs all blocks); exit decisions, layer plans and per-token
exit stay on the eager loop. Llama-family models only. The graph is compiled on first use (about a minute for the
30-block default model on 2 cores, two with int4; inductor caches it on disk), a second time at the first KV cache
of another size, and again for a new batch size.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from adainfer.errors import AdainferError
from adainfer.model import Decoder, KVCache, apply_rope, default_positions, head_logits, linear, rms_norm, rope_cos_sin

INT4_GROUP = 32
DECODE_MODES = ("eager", "compiled", "int4")


# ---------------------------------------------------------------- int4 weights


def quantize_int4(w: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w (N, K) -> q (N, K) int32 in 0..15, scale and low (N, K // group) float32, with w ~ scale * q + low: the
    group's minimum maps to 0 and its maximum to 15 (as llama.cpp's Q4_1)."""
    N, K = w.shape
    g = w.float().view(N, K // group, group)
    low, high = g.amin(-1), g.amax(-1)
    scale = (high - low) / 15
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = ((g - low[..., None]) / safe[..., None]).round().clamp(0, 15)
    return q.to(torch.int32).view(N, K), scale, low


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """The plain-torch reference: (N, K) float32 weights from quantize_int4's output."""
    N, K = q.shape
    g = q.float().view(N, scale.shape[1], -1)
    return (g * scale[..., None] + low[..., None]).view(N, K)


def quantize_int8(w: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) -> q (N, K) int8 in -127..127 and scale (N, K // group) float32 = max|w| / 127 per group, with
    w ~ scale * q (llama.cpp's Q8_0, in which the default model's embedding table is distributed)."""
    N, K = w.shape
    g = w.float().view(N, K // group, group)
    scale = g.abs().amax(-1) / 127
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = (g / safe[..., None]).round().clamp(-127, 127)
    return q.to(torch.int8).view(N, K), scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The plain-torch reference: (N, K) float32 weights from quantize_int8's output."""
    N, K = q.shape
    return (q.float().view(N, scale.shape[1], -1) * scale[..., None]).view(N, K)


# ---------------------------------------------------------------- the int4 / int8 x int8 kernels

_KERNEL_SOURCE = Path(__file__).parent / "csrc" / "q4q8.cpp"
_kernel_loaded = False


def load_q4q8_kernel(portable: bool | None = None, what: str = "--decode int4") -> None:
    """Compile adainfer/csrc/q4q8.cpp (first use: ~15 s; torch keeps the build under ~/.cache/torch_extensions) and
    register torch.ops.adainfer.q4q8_linear and q8q8_linear. AVX2 integer dot products where torch reports an AVX2
    CPU, a portable C++ loop otherwise (or with portable=True / ADAINFER_Q4Q8_PORTABLE=1)."""
    global _kernel_loaded
    if _kernel_loaded:
        return
    from torch.utils import cpp_extension

    if portable is None:
        portable = os.environ.get("ADAINFER_Q4Q8_PORTABLE") == "1"
    avx2 = not portable and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    try:
        cpp_extension.load(name="adainfer_q4q8_" + ("avx2" if avx2 else "portable"), sources=[str(_KERNEL_SOURCE)],
                           extra_cflags=["-O3", "-fopenmp"] + (["-mavx2", "-mfma"] if avx2 else []),
                           extra_ldflags=["-fopenmp"], is_python_module=False)
    except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
        raise AdainferError(what, f"could not build the quantized kernels {_KERNEL_SOURCE} ({e})") from None

    @torch.library.register_fake("adainfer::q4q8_linear")
    def _(x, qs, d, m):  # shapes for torch.compile
        return x.new_empty(x.shape[0], qs.shape[0], dtype=torch.float32)

    @torch.library.register_fake("adainfer::q8q8_linear")
    def _(x, qs, d):
        return x.new_empty(x.shape[0], qs.shape[0], dtype=torch.float32)

    _kernel_loaded = True


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q (N, K) in 0..15 -> (N, K / 2) uint8, GGUF Q4_1's order: in each group of 32, byte j holds element j in its
    low nibble and element 16 + j in its high nibble."""
    N, K = q.shape
    g = q.to(torch.uint8).view(N, K // INT4_GROUP, 2, INT4_GROUP // 2)
    return (g[:, :, 0] | (g[:, :, 1] << 4)).reshape(N, K // 2).contiguous()


@dataclass
class Int4Weight:
    """One matrix for the kernel: packed nibbles (N, K / 2) uint8; scale and low (N, K / 32) float32."""

    packed: torch.Tensor
    scale: torch.Tensor
    low: torch.Tensor

    @staticmethod
    def of(q: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> Int4Weight:
        return Int4Weight(pack_int4(q), scale.float().contiguous(), low.float().contiguous())


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """x (..., K) float32 or bfloat16 -> (..., N) float32 = x @ W.T with W = scale * q + low in groups of 32, through
    the C++ kernel: x is rounded to int8 per group of 32 (scale max|x| / 127, GGUF's Q8_1) and the products summed in
    integers, as llama.cpp does for Q4_1 weights. load_q4q8_kernel() first."""
    lead = x.shape[:-1]
    y = torch.ops.adainfer.q4q8_linear(x.reshape(-1, x.shape[-1]), packed, scale, low)
    return y.view(*lead, -1)


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (..., K) float32 or bfloat16 -> (..., N) float32 = x @ W.T with W = scale * q (quantize_int8), x rounded to
    int8 as in int4_linear. load_q4q8_kernel() first."""
    lead = x.shape[:-1]
    return torch.ops.adainfer.q8q8_linear(x.reshape(-1, x.shape[-1]), q, scale).view(*lead, -1)


def _round_inputs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' rounding of x (B, K) to int8 per group of 32, in float32 as they do it (ties fall the same way):
    qx (B, G, 32) and dx (B, G), float64."""
    B, K = x.shape
    xg = x.float().view(B, K // INT4_GROUP, INT4_GROUP)
    dx = xg.abs().amax(-1) / 127
    inv = torch.where(dx > 0, 1 / dx, 0.0)
    return (xg * inv[..., None]).round().double(), dx.double()


def _scaled_dots(qx: torch.Tensor, dx: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """sum over groups of scale * dx * (q . qx): qx (B, G, 32), dx (B, G), q (N, K) integers -> (B, N) float64."""
    dots = torch.einsum("bgj,ngj->bng", qx, q.double().view(q.shape[0], *qx.shape[1:]))  # (B, N, G)
    return (dots * scale.double() * dx[:, None]).sum(-1)


def int4_linear_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """int4_linear's arithmetic in plain torch, float64: x (B, K), q (N, K) in 0..15 -> (B, N)."""
    qx, dx = _round_inputs(x)
    return _scaled_dots(qx, dx, q, scale) + (low.double() * (dx * qx.sum(-1))[:, None]).sum(-1)


def int8_linear_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8_linear's arithmetic in plain torch, float64: x (B, K), q (N, K) int8 -> (B, N)."""
    return _scaled_dots(*_round_inputs(x), q, scale)


def quantize_model(model: Decoder) -> dict[str, tuple[torch.Tensor, ...]]:
    """Round every block matrix to int4 and the LM head to int8, as llama.cpp's Q4_1 files keep them (in place: the
    model's weights become the dequantized values, so eager prefill computes with what the kernels read). Returns
    quantize_int4's (q, scale, low) by name, and quantize_int8's (q, scale) for "head"."""
    if model.dtype not in (torch.float32, torch.bfloat16) or model.device.type != "cpu":
        got = f"{str(model.dtype)[6:]} on {model.device.type}"
        raise AdainferError("--decode int4", f"int4 weights run on the CPU in float32 or bfloat16 (got {got})")
    packed = {}
    named = [(f"layers.{i}.{n}", m) for i, block in enumerate(model.layers)
             for n, m in (("wqkv", block.attention.wqkv), ("wo", block.attention.wo),
                          ("w1", block.feed_forward.w1), ("w3", block.feed_forward.w3), ("w2", block.feed_forward.w2))]
    named.append(("head", model.output if model.output is not None else model.tok_embeddings))
    for name, module in named:
        w = module.weight
        if w.shape[1] % INT4_GROUP:
            raise AdainferError("--decode int4", f"{name} has {w.shape[1]} input columns, not a multiple of "
                                                 f"{INT4_GROUP}")
        if name == "head":  # the head decides the token: 8 bits (tied: the embedding table follows)
            packed[name] = quantize_int8(w)
            module.weight.data = dequantize_int8(*packed[name]).to(w.dtype)
        else:
            packed[name] = quantize_int4(w)
            module.weight.data = dequantize_int4(*packed[name]).to(w.dtype)
    model.quantized = "int4"
    return packed


def int8_head(model: Decoder) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's LM head rounded to int8 (quantize_int8: q, scale), built on first use (~0.3 s for the default
    model, and the kernels' build the first time on a machine) and kept on the model: the cheap exit check's weights
    (Plan.check_head). Call it before timing anything."""
    if model.dtype not in (torch.float32, torch.bfloat16):
        raise AdainferError("--check-head int8", f"needs a float32 or bfloat16 model, not {str(model.dtype)[6:]}")
    cached = getattr(model, "int8_head", None)
    if cached is None or cached[0] != model.head_weight.data_ptr():  # built for other weights (e.g. before int4)
        load_q4q8_kernel(what="--check-head int8")
        cached = model.head_weight.data_ptr(), *quantize_int8(model.head_weight)
        model.int8_head = cached
    return cached[1], cached[2]


def prepare_check_head(model: Decoder, check_head: str, candidates: torch.Tensor | None, where: str) -> None:
    """Refuse a check head that does not apply (`where` names the option), and round the int8 one now, before
    anything is timed."""
    if check_head == "full":
        return
    if model.device.type != "cpu" or candidates is not None:
        why = "on a GPU the fused kernel does the check" if model.device.type != "cpu" else \
            "candidate features read only the candidates' head rows"
        raise AdainferError(where, f"the {check_head} check head is for full-vocabulary checks on the CPU ({why})")
    int8_head(model)


def int8_head_logits(model: Decoder, x: torch.Tensor) -> torch.Tensor:
    """x (b, dim) head inputs -> float32 logits (b, V) through int8_head(model)."""
    return int8_linear(x, *int8_head(model))


# ---------------------------------------------------------------- the decode graph


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, k_new: torch.Tensor,
                     v_new: torch.Tensor) -> torch.Tensor:
    """One query per row, q (B, H, 1, hd), against the cached keys k, v (B, Hkv, S, hd) where mask (B, 1, 1, S) is
    True, and its own key and value k_new, v_new (B, Hkv, 1, hd); float32. The new key is taken apart from the cache
    so that the graph does not write the cache (inductor would copy it per block to keep the write functional).
    Written as products and sums, which inductor turns into loops: a bfloat16 bmm of a single query costs ~80 us a
    call on this CPU, SDPA 90-250 us."""
    B, H, _, hd = q.shape
    Hkv = k.shape[1]
    qg = q.reshape(B, Hkv, H // Hkv, 1, hd).float()  # (B, Hkv, g, 1, hd): query head h reads kv head h // g
    scores = (qg * k[:, :, None].float()).sum(-1) * hd ** -0.5  # (B, Hkv, g, S)
    scores = scores.masked_fill(~mask, float("-inf"))
    own = (qg * k_new[:, :, None].float()).sum(-1) * hd ** -0.5  # (B, Hkv, g, 1)
    p = torch.cat([scores, own], dim=-1).softmax(-1)
    y = (p[..., :-1, None] * v[:, :, None].float()).sum(-2) + p[..., -1:] * v_new.float()  # (B, Hkv, g, hd)
    return y.to(q.dtype).reshape(B, H, 1, hd)


class DecodeGraph:
    """Dense decode steps of `model`, every row through every block: __call__(tokens (B, 1), cache) -> float32
    logits (B, V), keys and values written into `cache` at cache.length (the caller advances it)."""

    def __init__(self, model: Decoder, mode: str = "compiled", int4: dict | None = None, compile: bool = True):
        c = model.config
        if c.arch != "llama":
            raise AdainferError("--decode", f"the {mode} decode graph supports Llama-family models, not {c.arch}")
        if mode == "int4" and int4 is None:
            raise AdainferError("--decode int4", "needs the packed weights from quantize_model")
        self.model, self.mode, self.config = model, mode, c
        L = c.n_layers
        # Weights stacked per kind, so the graph guards a dozen tensors instead of 7 per block. The model's own
        # parameters become views of the stacks (no second copy).
        blocks = model.layers
        self.attn_norm = _stack([b.attention_norm.weight for b in blocks])
        self.ffn_norm = _stack([b.ffn_norm.weight for b in blocks])
        if int4 is None:
            self.wqkv = _stack([b.attention.wqkv.weight for b in blocks])
            self.wo = _stack([b.attention.wo.weight for b in blocks])
            self.w1 = _stack([b.feed_forward.w1.weight for b in blocks])
            self.w3 = _stack([b.feed_forward.w3.weight for b in blocks])
            self.w2 = _stack([b.feed_forward.w2.weight for b in blocks])
        else:
            def packed(*names):  # (L, N, K / 2) uint8, scale and low (L, N, K / 32); several names: rows concatenated
                ws = [Int4Weight.of(*(torch.cat([int4[f"layers.{i}.{n}"][j] for n in names]) for j in range(3)))
                      for i in range(L)]
                return tuple(torch.stack([getattr(w, f) for w in ws]) for f in ("packed", "scale", "low"))
            self.wqkv, self.wo, self.w2 = packed("wqkv"), packed("wo"), packed("w2")
            self.w13 = packed("w1", "w3")  # gate and up as one kernel call
            self.head = int4["head"]  # int8: q (V, dim), scale (V, dim / 32)
        self.step = torch.compile(self.forward, dynamic=False) if compile else self.forward

    def lin(self, x: torch.Tensor, w, i: int) -> torch.Tensor:
        if isinstance(w, tuple):
            return int4_linear(x, w[0][i], w[1][i], w[2][i]).to(x.dtype)
        return linear(x, w[i])

    def forward(self, tokens: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                cache_k: torch.Tensor, cache_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """tokens (B, 1); cos, sin (B, 1, 1, hd); mask (B, 1, 1, S) the cached positions to attend to; cache_k,
        cache_v (L, B, Hkv, S, hd) -> logits (B, V) float32, and the new keys and values (L, B, Hkv, hd)."""
        c, model = self.config, self.model
        H, Hkv, hd = c.n_heads, c.n_kv_heads, c.head_dim
        B = tokens.shape[0]
        h = model.tok_embeddings.weight[tokens]  # (B, 1, dim)
        ks, vs = [], []
        for i in range(c.n_layers):
            x = rms_norm(h, self.attn_norm[i], c.norm_eps)
            q, k, v = self.lin(x, self.wqkv, i).split([H * hd, Hkv * hd, Hkv * hd], dim=-1)
            q = apply_rope(q.view(B, 1, H, hd).transpose(1, 2), cos, sin)  # (B, H, 1, hd)
            k = apply_rope(k.view(B, 1, Hkv, hd).transpose(1, 2), cos, sin)  # (B, Hkv, 1, hd)
            v = v.view(B, 1, Hkv, hd).transpose(1, 2)
            ks.append(k[:, :, 0])
            vs.append(v[:, :, 0])
            y = decode_attention(q, cache_k[i], cache_v[i], mask, k, v)  # (B, H, 1, hd)
            h = h + self.lin(y.transpose(1, 2).reshape(B, 1, H * hd), self.wo, i)
            x = rms_norm(h, self.ffn_norm[i], c.norm_eps)
            if self.mode == "int4":
                gate, up = self.lin(x, self.w13, i).split([c.hidden_dim, c.hidden_dim], dim=-1)
            else:
                gate, up = self.lin(x, self.w1, i), self.lin(x, self.w3, i)
            h = h + self.lin(F.silu(gate) * up, self.w2, i)
        x = model.head_input(h[:, -1])  # (B, dim)
        logits = int8_linear(x, *self.head) if self.mode == "int4" else head_logits(x, model.head_weight)
        return logits, torch.stack(ks), torch.stack(vs)

    def __call__(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        length = cache.length
        if length >= cache.max_len:
            raise AdainferError("decode", f"the KV cache holds {cache.max_len} positions, all written")
        positions = default_positions(None, cache, None, tokens.shape[0], 1, tokens.device)  # (B, 1)
        cos, sin = rope_cos_sin(self.model.inv_freq, positions, self.model.dtype)  # (B, 1, 1, hd)
        mask = cache.valid[:, None, None, :length]  # (B, 1, 1, S)
        k, v = cache.k[:, :, :, :length], cache.v[:, :, :, :length]
        if self.step is not self.forward:
            # The cache length changes every step: one graph for every length. Dynamo still takes the first cache's
            # size as a constant and compiles again, for every size, at a cache of another size (measured: two
            # compiles per batch size; warm up with two caches).
            for t in (k, v, mask):
                torch._dynamo.maybe_mark_dynamic(t, 3)
        with torch.inference_mode():
            logits, k_new, v_new = self.step(tokens, cos, sin, mask, k, v)
        cache.k[:, :, :, length] = k_new
        cache.v[:, :, :, length] = v_new
        cache.valid[:, length] = True
        return logits

def _stack(params: list[nn.Parameter]) -> torch.Tensor:
    stacked = torch.stack([p.data for p in params])
    for i, p in enumerate(params):
        p.data = stacked[i]
    return stacked


def decode_graph(model: Decoder, mode: str) -> DecodeGraph | None:
    """The model's decode graph for `mode` (built once, kept on the model), or None for eager decoding."""
    if mode not in DECODE_MODES:
        raise AdainferError("--decode", f"unknown mode {mode!r} (choose {', '.join(DECODE_MODES)})")
    if mode == "eager":
        return None
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise AdainferError("--decode", f"{mode} decoding compiles C++ through torch.compile and needs a C++ compiler; "
                                        f"{cxx!r} is not on PATH (install g++, or use --decode eager)")
    graph = getattr(model, "decode_graphs", {}).get(mode)
    if graph is None:
        if mode == "int4":
            load_q4q8_kernel()
        int4 = quantize_model(model) if mode == "int4" else None
        graph = DecodeGraph(model, mode, int4)
        # Rounding to int4 replaces the weights a compiled graph stacked: that graph would read the old ones.
        kept = {} if mode == "int4" else getattr(model, "decode_graphs", {})
        model.decode_graphs = {**kept, mode: graph}
    return graph
