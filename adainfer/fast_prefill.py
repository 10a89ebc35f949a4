"""A prompt's forward, faster (--prefill): its blocks compiled, or replayed from CUDA graphs.

The eager block loop (Decoder.forward: exit checks between blocks, rows compacted as they exit, padding, the KV
cache) calls each block through the model's `prefill_block` when one is set; `prefill_mode` sets it:

  eager     the modules (~45 dispatched ops a block).
  compiled  each block call through inductor (`compile_prefill`): norms, rotary, cache writes and the MLP's
            elementwise tail fused around the matmuls. CPU and GPU.
  captured  those compiled blocks replayed from CUDA graphs (`PrefillGraphs`), one capture per block, prompt shape
            and kind of call: on a GPU a prompt below ~2048 tokens is host-bound, and a replay is one launch a block.
            generate and the eval left-pad prompt batches to a multiple of PREFILL_PAD for it, so that prompts of
            many lengths share captures.

The decode step's graphs live in adainfer.fast_decode, with what both paths use (the compiler check, the helpers
of the pooled KV caches).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from adainfer.capture import Captured, require_cuda
from adainfer.errors import AdainferError
from adainfer.fast_decode import check_compilable, emptied, pool_capacity
from adainfer.kv_cache import KVCache
from adainfer.model import Context, Decoder

PREFILL_MODES = ("eager", "compiled", "captured")  # how a prompt's blocks run (prefill_mode)
MAX_PREFILL_LANES = 32  # prompt shapes whose captured blocks a model keeps (PrefillGraphs)
MAX_PREFILL_CACHES = 4  # KV caches PrefillGraphs hands out for generation, kept with their addresses
PREFILL_PAD = 64  # --prefill captured: prompt lengths rounded up to a multiple of this (fewer shapes to capture)


def prefill_block(block: torch.nn.Module, h: torch.Tensor, ctx: Context, layer: int, skip_attn: bool,
                  last_only: bool) -> torch.Tensor:
    """One block of a prompt's forward (h (b, T, dim)), what compile_prefill compiles: a function of its own, so
    its compiled variants and the shapes dynamo learned vary stay apart from the decode step's."""
    return block(h, ctx, layer, skip_attn=skip_attn, last_only=last_only)


def compile_prefill(model: Decoder, on: bool = True) -> None:
    """Run a prompt's blocks (the eager loop from an empty cache, exit checks between them as before) through
    inductor: norms, rotary, the cache writes and the MLP's elementwise tail fused around the matmuls, a few
    kernels a block where the modules launch ~45 (on a GPU the loop is host-bound below ~2048 tokens: an eager
    16-block forward of a 1B-shaped model took ~15 ms at 1 or 512 tokens on an H100). One compile per block and
    kind of call, then one more when the batch size or prompt length first changes (dynamo then treats it as
    symbolic); inductor's on-disk cache serves the blocks of equal shape after the first. Guards on the modules
    stay (a sliding layer and a global one differ in attributes only). Float rounding differs from the modules'
    in the last bits. on=False puts the modules back."""
    model.prefill_block = compiled_prefill_block(model) if on else None


def compiled_prefill_block(model: Decoder) -> Callable:
    """prefill_block through torch.compile, one per model (built on first use: its variants stay when toggled)."""
    if getattr(model, "compiled_prefill", None) is None:
        model.compiled_prefill = torch.compile(prefill_block, options={"size_asserts": False})
        # a variant per block and kind of call (the last block's, skipped attention, a mask or none), then the same
        # again once the length, and once the batch size, is symbolic
        limit = max(64, 16 * model.config.n_layers)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
        torch._dynamo.config.accumulated_recompile_limit = max(
            torch._dynamo.config.accumulated_recompile_limit, 4 * limit)
    return model.compiled_prefill


CONTEXT_TENSORS = ("cos", "sin", "mask", "rows", "local_mask", "cos_local", "sin_local")  # a prefill's, per forward


class PrefillGraphs:
    """A prompt's blocks replayed from CUDA graphs (--prefill captured), called as the model's prefill_block: each
    block's call (its compiled function, compile_prefill's, or the module with compiled=False) captured on first use
    per block, prompt shape and kind of call, so a forward launches a copy in, one graph and a copy out a block
    instead of a block's kernels one by one: on a GPU a prefill below ~2048 tokens is host-bound (benchmarks/
    results/gpu_check_h100_run3.json: 8.1 ms through the modules at 1 x 512 tokens, 11.5 ms at 1 x 2048).

    The graphs of one shape (batch, length, which tables the forward has) share a `Lane` of static buffers: the
    block's input and output and the forward's tables (rotary, masks, a compacted batch's cache rows), these copied in
    once per forward. A new batch size or prompt length (batches compacted by exits included) captures its blocks
    again: it pays where shapes repeat; `pad_multiple` rounds prompt lengths up for it (generate and the eval pad to
    it). The KV cache's tensors are the graphs' (keyed by their addresses: a decode graph's pooled cache keeps them; a
    new cache at new addresses captures again). A call that records the sublayers' outputs for the exit rule
    (Context.record) runs uncaptured. graph=False runs the same static-buffer path without capture (how the CPU
    tests exercise it)."""

    def __init__(self, model: Decoder, graph: bool = True, compiled: bool = True, pad_multiple: int = 1):
        self.block = compiled_prefill_block(model) if compiled else prefill_block
        self.graph, self.pad_multiple = graph, pad_multiple
        self.model = model
        self.lanes: dict[tuple, Lane] = {}  # in order of last use
        self.pool = None  # one memory pool for every capture: the blocks never replay at once
        self.writing: KVCache | None = None  # the cache of the call under way
        self.caches: dict[tuple[int, int], KVCache] = {}  # cache(): (rows, capacity) -> cache, in order of use

    def __call__(self, block: torch.nn.Module, h: torch.Tensor, ctx: Context, layer: int, skip_attn: bool,
                 last_only: bool) -> torch.Tensor:
        if ctx.record is not None or ctx.write_pos is not None:
            return self.block(block, h, ctx, layer, skip_attn, last_only)
        names = tuple(n for n in CONTEXT_TENSORS if getattr(ctx, n) is not None)
        sources = [getattr(ctx, n) for n in names]
        shape = (ctx.is_causal, names, *((t.shape, t.dtype) for t in [h, *sources]))
        lane = self.lanes.pop(shape, None)
        if lane is None:
            while len(self.lanes) >= MAX_PREFILL_LANES:  # (never all: the pool keeps live graphs, DecodeGraph.cache)
                self.lanes.pop(next(iter(self.lanes)))
            lane = Lane(h, ctx, names, sources)
        self.lanes[shape] = lane
        lane.load(h, sources)
        cache = ctx.cache
        where = None if cache is None else (cache.length, *((t[layer].data_ptr(), t[layer].shape)
                                                            for t in (cache.k, cache.v)))
        key = (layer, skip_attn, last_only, where)
        self.writing = cache  # what a step writes (not held by the graphs: a cache at other addresses is another key)
        try:
            graph = lane.graphs.pop(key, None)
            if graph is None:
                while len(lane.graphs) >= 4 * len(self.model.layers):  # (another cache's, least recently used first)
                    lane.graphs.pop(next(iter(lane.graphs)))
                if self.graph and self.pool is None:
                    self.pool = torch.cuda.graph_pool_handle()
                out = lane.last(h) if last_only else lane.out

                def step():
                    y = self.block(block, lane.h, lane.context(self.writing), layer, skip_attn, last_only)
                    return out.copy_(y)

                graph = Captured(step, [], graph=self.graph, pool=self.pool)
            lane.graphs[key] = graph  # (re)inserted last: in order of use
            return graph()  # (cloned out of the lane's buffer)
        finally:
            self.writing = None

    def cache(self, batch: int, max_len: int) -> KVCache:
        """A KV cache for a generation whose prompt these graphs write (generate asks for it when it has no decode
        graph): one per batch size and capacity (rounded up to a power of two), emptied, kept at its addresses, so
        the blocks captured writing it replay for the next prompt of that shape instead of capturing again."""
        size = pool_capacity(max_len)
        cache = self.caches.pop((batch, size), None)
        if cache is None:
            while len(self.caches) >= MAX_PREFILL_CACHES:
                self.caches.pop(next(iter(self.caches)))
            model = self.model
            cache = KVCache(model.local, batch, size, model.dtype, model.device)
        self.caches[(batch, size)] = cache
        return emptied(cache)


class Lane:
    """PrefillGraphs' buffers for one prompt shape: h, the block's input; out and last_out, its output (all positions,
    or the last one for a run's final block); the forward's tables; and the graphs that read and write them."""

    def __init__(self, h: torch.Tensor, ctx: Context, names: tuple[str, ...], sources: list[torch.Tensor]):
        self.h, self.out, self.last_out = torch.empty_like(h), torch.empty_like(h), None
        self.names = names
        self.tables = [torch.empty_like(t, device=h.device) for t in sources]  # (cache rows: indices on the CPU)
        self.bare = replace(ctx, cache=None, **dict.fromkeys(names))  # the forward's flags
        self.sources: list[torch.Tensor] = []  # the tables last copied in (held: compared by identity)
        self.graphs: dict[tuple, Captured] = {}

    def load(self, h: torch.Tensor, sources: list[torch.Tensor]) -> None:
        """Copy a block's input in, and the forward's tables unless they are those copied last."""
        self.h.copy_(h)
        if len(sources) != len(self.sources) or any(a is not b for a, b in zip(sources, self.sources)):
            for static, t in zip(self.tables, sources):
                static.copy_(t)
            self.sources = sources

    def last(self, h: torch.Tensor) -> torch.Tensor:
        if self.last_out is None:
            self.last_out = torch.empty_like(h[:, -1:])
        return self.last_out

    def context(self, cache: KVCache | None) -> Context:
        return replace(self.bare, cache=cache, **dict(zip(self.names, self.tables)))


def prefill_mode(model: Decoder, mode: str) -> None:
    """Set how `model` runs a prompt's blocks: eager (its modules), compiled (compile_prefill) or captured (the
    compiled blocks replayed from CUDA graphs: PrefillGraphs, GPUs only; the model keeps its captures)."""
    if mode not in PREFILL_MODES:
        raise AdainferError("--prefill", f"unknown mode {mode!r} (choose {', '.join(PREFILL_MODES)})")
    check_prefill_device(mode, model.device)
    if mode != "eager":
        check_compilable(model, "--prefill", f"{mode} prefill", compiler=True)
    compile_prefill(model, mode == "compiled")
    if mode == "captured":
        if getattr(model, "prefill_graphs", None) is None:
            model.prefill_graphs = PrefillGraphs(model, pad_multiple=PREFILL_PAD)
        model.prefill_block = model.prefill_graphs


def check_prefill_device(mode: str, device: torch.device | str) -> None:
    """Refuse --prefill captured off a GPU (its blocks replay as CUDA graphs), before anything loads."""
    if mode == "captured":
        require_cuda("--prefill", "captured replays the prompt's blocks as CUDA graphs", device,
                     " (on the CPU use --prefill compiled)")
