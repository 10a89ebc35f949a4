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

The graph is `decode_step` over the model's own modules (the blocks the eager loop runs, as gpt-fast's
decode_one_token), the KV cache written at a position tensor, so one graph serves every cache length and size: it
compiles once per batch size (on first use about a minute for the 30-block default model on 2 cores; inductor caches
it on disk). Of the exit loop's steps only dense ones go through it (every row runs all blocks); exit decisions,
layer plans and per-token exit stay on the eager loop. Every family (sliding layers write their ring at write_pos %
window). Self-speculative decoding (adainfer.speculative) compiles two more kinds: a draft step (its block subset,
its head rows) and a verify step (T tokens a row, each query seeing the cache up to its own slot), one variant per
batch size, token count, block list and head.

On a GPU, `compiled` means CUDA graphs (`Captured`): the decode step, run once and captured, then replayed with one
launch per token (gpt-fast's lever against a host-bound loop), its blocks compiled by inductor first (`fuse`). A
graph is captured per batch-size bucket (powers of two), depth and KV cache; the cache comes from the graph's pool
(`DecodeGraph.cache`, one per bucket, its capacity rounded up to a power of two; a batch of 3 gets the first rows of
the 4-row one) so the same graph serves every later prompt, length and batch size of its bucket.
Sequence-mode exits stay in the graph world: a step in which every row runs the same first n blocks replays a graph
of depth n (captured on first use, the row's translator reading included); rows at different depths take the loop.
`DecodeGraph(fuse=...)` says what the graphs replay: the eager step (`none`), each block and the head compiled by
inductor (`blocks`, the default: one compile per block index and batch shape, shared by every depth), or the whole step
compiled (`step`: one compile per depth), or the blocks compiled with inductor's coordinate-descent tuning (`tuned`: a
batch-1 GEMV becomes a tuned Triton reduction instead of a cuBLAS call), or the whole step so (`tuned_step`: gpt-fast's
configuration, CUDA graphs of a step compiled with coordinate-descent tuning); the last two not yet measured on a GPU.
On an H100 (benchmarks/results/gpu_check_h100_run3.json, 1B-shaped, bf16) `blocks` decodes in 0.59-0.63x the eager
capture's time and `step` 3% faster still, but `step` compiles again for each exit depth a generation reaches; `blocks`
compiles ~9-12 s once per batch-size bucket. Inductor's kernels round differently from the eager ones in the last
bits: `none` replays the block loop's kernels (at a power-of-two batch size exactly; other sizes run padded to their
bucket, whose matmuls may round differently), and is the default where Triton has no C compiler (default_fuse).

A prompt's forward has its own levers (--prefill compiled / captured): adainfer.fast_prefill.
"""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass

import torch

from adainfer.capture import Captured
from adainfer.errors import AdainferError
from adainfer.exit import check_int8_head
from adainfer.kv_cache import KVCache
from adainfer.model import Context, Decoder, default_positions, gate_up_way
from adainfer.quant import (
    INT4_GROUP,
    QuantWeight,
    dequantize_int4,
    dequantize_int8,
    head_logits,
    load_q4q8_kernel,
    quantize_int4,
)

DECODE_MODES = ("eager", "compiled", "int4")
FUSES = ("none", "blocks", "step", "tuned", "tuned_step")  # what a captured graph replays (DecodeGraph)
# On a GPU. H100, 1B-shaped model, bf16 (benchmarks/results/gpu_check_h100_run3.json): ms/token at batch 1 / 8,
# none 2.25 / 2.42, blocks 1.41 / 1.42, step 1.37 / 1.39; first calls at full and half depth (compiles, captures)
# 0.8, 12 and 13 s: step compiles again for every exit depth, blocks once for all: blocks. gpu_check measures all.
FUSE_DEFAULT = "blocks"
ATTENTIONS = ("sdpa", "triton")  # DecodeGraph's attention: torch's SDPA, or adainfer.kernels.attention.decode_attention
MAX_GRAPHS = 32  # captured decode steps kept per model (batch-size buckets x depths x translators)
# Dynamo would check every parameter and buffer of the model (~700 tensors, 0.85 ms of a 7 ms step) before each call;
# the modules are fixed for the graph's life (int4 rounding makes a new graph, decode_graph). Inductor would also
# assert the size and stride of each of those inputs and of every kernel's output at each call (~600 Python calls a
# step, 0.4 ms of it): the shapes are fixed by the modules.
COMPILE_OPTIONS = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe, "size_asserts": False}
# fuse="tuned": inductor's coordinate-descent tuning of each Triton kernel's launch configuration, which on a GPU also
# writes a one-row matmul (a batch-1 GEMV) as its own Triton reduction, fused with the norm before it, instead of
# calling cuBLAS (torch._inductor.decomposition.mm: "our matrix vector multiplies only achieve peak bandwidth with
# coordinate descent tuning"; gpt-fast's setting). Longer compiles (each kernel benchmarked); on the CPU the same C++.
TUNED_OPTIONS = {**COMPILE_OPTIONS, "coordinate_descent_tuning": True}


def quantize_model(model: Decoder) -> None:
    """Round every block matrix to int4 and the LM head to int8, as llama.cpp's Q4_1 files keep them: each Linear
    gets its int4 copy (`q4`; gate and up as one matrix, `w13`) and the model its int8 head (`head_q8`), which a
    forward (Context.quantized) reads through the kernels; the float weights become the dequantized values, so the
    eager loop (prefill, exit checks) computes with what the kernels read."""
    if model.dtype not in (torch.float32, torch.bfloat16) or model.device.type != "cpu":
        got = f"{str(model.dtype)[6:]} on {model.device.type}"
        raise AdainferError("--decode int4", f"int4 weights run on the CPU in float32 or bfloat16 (got {got})")
    load_q4q8_kernel()
    linears = [m for block in model.layers for m in block.modules() if hasattr(m, "q4")]
    for module in linears + [model.output if model.output is not None else model.tok_embeddings]:
        if module.weight.shape[1] % INT4_GROUP:
            raise AdainferError("--decode int4", f"a matrix has {module.weight.shape[1]} input columns, not a "
                                                 f"multiple of {INT4_GROUP}")
    for module in linears:
        q, scale, low = quantize_int4(module.weight)
        module.weight.data = dequantize_int4(q, scale, low).to(module.weight.dtype)
        module.q4 = QuantWeight.int4(q, scale, low)
    head = model.output if model.output is not None else model.tok_embeddings  # 8 bits: it decides the token
    q8 = model.int8_head()
    head.weight.data = dequantize_int8(q8.q, q8.scale).to(head.weight.dtype)
    model.int8_head()  # again, for the replaced weights: the same int8 values
    model.quantized = "int4"


def prepare_check_head(model: Decoder, check_head: str, candidates: torch.Tensor | None, where: str) -> None:
    """Refuse a check head that does not apply (`where` names the option), and round the int8 one now, before
    anything is timed."""
    if check_head == "full":
        return
    if candidates is not None:
        raise AdainferError(where, f"the {check_head} check head is for full-vocabulary checks (candidate features "
                                   f"read only the candidates' head rows)")
    if model.device.type == "cpu" and model.dtype not in (torch.float32, torch.bfloat16):  # (the C++ kernels')
        raise AdainferError(where, f"needs a float32 or bfloat16 model on the CPU, not {str(model.dtype)[6:]}")
    check_int8_head(model, where)
    model.int8_head()


# ---------------------------------------------------------------- the decode step


def decode_step(model: Decoder, tokens: torch.Tensor, positions: torch.Tensor, cos, sin, valid: torch.Tensor,
                write_pos: torch.Tensor, cache: KVCache, quantized: bool, layers: tuple[int, ...] | None = None,
                reader=None, head=None, attend: torch.Tensor | None = None, parts: Parts | None = None,
                attention: str = "sdpa") -> torch.Tensor:
    """tokens (B, T) at positions (B, T) through the blocks `layers` (indices in order; None: all) -> float32 logits
    (B, T, V) over the head's rows `head` (None: the whole head, int8 when quantized; a tensor of head rows; or a
    QuantWeight of them). The keys and values go into `cache` at slots write_pos (T,), and query t attends to every
    slot up to its own where valid (B, S) is set. T is 1 in a decode step, the drafts plus one in a speculative
    verify step. A run of the first n blocks reads its last state through `reader` (a Translator) where it has a map
    for block n, as the block loop's exit_at does. `attend` (B, 1, T, S), when given, says which slots each query
    sees instead. `parts`: the block and head functions to call (compiled ones for a fused capture; default: the
    modules themselves). `attention`: what one new query a row attends through on a GPU (ATTENTIONS)."""
    B, T = tokens.shape
    S, L = valid.shape[1], model.config.n_layers
    parts = parts or EAGER
    local = model.local_tables(positions, write_pos[:1], valid, B, T, S, cache.ring, written=True)
    if attend is None and T == 1:
        attend = valid[:, None, None, :]  # (B, 1, 1, S): every written slot is at or before the new one
    elif attend is None:  # (B, 1, T, S): the earlier slots and the new ones up to the query's own
        slots = torch.arange(S, device=valid.device)
        attend = (valid[:, None, :] & (slots[None, :] <= write_pos[:, None])[None])[:, None]
    ctx = Context(cos, sin, attend, False, cache, write_pos=write_pos, quantized=quantized, attention=attention,
                  **local)
    order = range(L) if layers is None else layers
    h = model.embed(tokens, positions)  # (B, T, dim)
    for i in order:
        h = parts.block(model.layers[i], h, ctx, i)
    return read_head(model, h.reshape(B * T, -1), len(order), reader, head, quantized, parts.head).view(B, T, -1)


def read_head(model: Decoder, x: torch.Tensor, n: int, reader=None, head=None, quantized: bool = False,
              final: Callable | None = None) -> torch.Tensor:
    """States x (b, dim) after n blocks -> float32 logits (b, V): through `reader` where it maps block n, the final
    norm, the head rows `head` (None: the whole head, its int8 copy when quantized; a tensor of rows; a QuantWeight),
    the family's soft-capping. `final`: what does the part after the translator (default final_logits; a compiled
    one in a fused capture)."""
    if reader is not None and reader.reads(n, model.config.n_layers):
        x = reader.read(n, x)
    return (final or final_logits)(model, x, head, quantized)


def final_logits(model: Decoder, x: torch.Tensor, head=None, quantized: bool = False) -> torch.Tensor:
    """read_head after the translator: the final norm, the head (rows), the soft-capping."""
    x = model.head_input(x)
    if head is None:
        logits = model.head_q8(x) if quantized else head_logits(x, model.head_weight)
    else:
        logits = head(x) if isinstance(head, QuantWeight) else head_logits(x, head)
    return model.softcap(logits)


def run_block(block: torch.nn.Module, h: torch.Tensor, ctx: Context, layer: int) -> torch.Tensor:
    return block(h, ctx, layer)


@dataclass(frozen=True)
class Parts:
    """What a decode step calls for each block and for the head (after any translator)."""

    block: Callable = run_block  # (block, h (B, T, dim), ctx, layer) -> (B, T, dim)
    head: Callable = final_logits  # (model, x (B * T, dim), head rows, quantized) -> float32 (B * T, V)


EAGER = Parts()


def compiled_parts(options: dict = COMPILE_OPTIONS) -> Parts:
    """The block and the head compiled by inductor (norms, rotary, cache writes and elementwise tails fused around
    the matmuls): one compile per block index and batch shape, and per head, which every depth, translator and block
    list then shares (a compile of the whole step would be one per depth)."""
    return Parts(torch.compile(run_block, dynamic=False, options=options),
                 torch.compile(final_logits, dynamic=False, options=options))


def pool_capacity(max_len: int) -> int:
    """A pooled KV cache's capacity for max_len positions: a power of two, at least 64 (few sizes: few captures)."""
    return max(64, 1 << (max_len - 1).bit_length())


def emptied(cache: KVCache) -> KVCache:
    """A pooled cache handed out again: nothing written, nothing valid."""
    cache.valid.zero_()
    cache.length, cache.padded = 0, False
    return cache


def check_compilable(model: Decoder, option: str, what: str, compiler: bool) -> None:
    """Refuse `what` (a torch.compile path, chosen by `option`) for a tensor-parallel model, and where it compiles
    (`compiler`) without the compiler inductor needs on PATH: C++ on the CPU, C on a GPU (Triton builds its kernels'
    launchers with one)."""
    if model.shard is not None:
        raise AdainferError(option, f"{what} is not built for tensor-parallel runs (--tp): use {option} eager")
    if not compiler:
        return
    if model.device.type == "cuda":
        if c_compiler() is None:
            raise AdainferError(option, f"{what} compiles Triton kernels through torch.compile, whose launchers need a "
                                        f"C compiler: {'$CC' if os.environ.get('CC') else 'gcc, clang'} not on PATH "
                                        f"(install gcc, or use {option} eager)")
        return
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise AdainferError(option, f"{what} compiles C++ through torch.compile and needs a C++ compiler; {cxx!r} is "
                                    f"not on PATH (install g++, or use {option} eager)")


def c_compiler() -> str | None:
    """The C compiler Triton would build its launchers with ($CC as given, else gcc, else clang), or None."""
    cc = os.environ.get("CC")
    return shutil.which(cc) if cc else shutil.which("gcc") or shutil.which("clang")


def check_attention(attention: str, device: torch.device) -> str:
    """`attention` if this device can run it: the Triton kernel needs a GPU (or Triton's interpreter: tests)."""
    if attention not in ATTENTIONS:
        raise AdainferError("attention", f"unknown {attention!r} (choose {', '.join(ATTENTIONS)})")
    if attention == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise AdainferError("attention", "the Triton decode attention runs on a CUDA GPU (on the CPU decode steps "
                                         "attend through adainfer.model.cache_attention)")
    return attention


def default_fuse(device: torch.device) -> str:
    """What a captured decode graph on `device` replays unless told (DecodeGraph's fuse): FUSE_DEFAULT on a GPU with
    a C compiler for inductor's Triton kernels; the eager step's kernels otherwise (no compiler needed)."""
    return FUSE_DEFAULT if device.type == "cuda" and c_compiler() is not None else "none"


def rotary_step(model: Decoder, tokens: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor,
                write_pos: torch.Tensor, cache: KVCache, layers, reader, head, parts: Parts | None = None,
                attention: str = "sdpa") -> torch.Tensor:
    """decode_step with its rotary tables made from the positions: the whole of a captured step."""
    cos, sin = model.rotary_tables(positions)  # (B, 1, T, hd)
    return decode_step(model, tokens, positions, cos, sin, valid, write_pos, cache, False, layers, reader, head,
                       parts=parts, attention=attention)


class DecodeGraph:
    """Decode steps of `model`: __call__(tokens (B, T), cache, depth or layers, reader, head) -> float32 logits (B, V)
    for one token a row, (B, T, V) for T; keys and values written into `cache` at cache.length.. (the caller advances
    it). The exit loop's steps run every row through the same first `depth` blocks; a speculative draft runs its
    block subset (`layers`) with its own head rows (`head`), and the verify step T tokens a row through every block.

    On the CPU one torch.compile graph per batch size, token count, block list and head (`serves` says which exit
    depths go through one: the full depth only); on CUDA one captured graph per batch-size bucket, token count, block
    list, head and cache (`Captured`), any depth. compile=False runs the step eagerly (tests)."""

    def __init__(self, model: Decoder, mode: str = "compiled", compile: bool = True, capture: bool | None = None,
                 fuse: str | None = None, attention: str = "sdpa", gate_up: str | None = None):
        self.model, self.quantized = model, mode == "int4"
        # gate_up: the MLP's gate and up as "one" product or "two" in this graph's steps (GatedMLP.SPLIT set around
        # each call); None: as model.gate_up_split decides (gpu_check --variants blocks:two times the other way)
        if gate_up not in (None, "one", "two"):
            raise AdainferError("gate_up", f"unknown {gate_up!r} (choose one, two)")
        self.gate_up = gate_up
        # attention: what one new query a row attends through on a GPU: "sdpa" (torch's, a boolean mask) or "triton"
        # (adainfer.kernels.attention.decode_attention: one kernel; gpu_check --variants blocks:triton times it)
        self.attention = check_attention(attention, model.device)
        # capture=True on the CPU runs the captured path's static buffers without a CUDA graph (tests).
        self.capture = (compile and model.device.type == "cuda") if capture is None else capture
        self.graphs: dict[tuple, Captured] = {}  # in order of last use, at most MAX_GRAPHS
        self.mempool = None
        self.pool: dict[int, KVCache] = {}
        # fuse (a captured path's option): what a captured graph replays.
        #   none    the eager step: ~30 kernels a block (norms in float32, rotary, cache writes each their own)
        #   blocks  each block and the head compiled by inductor (compiled_parts): a few fused kernels a block, one
        #           compile per block index and batch shape that every depth shares
        #   step    the whole step compiled: also fuses across blocks, but one compile per graph key (each depth)
        #   tuned   blocks, with inductor's coordinate-descent tuning (TUNED_OPTIONS: batch-1 GEMVs as tuned Triton
        #           reductions fused with their norms; gpu_check measures it beside the default)
        #   tuned_step  step, so tuned (gpt-fast's configuration: fusions across blocks too; one compile per depth)
        # Float rounding differs from the eager step's in the last bits. Default: default_fuse (FUSE_DEFAULT on a GPU).
        fuse = default_fuse(model.device) if fuse is None else fuse
        if fuse not in FUSES:
            raise AdainferError("fuse", f"unknown {fuse!r} (choose {', '.join(FUSES)})")
        self.fuse = fuse if self.capture else "none"
        self.replay_step = rotary_step
        if self.fuse in ("step", "tuned_step"):
            self.replay_step = torch.compile(rotary_step, dynamic=False,
                                             options=TUNED_OPTIONS if self.fuse == "tuned_step" else COMPILE_OPTIONS)
        elif self.fuse in ("blocks", "tuned"):
            parts = compiled_parts(TUNED_OPTIONS if self.fuse == "tuned" else COMPILE_OPTIONS)
            self.replay_step = functools.partial(rotary_step, parts=parts)
        self.step = decode_step if self.capture or not compile else \
            torch.compile(decode_step, dynamic=False, options=COMPILE_OPTIONS)
        if self.fuse != "none" or self.step is not decode_step:
            # One compiled variant per batch size, token count, block list and head (and captured depth, translator;
            # with fuse="blocks" or "tuned" per block index, batch bucket and cache size, and both count against
            # run_block's one limit): dynamo's default of 8 variants per function is met by a speculative run at two
            # batch sizes, and past it steps silently run uncompiled.
            limit = max(64, 32 * model.config.n_layers)
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
            torch._dynamo.config.accumulated_recompile_limit = max(
                torch._dynamo.config.accumulated_recompile_limit, 4 * limit)

    def serves(self, depth: int) -> bool:
        """Whether an exit-loop step in which every row runs the first `depth` blocks goes through the graph (on the
        CPU only the full depth: a compile per depth would cost about a minute each)."""
        return self.capture or self.step is decode_step or depth == self.model.config.n_layers

    def cache(self, batch: int, max_len: int) -> KVCache:
        """A KV cache for `batch` rows and `max_len` positions, emptied. On CUDA the graph's own (captured graphs
        hold its addresses): one per batch-size bucket (a power of two: a batch of 3 is the first rows of a 4-row
        cache, and its steps replay the 4-row graphs, the spare rows attending to themselves), replaced (with its
        graphs) by a larger one when it is outgrown. Captures (per depth, token count, translator and head) and, with
        fuse="blocks", compiles are then per bucket, not per batch size."""
        model = self.model
        if not self.capture:
            return KVCache(model.local, batch, max_len, model.dtype, model.device)
        rows = 1 << (batch - 1).bit_length()
        cache = self.pool.get(rows)
        if cache is None or cache.max_len < max_len:
            cache = self.pool[rows] = KVCache(model.local, rows, pool_capacity(max_len), model.dtype, model.device)
            self.graphs = {k: g for k, g in self.graphs.items() if k[0] != rows}
            if not self.graphs:
                # The next capture takes a new memory pool: the allocator keeps a pool whose graphs are all gone until
                # its memory is freed, and a capture into it then fails an internal assert (on an H100, torch 2.11: a
                # short generation, then a longer one that outgrew the cache).
                self.mempool = None
        emptied(cache)
        return cache if rows == batch else cache.first_rows(batch)

    def __call__(self, tokens: torch.Tensor, cache: KVCache, depth: int | None = None, reader=None,
                 layers: list[int] | None = None, head=None) -> torch.Tensor:
        if self.gate_up is None:
            return self._step(tokens, cache, depth, reader, layers, head)
        with gate_up_way(self.gate_up == "two"):
            return self._step(tokens, cache, depth, reader, layers, head)

    def _step(self, tokens: torch.Tensor, cache: KVCache, depth: int | None, reader, layers: list[int] | None,
              head) -> torch.Tensor:
        length, model = cache.length, self.model
        B, T = tokens.shape
        L = model.config.n_layers
        if length + T > cache.max_len:
            raise AdainferError("decode", f"the KV cache holds {cache.max_len} positions, {length} written: no room "
                                          f"for {T} more")
        if T > 1 and cache.ring is not None:
            raise AdainferError("decode", "several tokens a row in one step are not built for a sliding window's ring "
                                          "cache")
        if layers is None:
            depth = L if depth is None else depth
            if not self.serves(depth):
                raise AdainferError("decode", f"the compiled CPU graph runs all {L} blocks, not {depth}")
            layers = range(depth)
        layers = None if list(layers) == list(range(L)) else tuple(layers)
        if self.capture and cache.parent is not None:  # the first B rows of a bucket's cache: its graphs, padded
            if B != cache.valid.shape[0]:
                raise AdainferError("decode", f"{B} rows of tokens for a cache of {cache.valid.shape[0]}")
            full = cache.parent
            full.length, full.padded = cache.length, cache.padded
            # The spare rows attend to their new slots only (nothing earlier valid: their positions stay 0..T-1, what a
            # speculative rollback of the real rows' slots would otherwise leave growing past the position table).
            full.valid[B:].zero_()
            spare = tokens.new_zeros(full.valid.shape[0] - B, T)
            return self(torch.cat([tokens, spare]), full, layers=layers, reader=reader, head=head)[:B]
        if reader is not None and not reader.reads(L if layers is None else len(layers), L):
            reader = None  # not read at this depth: the same graph whichever translator the rule carries
        with torch.inference_mode():
            # Every input an inference tensor whoever made it: dynamo guards on the kind and would compile again.
            tokens = tokens.clone()
            positions = default_positions(None, cache, None, B, T, tokens.device)  # (B, T)
            cache.valid[:, length:length + T] = True
            write_pos = length + torch.arange(T, device=tokens.device)  # (T,)
            if self.capture:
                logits = self._replay(tokens, positions, write_pos, cache, layers, reader, head)
            else:
                cos, sin = model.rotary_tables(positions)  # (B, 1, T, hd)
                if self.step is not decode_step and not getattr(cache, "dynamic", False):
                    # One graph for every cache size (the batch size stays static); marked once per cache.
                    full = [t for kv in (cache.k, cache.v) for t, ring in zip(kv, cache.rings) if not ring]
                    for t in [*full, cache.valid]:  # (a sliding layer's ring is the window's size: static)
                        torch._dynamo.mark_dynamic(t, t.dim() - 2 if t is not cache.valid else 1)
                    cache.dynamic = True
                logits = self.step(model, tokens, positions, cos, sin, cache.valid, write_pos, cache, self.quantized,
                                   layers, reader, head, attention=self.attention)
        return logits[:, 0] if T == 1 else logits

    def _replay(self, tokens, positions, write_pos, cache: KVCache, layers, reader, head) -> torch.Tensor:
        model = self.model
        if self.pool.get(tokens.shape[0]) is not cache:
            raise AdainferError("decode", "a captured decode step writes the graph's own KV cache (DecodeGraph.cache), "
                                          "whose addresses its graphs hold")
        key = (*tokens.shape, layers, id(cache), id(reader), id(head))
        graph = self.graphs.pop(key, None)
        if graph is None:
            while len(self.graphs) >= MAX_GRAPHS:  # least recently used first (each new rule brings new maps)
                self.graphs.pop(next(iter(self.graphs)))  # (others stay: the pool is still theirs)
            if tokens.is_cuda and self.mempool is None:
                self.mempool = torch.cuda.graph_pool_handle()

            def step(tokens, positions, write_pos):
                return self.replay_step(model, tokens, positions, cache.valid, write_pos, cache, layers, reader, head,
                                        attention=self.attention)

            graph = Captured(step, [tokens, positions, write_pos], graph=tokens.is_cuda, pool=self.mempool)
        self.graphs[key] = graph  # (re)inserted last: the dict is in order of use
        return graph(tokens, positions, write_pos)


def decode_graph(model: Decoder, mode: str) -> DecodeGraph | None:
    """The model's decode graph for `mode` (built once, kept on the model), or None for eager decoding."""
    if mode not in DECODE_MODES:
        raise AdainferError("--decode", f"unknown mode {mode!r} (choose {', '.join(DECODE_MODES)})")
    if mode == "eager":
        return None
    # (On a GPU, compiled decoding without a C compiler captures the eager step's kernels, default_fuse; int4 is
    # refused there by quantize_model.)
    check_compilable(model, "--decode", f"{mode} decoding", compiler=model.device.type == "cpu")
    graph = getattr(model, "decode_graphs", {}).get(mode)
    if graph is None:
        if mode == "int4":
            quantize_model(model)
        graph = DecodeGraph(model, mode)
        # Rounding to int4 replaces the weights a compiled float graph read: drop it.
        kept = {} if mode == "int4" else getattr(model, "decode_graphs", {})
        model.decode_graphs = {**kept, mode: graph}
    return graph
