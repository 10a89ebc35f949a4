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

The graph is `decode_one_token` over the model's own modules (the blocks the eager loop runs, as gpt-fast's
decode_one_token), the KV cache written at a position tensor, so one graph serves every cache length and size: it
compiles once per batch size (on first use about a minute for the 30-block default model on 2 cores; inductor caches
it on disk). Only dense decode steps go through it (every row runs all blocks); exit decisions, layer plans and
per-token exit stay on the eager loop. Every family (sliding layers write their ring at write_pos % window).

On a GPU, `compiled` means CUDA graphs instead (`Captured`): the same decode step, run eagerly once and captured,
then replayed with one launch per token (gpt-fast's lever against a host-bound loop, without inductor). A graph is
captured per batch size, depth and KV cache; the cache comes from the graph's pool (`DecodeGraph.cache`, one per
batch size, its capacity rounded up to a power of two) so the same graph serves every later prompt and length.
Sequence-mode exits stay in the graph world: a step in which every row runs the same first n blocks replays a graph
of depth n (captured on first use, the row's translator reading included); rows at different depths take the loop.
"""

from __future__ import annotations

import os
import shutil

import torch

from adainfer.errors import AdainferError
from adainfer.model import Context, Decoder, KVCache, default_positions
from adainfer.quant import (
    INT4_GROUP,
    QuantWeight,
    dequantize_int4,
    dequantize_int8,
    load_q4q8_kernel,
    quantize_int4,
)

DECODE_MODES = ("eager", "compiled", "int4")
MAX_GRAPHS = 32  # captured decode steps kept per model (batch sizes x depths x translators)


def quantize_model(model: Decoder) -> None:
    """Round every block matrix to int4 and the LM head to int8, as llama.cpp's Q4_1 files keep them: each Linear
    gets its int4 copy (`q4`; gate and up as one, `w13`) and the model its int8 head (`head_q8`), which a quantized
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
    for block in model.layers:
        mlp = block.feed_forward
        if hasattr(mlp, "w13"):
            mlp.w13 = QuantWeight(*(torch.cat([a, b]) for a, b in zip(
                (mlp.w1.q4.q, mlp.w1.q4.scale, mlp.w1.q4.low), (mlp.w3.q4.q, mlp.w3.q4.scale, mlp.w3.q4.low))))
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
    if model.device.type != "cpu" or candidates is not None:
        why = "on a GPU the fused kernel does the check" if model.device.type != "cpu" else \
            "candidate features read only the candidates' head rows"
        raise AdainferError(where, f"the {check_head} check head is for full-vocabulary checks on the CPU ({why})")
    if model.dtype not in (torch.float32, torch.bfloat16):
        raise AdainferError(where, f"needs a float32 or bfloat16 model, not {str(model.dtype)[6:]}")
    model.int8_head()


# ---------------------------------------------------------------- the decode step


def decode_one_token(model: Decoder, tokens: torch.Tensor, positions: torch.Tensor, cos, sin, valid: torch.Tensor,
                     write_pos: torch.Tensor, cache: KVCache, quantized: bool, depth: int | None = None,
                     reader=None) -> torch.Tensor:
    """tokens (B, 1) at positions (B, 1) through the first `depth` blocks (None: all) -> float32 logits (B, V); the
    keys and values go into `cache` at write_pos (1,), and attention reads the whole cache where valid (B, S) is set.
    A run stopped early reads its last state through `reader` (a Translator) where it has a map for that depth, as
    the block loop's exit_at does."""
    S = valid.shape[1]
    local = model.local_tables(positions, write_pos, valid, tokens.shape[0], 1, S, cache.ring, written=True)
    ctx = Context(cos, sin, valid[:, None, None, :], False, cache, write_pos=write_pos, quantized=quantized, **local)
    n = model.config.n_layers if depth is None else depth
    h = model.embed(tokens, positions)  # (B, 1, dim)
    for i, block in enumerate(model.layers[:n]):
        h = block(h, ctx, i)
    x = h[:, -1]  # (B, dim)
    if reader is not None and reader.reads(n, model.config.n_layers):
        x = reader.read(n, x)
    return model.softcap(model.head_q8(model.head_input(x))) if quantized else model.head(x)


class Captured:
    """One function of fixed-shape tensors replayed as a CUDA graph: its inputs are copied into static buffers, the
    graph replays, the output is cloned out. `fn` must be a pure step of its inputs plus state it writes the same way
    every time (the KV cache at the input position), so the warm-up runs before capture may write it too.
    graph=False runs the same static-buffer path without capture (how the CPU tests exercise it)."""

    def __init__(self, fn, inputs: list[torch.Tensor], graph: bool = True, pool=None):
        self.fn, self.inputs, self.graph = fn, [t.clone() for t in inputs], None
        if not graph:
            return
        stream = torch.cuda.Stream()  # warm-up off the default stream, as torch.cuda.graphs asks
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        # `pool`: one memory pool for all of a DecodeGraph's captures. They never replay at once and each output is
        # cloned out right after its replay, so one graph's intermediates may reuse another's memory.
        with torch.cuda.graph(self.graph, pool=pool):
            self.output = fn(*self.inputs)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        for static, t in zip(self.inputs, inputs):
            static.copy_(t)
        if self.graph is None:
            return self.fn(*self.inputs)
        self.graph.replay()
        return self.output.clone()


class DecodeGraph:
    """Decode steps of `model` with every row through the same first blocks: __call__(tokens (B, 1), cache, depth,
    reader) -> float32 logits (B, V), keys and values written into `cache` at cache.length (the caller advances it).

    On the CPU one torch.compile graph of the full depth (`serves` says which steps it takes); on CUDA one captured
    graph per batch size, depth and cache (`Captured`), any depth. compile=False runs the step eagerly (tests)."""

    def __init__(self, model: Decoder, mode: str = "compiled", compile: bool = True, capture: bool | None = None):
        self.model, self.quantized = model, mode == "int4"
        # capture=True on the CPU runs the captured path's static buffers without a CUDA graph (tests).
        self.capture = (compile and model.device.type == "cuda") if capture is None else capture
        self.graphs: dict[tuple, Captured] = {}  # in order of last use, at most MAX_GRAPHS
        self.mempool = None
        self.pool: dict[int, KVCache] = {}
        if self.capture or not compile:
            self.step = decode_one_token
            return
        # Dynamo would check every parameter and buffer of the model (~700 tensors, 0.85 ms of a 7 ms step) before each
        # call; the modules are fixed for the graph's life (int4 rounding makes a new graph, decode_graph).
        # Inductor would also assert the size and stride of each of those inputs and of every kernel's output at each
        # call (~600 Python calls a step, 0.4 ms of it): the shapes are fixed by the modules.
        options = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe, "size_asserts": False}
        self.step = torch.compile(decode_one_token, dynamic=False, options=options)

    def serves(self, depth: int) -> bool:
        """Whether a step in which every row runs the first `depth` blocks goes through the graph (the compiled CPU
        graph is built for the full depth only: a compile per depth would cost about a minute each)."""
        return self.capture or self.step is decode_one_token or depth == self.model.config.n_layers

    def cache(self, batch: int, max_len: int) -> KVCache:
        """A KV cache for `batch` rows and `max_len` positions, emptied. On CUDA the graph's own (captured graphs
        hold its addresses): one per batch size, replaced (with its graphs) by a larger one when it is outgrown."""
        model = self.model
        if not self.capture:
            return KVCache(model.local, batch, max_len, model.dtype, model.device)
        cache = self.pool.get(batch)
        if cache is None or cache.max_len < max_len:
            size = max(64, 1 << (max_len - 1).bit_length())
            cache = self.pool[batch] = KVCache(model.local, batch, size, model.dtype, model.device)
            self.graphs = {k: g for k, g in self.graphs.items() if k[0] != batch}
        cache.valid.zero_()
        cache.length, cache.padded = 0, False
        return cache

    def __call__(self, tokens: torch.Tensor, cache: KVCache, depth: int | None = None, reader=None) -> torch.Tensor:
        length, model = cache.length, self.model
        if length >= cache.max_len:
            raise AdainferError("decode", f"the KV cache holds {cache.max_len} positions, all written")
        depth = model.config.n_layers if depth is None else depth
        if not self.serves(depth):
            raise AdainferError("decode", f"the compiled CPU graph runs all {model.config.n_layers} blocks, "
                                          f"not {depth}")
        with torch.inference_mode():
            # Every input an inference tensor whoever made it: dynamo guards on the kind and would compile again.
            tokens = tokens.clone()
            positions = default_positions(None, cache, None, tokens.shape[0], 1, tokens.device)  # (B, 1)
            cache.valid[:, length] = True
            write_pos = torch.tensor([length], device=tokens.device)
            if self.capture:
                return self._replay(tokens, positions, write_pos, cache, depth, reader)
            cos, sin = model.rotary_tables(positions)  # (B, 1, 1, hd)
            if self.step is not decode_one_token and not getattr(cache, "dynamic", False):
                # One graph for every cache size (the batch size stays static); marked once per cache.
                full = [t for kv in (cache.k, cache.v) for t, ring in zip(kv, cache.rings) if not ring]
                for t in [*full, cache.valid]:  # (a sliding layer's ring is the window's size: static)
                    torch._dynamo.mark_dynamic(t, t.dim() - 2 if t is not cache.valid else 1)
                cache.dynamic = True
            return self.step(model, tokens, positions, cos, sin, cache.valid, write_pos, cache, self.quantized,
                             depth, reader)

    def _replay(self, tokens, positions, write_pos, cache: KVCache, depth: int, reader) -> torch.Tensor:
        model = self.model
        if self.pool.get(tokens.shape[0]) is not cache:
            raise AdainferError("decode", "a captured decode step writes the graph's own KV cache (DecodeGraph.cache), "
                                          "whose addresses its graphs hold")
        if reader is not None and not reader.reads(depth, model.config.n_layers):
            reader = None  # not read at this depth: the same graph whichever translator the rule carries
        key = (tokens.shape[0], depth, id(cache), id(reader))
        graph = self.graphs.pop(key, None)
        if graph is None:
            while len(self.graphs) >= MAX_GRAPHS:  # least recently used first (each new rule brings new maps)
                self.graphs.pop(next(iter(self.graphs)))
            if tokens.is_cuda and self.mempool is None:
                self.mempool = torch.cuda.graph_pool_handle()

            def step(tokens, positions, write_pos):
                cos, sin = model.rotary_tables(positions)  # (B, 1, 1, hd)
                return decode_one_token(model, tokens, positions, cos, sin, cache.valid, write_pos, cache, False,
                                        depth, reader)

            graph = Captured(step, [tokens, positions, write_pos], graph=tokens.is_cuda, pool=self.mempool)
        self.graphs[key] = graph  # (re)inserted last: the dict is in order of use
        return graph(tokens, positions, write_pos)


def decode_graph(model: Decoder, mode: str) -> DecodeGraph | None:
    """The model's decode graph for `mode` (built once, kept on the model), or None for eager decoding."""
    if mode not in DECODE_MODES:
        raise AdainferError("--decode", f"unknown mode {mode!r} (choose {', '.join(DECODE_MODES)})")
    if mode == "eager":
        return None
    if model.shard is not None:
        raise AdainferError("--decode", f"{mode} decoding is not built for tensor-parallel runs (--tp): use --decode "
                                        "eager")
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None and not (mode == "compiled" and model.device.type == "cuda"):
        raise AdainferError("--decode", f"{mode} decoding compiles C++ through torch.compile and needs a C++ compiler; "
                                        f"{cxx!r} is not on PATH (install g++, or use --decode eager)")
    graph = getattr(model, "decode_graphs", {}).get(mode)
    if graph is None:
        if mode == "int4":
            quantize_model(model)
        graph = DecodeGraph(model, mode)
        # Rounding to int4 replaces the weights a compiled float graph read: drop it.
        kept = {} if mode == "int4" else getattr(model, "decode_graphs", {})
        model.decode_graphs = {**kept, mode: graph}
    return graph
