"""The decode graph (adainfer.fast_decode): decode steps through the graph (eager and compiled, float and int4)
against the block loop, step by step; generate() handing it the dense steps; one compile per batch size."""

import json
from types import SimpleNamespace

import pytest
import torch
from helpers import random_translator, run_cli
from torch._dynamo.utils import counters

from adainfer.errors import AdainferError
from adainfer.exit import ExitClassifier, ExitRule, Plan, never_rule
from adainfer.fast_decode import MAX_GRAPHS, DecodeGraph, decode_graph, quantize_model, rotary_step
from adainfer.fast_prefill import PrefillGraphs, compile_prefill, prefill_mode
from adainfer.generate import generate, left_pad
from adainfer.kv_cache import KVCache
from adainfer.loading import load_model

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [40, 41, 42, 43, 44, 45, 46, 47, 48]]  # left-padded together


def step_logits(model, graph, n_steps, depth=None, reader=None):
    """Prefill PROMPTS, then feed the block loop's greedy token to both the block loop and the graph for n_steps,
    both running the first `depth` blocks (None: all) read through `reader`; return the per-step logits of both,
    (n_steps, B, V) each."""
    tokens, pad_mask = left_pad(PROMPTS, 0)
    B, T = tokens.shape
    caches = [KVCache(model.config, B, T + n_steps, model.dtype), graph.cache(B, T + n_steps)]
    for cache in caches:
        out = model(tokens, pad_mask=pad_mask, cache=cache)
        cache.length = T
    plan = Plan(exit_at=depth, translator=reader)
    token, ref, got = out.token[:, None], [], []
    for _ in range(n_steps):
        o = model(token, cache=caches[0], plan=plan)
        caches[0].length += 1
        got.append(graph(token, caches[1], depth, reader))
        caches[1].length += 1
        ref.append(o.logits)
        token = o.token[:, None]
    return torch.stack(ref), torch.stack(got)


@pytest.fixture(scope="module")
def folder(converted):
    return converted("llama-gqa-tied", seed=3)[1]


@pytest.mark.parametrize("preset", ["llama-gqa-tied", "opt-125m-like", "opt-350m-like", "qwen2-window",
                                    "qwen3-head-dim", "mistral-window", "gemma3-local"])
def test_graph_eager_matches_the_block_loop(converted, preset):
    model = load_model(converted(preset, seed=3)[1], "float32")[0]
    ref, got = step_logits(model, DecodeGraph(model, "compiled", compile=False), 8)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("capture", [False, True])
def test_graph_at_any_depth_with_a_translator_matches_the_block_loop(converted, capture):
    """A step of the first n blocks (what a sequence-mode exit runs) read through a translator, eagerly and through
    the captured path's static buffers and pooled cache (capture=True: on the CPU without the CUDA graph itself)."""
    model = load_model(converted("llama-gqa-tied", seed=3)[1], "float32")[0]
    graph = DecodeGraph(model, "compiled", compile=False, capture=capture)
    reader = random_translator(model.config.dim, [1, 2], scale=0.1)
    for depth, tr in ((1, None), (2, reader), (3, reader)):
        ref, got = step_logits(model, graph, 6, depth, tr)
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    plain, _ = step_logits(model, graph, 2, 2)
    translated, _ = step_logits(model, graph, 2, 2, reader)
    assert float((plain - translated).abs().max()) > 1e-3, "the translator must change the depth-2 reading"
    if capture:
        # one step function per (batch-size bucket, tokens, blocks, cache, translator, head), the cache the graph's
        # own (at depth 3, the model's last block, the translator is not read: the plain graph serves; None = all
        # blocks); the 3 prompts run in the 4-row bucket
        assert sorted((k[0], k[1], k[2] or (0, 1, 2), k[4] == id(reader)) for k in graph.graphs) == [
            (4, 1, (0,), False), (4, 1, (0, 1), False), (4, 1, (0, 1), True), (4, 1, (0, 1, 2), False)]
        # every new rule brings its own translator object: the graphs that read it are kept to MAX_GRAPHS, least
        # recently used dropped first
        for seed in range(MAX_GRAPHS + 4):
            step_logits(model, graph, 1, 2, random_translator(model.config.dim, [2], scale=0.1, seed=seed))
        assert len(graph.graphs) == MAX_GRAPHS
        with pytest.raises(AdainferError, match="graph's own KV cache"):
            graph(torch.zeros(3, 1, dtype=torch.long), KVCache(model.config, 3, 8, model.dtype))


def test_captured_generation_reuses_its_cache_and_graphs(converted):
    """generate() hands the captured path every step whose rows share a depth (sequence-mode exits included): the
    same tokens as the block loop, one pooled cache per batch-size bucket (emptied between prompts, replaced when
    outgrown; 3 rows run as the first rows of the 4-row bucket), and no new step function for a new prompt of the
    same bucket and depth."""
    model = load_model(converted("llama-gqa-tied", seed=3)[1], "float32")[0]
    graph = DecodeGraph(model, "compiled", compile=False, capture=True)
    firing = Plan(exit=ExitRule(ExitClassifier("svm", ["gap"], [0.0], 1.0)))  # every row exits at layer 1
    for plan in (None, firing):
        want = [g.token_ids for g in generate(model, PROMPTS, 6, plan)]
        assert [g.token_ids for g in generate(model, PROMPTS, 6, plan, graph=graph)] == want
    assert [g.layers_run for g in generate(model, PROMPTS, 6, firing, graph=graph)] == [[1] * 6] * 3
    cache, made = graph.pool[4], dict(graph.graphs)  # 3 rows: the first rows of the 4-row bucket's cache
    assert list(graph.pool) == [4] and {k[0] for k in made} == {4}
    assert sorted(len(k[2] or (0, 1, 2)) for k in made) == [1, 3]
    generate(model, PROMPTS[::-1], 5, firing, graph=graph)
    assert graph.pool[4] is cache and graph.graphs == made
    want = [g.token_ids for g in generate(model, PROMPTS + [[7, 8]], 5, firing)]  # 4 rows: the same graphs
    assert [g.token_ids for g in generate(model, PROMPTS + [[7, 8]], 5, firing, graph=graph)] == want
    assert graph.graphs.keys() == made.keys()
    generate(model, PROMPTS, 80, graph=graph)  # 9 + 79 positions outgrow the 64 of the first cache
    assert graph.pool[4] is not cache and graph.pool[4].max_len == 128 and len(graph.graphs) == 1


def test_a_decode_graph_runs_gate_and_up_the_way_it_was_given(converted, monkeypatch):
    """DecodeGraph(gate_up="one" / "two"): its steps' MLPs with GatedMLP.SPLIT set so (gpu_check's FUSE:two variants),
    the setting put back after each call; None leaves it to gate_up_split. The block loop's tokens every way."""
    from adainfer.model import GatedMLP

    model = load_model(converted("llama-gqa-tied", seed=3)[1], "float32")[0]
    seen, forward = [], GatedMLP.forward
    monkeypatch.setattr(GatedMLP, "forward", lambda mlp, x, quantized=False: seen.append(mlp.SPLIT) or
                        forward(mlp, x, quantized))
    want = [g.token_ids for g in generate(model, PROMPTS, 4)]
    for way, split in (("two", True), ("one", False), (None, None)):
        graph = DecodeGraph(model, "compiled", compile=False, capture=True, gate_up=way)
        seen.clear()
        assert [g.token_ids for g in generate(model, PROMPTS, 4, graph=graph)] == want
        assert set(seen) == {None, split} and GatedMLP.SPLIT is None  # (the prompt's forward is the model's own)
    with pytest.raises(AdainferError, match="gate_up: unknown 'three'"):
        DecodeGraph(model, "compiled", gate_up="three")


@pytest.mark.slow
@pytest.mark.parametrize("fuse", ["blocks", "step", "tuned", "tuned_step"])
def test_fused_capture_gives_the_block_loops_tokens(converted, fuse):
    """fuse: the captured path replays inductor's compiled blocks and head, or its compiled step (on the CPU its C++
    loops in the static buffers; on a GPU the fused Triton kernels captured, test_cuda.py): the block loop's tokens,
    dense and at an exit depth. Compiled blocks are shared by every depth: the exit depth's graph compiles nothing
    new (a compiled step compiles once per depth)."""
    model = load_model(converted("llama-gqa-tied", seed=3)[1], "float32")[0]
    graph = DecodeGraph(model, "compiled", capture=True, fuse=fuse)
    assert graph.fuse == fuse and graph.replay_step is not rotary_step
    firing = Plan(exit=ExitRule(ExitClassifier("svm", ["gap"], [0.0], 1.0)))  # every row exits at layer 1
    compiled = [counters["stats"]["unique_graphs"]]
    for plan in (None, firing):
        want = [g.token_ids for g in generate(model, PROMPTS, 8, plan)]
        assert [g.token_ids for g in generate(model, PROMPTS, 8, plan, graph=graph)] == want
        compiled.append(counters["stats"]["unique_graphs"])
    assert sorted(len(k[2] or (0, 1, 2)) for k in graph.graphs) == [1, 3]
    assert compiled[1] > compiled[0], "the captured steps ran compiled code"
    assert (compiled[2] == compiled[1]) == (fuse not in ("step", "tuned_step"))
    assert DecodeGraph(model, "compiled", compile=False, fuse=fuse).fuse == "none", "a captured path's option"
    assert DecodeGraph(model, "compiled", capture=True).fuse == "none", "on the CPU the default replays eager steps"
    with pytest.raises(AdainferError, match="fuse.*unknown 'all'"):
        DecodeGraph(model, "compiled", fuse="all")


def test_compilers_the_compiled_paths_need(converted, monkeypatch):
    """On a GPU the default decode graph replays inductor's blocks only where Triton has a C compiler for its
    launchers, and the eager step's kernels otherwise (nothing to compile); compiled prefill asks for the compiler
    it needs (C++ on the CPU, C on a GPU) and refuses in one line without it."""
    import adainfer.fast_decode as fd

    model = load_model(converted("llama-gqa-tied")[1], "float32")[0]
    cuda = torch.device("cuda")
    monkeypatch.setenv("CC", "no-such-cc")  # Triton's search: $CC as given (else gcc, else clang)
    assert fd.c_compiler() is None
    monkeypatch.setattr(fd, "c_compiler", lambda: "/usr/bin/gcc")
    assert fd.default_fuse(cuda) == fd.FUSE_DEFAULT == "blocks" and fd.default_fuse(model.device) == "none"
    monkeypatch.setattr(fd, "c_compiler", lambda: None)
    assert fd.default_fuse(cuda) == "none"
    on_gpu = SimpleNamespace(shard=None, device=cuda)  # (what check_compilable reads of a model)
    monkeypatch.delenv("CC", raising=False)
    with pytest.raises(AdainferError, match=r"--prefill: .*C compiler: gcc, clang not on PATH"):
        fd.check_compilable(on_gpu, "--prefill", "compiled prefill", compiler=True)
    fd.check_compilable(on_gpu, "--decode", "compiled decoding", compiler=False)  # CUDA graphs of the eager step
    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.raises(AdainferError, match="--prefill: .*C\\+\\+ compiler; 'no-such-compiler' is not on PATH"):
        prefill_mode(model, "compiled")


def prefill_outputs(model, plan):
    """PROMPTS left-padded into a cache, plain (mask, cache, rows exiting at different layers with `plan`), then one
    more prompt of another length and batch size without a cache: logits and layers of each, and 4 greedy tokens."""
    tokens, pad_mask = left_pad(PROMPTS, 0)
    cache = KVCache(model.config, *tokens.shape, model.dtype)
    first = model(tokens, pad_mask=pad_mask, cache=cache, plan=plan)
    second = model(torch.tensor([[3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]]))
    return [first.logits, first.layers_run, second.logits], [g.token_ids for g in generate(model, PROMPTS, 4, plan)]


def test_captured_prefill_replays_each_shape_of_the_blocks(converted):
    """PrefillGraphs (--prefill captured) through its static buffers (graph=False, the modules inside: the same ops,
    so the same bits): Gemma 3's sliding and global layers, padding, a cache, rows leaving at different layers (the
    batch compacted, its cache rows a table); each block, shape and kind of call captured once, replayed when the
    same shapes come again, a new cache's addresses captured anew; a rule that records the sublayers runs the blocks
    uncaptured; prompt lengths padded to pad_multiple give the same tokens. Captured on a GPU: test_cuda.py."""
    model = load_model(converted("gemma3-local", seed=3)[1], "float32")[0]
    L = model.config.n_layers
    with torch.inference_mode():
        gaps = model(*left_pad(PROMPTS, 0)[:1], pad_mask=left_pad(PROMPTS, 0)[1],
                     plan=Plan(exit=ExitRule(never_rule()), record_features=True)).features[0]["gap"]
    plan = Plan(exit=ExitRule(ExitClassifier("svm", ["gap"], [1.0], -float(gaps.median()))))
    want, want_tokens = prefill_outputs(model, plan)
    want_reversed = [g.token_ids for g in generate(model, PROMPTS[::-1], 4, plan)]
    model.prefill_block = graphs = PrefillGraphs(model, graph=False, compiled=False)

    def captured():
        return {(shape, key) for shape, lane in graphs.lanes.items() for key in lane.graphs}

    got, tokens = prefill_outputs(model, plan)
    assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])
    assert got[1].tolist() == want[1].tolist() and tokens == want_tokens
    assert {key[0] for _, key in captured()} == set(range(L)), "every block"
    assert {key[3] is None for _, key in captured()} == {True, False}, "with and without a cache"
    assert any("rows" in shape[1] for shape in graphs.lanes) and any("local_mask" in shape[1] for shape in graphs.lanes)
    tokens, pad_mask = left_pad(PROMPTS, 0)
    with torch.inference_mode():
        first = model(tokens, pad_mask=pad_mask, plan=plan).logits
        made = captured()
        assert torch.equal(model(tokens, pad_mask=pad_mask, plan=plan).logits, first)
        other = left_pad(PROMPTS[::-1], 0)  # the same shape, other tables (padding, positions): copied in afresh
        got = model(other[0], pad_mask=other[1], plan=plan).logits
        assert captured() == made, "the same shapes again: every block replayed, nothing captured"
        model.prefill_block = None
        assert torch.equal(got, model(other[0], pad_mask=other[1], plan=plan).logits)
        model.prefill_block = graphs
        caches = [KVCache(model.config, *tokens.shape, model.dtype) for _ in range(2)]  # both alive: two addresses
        for cache in caches:
            model(tokens, pad_mask=pad_mask, cache=cache)
        # each cache's blocks captured at its addresses (a freed cache's memory may come back to a new one, whose
        # blocks then replay that capture: it writes the same addresses)
        where = {key[3] for _, key in captured()}
        for cache in caches:
            for i in range(L):
                assert (0, *((t[i].data_ptr(), t[i].shape) for t in (cache.k, cache.v))) in where, (i, "captured")
        assert len(made) < len(captured()) <= len(made) + 2 * L
        assert torch.equal(caches[0].k[0], caches[1].k[0]) and caches[0].k[0].abs().sum() > 0
        cos = Plan(exit=ExitRule(ExitClassifier("svm", ["gap", "cos_mlp"], [1.0, 0.0], 1.0)))
        made = captured()
        model(torch.tensor([[3, 4, 5, 6, 7]]), plan=cos)  # records the sublayers: the blocks run uncaptured
        assert captured() == made
    model.prefill_block = graphs = PrefillGraphs(model, graph=False, compiled=False, pad_multiple=8)
    assert [g.token_ids for g in generate(model, PROMPTS, 4, plan)] == want_tokens  # 9 tokens padded to 16
    assert {shape[2][0][1] for shape in graphs.lanes} == {16}
    made = captured()
    assert [g.token_ids for g in generate(model, PROMPTS[::-1], 4, plan)] == want_reversed
    assert captured() == made and len(graphs.caches) == 1, "the cache it handed out again, at its addresses"
    # with a decode graph (its static-buffer path) the prompt's blocks write the graph's pooled cache instead
    decode = DecodeGraph(model, "compiled", compile=False, capture=True)
    for _ in range(2):
        assert [g.token_ids for g in generate(model, PROMPTS[::-1], 4, plan, graph=decode)] == want_reversed
    assert len(graphs.caches) == 1 and len(captured()) == len(made) + L
    model.prefill_block = None


@pytest.mark.slow
def test_compiled_prefill_matches_the_modules(converted):
    """compile_prefill: a prompt's blocks through inductor give the modules' logits (to float rounding), exits and
    tokens, with padding, a cache, rows leaving at different layers (the batch compacted between blocks), another
    prompt length and batch size; Gemma 3's sliding and global layers each keep their own compile."""
    model = load_model(converted("gemma3-local", seed=3)[1], "float32")[0]
    with torch.inference_mode():  # a rule that fires for the rows whose gap after block 1 is above the median
        gaps = model(*left_pad(PROMPTS, 0)[:1], pad_mask=left_pad(PROMPTS, 0)[1],
                     plan=Plan(exit=ExitRule(never_rule()), record_features=True)).features[0]["gap"]
    split = ExitClassifier("svm", ["gap"], [1.0], -float(gaps.median()))
    plan = Plan(exit=ExitRule(split))
    want, want_tokens = prefill_outputs(model, plan)
    assert len(set(want[1].tolist())) > 1, "the rows should exit at different layers"
    compiled = counters["stats"]["unique_graphs"]
    compile_prefill(model)
    got, tokens = prefill_outputs(model, plan)
    assert counters["stats"]["unique_graphs"] - compiled >= model.config.n_layers, "the compiled blocks ran"
    torch.testing.assert_close(got[0], want[0], atol=1e-4, rtol=0)
    assert got[1].tolist() == want[1].tolist() and tokens == want_tokens
    torch.testing.assert_close(got[2], want[2], atol=1e-4, rtol=0)
    compiled = counters["stats"]["unique_graphs"]
    compile_prefill(model, False)
    assert model.prefill_block is None and prefill_outputs(model, plan)[1] == want_tokens
    assert counters["stats"]["unique_graphs"] == compiled


@pytest.mark.slow
def test_compiled_graph_matches_the_block_loop_and_generate(folder):
    model = load_model(folder, "float32")[0]
    graph = decode_graph(model, "compiled")
    compiled = counters["stats"]["unique_graphs"]
    ref, got = step_logits(model, graph, 8)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    # One compile serves every cache length and cache size (the write position is a tensor, the cache's length
    # dimension symbolic); a new batch size compiles once more. A compile per step would cost seconds each.
    assert counters["stats"]["unique_graphs"] - compiled == 1
    generate(model, PROMPTS, 3, graph=graph)
    generate(model, PROMPTS, 7, graph=graph)
    assert counters["stats"]["unique_graphs"] - compiled == 1
    generate(model, PROMPTS[:1], 4, graph=graph)
    generate(model, PROMPTS[1:2], 6, graph=graph)
    assert counters["stats"]["unique_graphs"] - compiled == 2
    compiled = counters["stats"]["unique_graphs"]
    # generate() hands dense steps to the graph: same tokens as the block loop, in sequence mode with a rule that
    # never fires (every row at full depth) too.
    never = Plan(exit=ExitRule(ExitClassifier("never", ["gap"], [0.0], -1.0)))
    dense = [g.token_ids for g in generate(model, PROMPTS, 10)]
    assert [g.token_ids for g in generate(model, PROMPTS, 10, graph=graph)] == dense
    assert [g.token_ids for g in generate(model, PROMPTS, 10, never, graph=graph)] == dense
    assert counters["stats"]["unique_graphs"] == compiled


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_int4_graph_matches_the_quantized_block_loop(folder, dtype):
    model = load_model(folder, dtype)[0]
    float_model = load_model(folder, dtype)[0]
    graph = decode_graph(model, "int4")  # rounds the model's weights in place
    changed = [float((a - b).abs().max()) for a, b in zip(model.parameters(), float_model.parameters())]
    assert max(changed) > 0, "int4 mode must switch the eager model to the rounded weights"
    ref, got = step_logits(model, graph, 8)
    # Both read the same rounded weights; the kernels round the activations to int8 (measured: 2.1% of the range in
    # float32, 2.6% in bfloat16; 23 and 22 of 24 greedy tokens the same: this random model's logits are close).
    assert float((got - ref).abs().max()) <= 4e-2 * float(ref.abs().max())
    assert float((got.argmax(-1) == ref.argmax(-1)).float().mean()) >= 0.85
    if dtype == "float32":
        # The compiled graph against the same graph run eagerly (same kernels): measured 1.4e-6 of 3.3.
        eager = load_model(folder, dtype)[0]
        quantize_model(eager)
        _, want = step_logits(eager, DecodeGraph(eager, "int4", compile=False), 8)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_decode_graph_refuses_what_it_does_not_cover(folder):
    with pytest.raises(AdainferError, match="float32 or bfloat16"):
        decode_graph(load_model(folder, "float16")[0], "int4")
    with pytest.raises(AdainferError, match="unknown mode"):
        decode_graph(load_model(folder, "float32")[0], "fast")
    with pytest.raises(AdainferError, match="--prefill: unknown mode 'fast'"):
        prefill_mode(load_model(folder, "float32")[0], "fast")


@pytest.mark.slow
def test_run_cli_compiled_prefill(folder, tmp_path):
    """--prefill compiled, as a user runs it: the modules' answer and exit layer, with a rule that fires."""
    clf = ExitClassifier("svm", ["gap"], [0.0], 1.0)  # every row exits at its first check
    clf.save(tmp_path / "fires.json")
    r = run_cli("adainfer.run", "--model", folder, "--prompt", "hello there", "--max-new-tokens", "3", "--prefill",
                "compiled", "--exit", tmp_path / "fires.json", "--json", "--dtype", "float32",
                env={"TORCH_LOGS": "recompiles"})  # dynamo says when it compiles the blocks again (new variants)
    assert r.returncode == 0, r.stderr
    assert "Recompiling function prefill_block" in r.stderr
    got = json.loads(r.stdout)
    model, tok = load_model(folder, "float32")
    want = generate(model, [tok.encode("hello there")], 3, Plan(exit=ExitRule(clf)))[0]
    assert got["token_ids"] == want.token_ids and got["layers_run"] == want.layers_run == [1, 1, 1]


@pytest.mark.slow
def test_run_cli_int4_decode(folder, converted):
    r = run_cli("adainfer.run", "--model", folder, "--prompt", "hello", "--max-new-tokens", "4", "--decode", "int4",
                "--dense", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["token_ids"]) == 4 and out["layers_run"] == [3] * 4
    # OPT too: the graph is the model's own blocks
    opt = converted("opt-125m-like")[1]
    eager = run_cli("adainfer.run", "--model", opt, "--prompt", "hello", "--max-new-tokens", "4", "--json",
                    "--dtype", "float32")
    r = run_cli("adainfer.run", "--model", opt, "--prompt", "hello", "--max-new-tokens", "4", "--json",
                "--dtype", "float32", "--decode", "compiled")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["token_ids"] == json.loads(eager.stdout)["token_ids"]


@pytest.mark.realmodel
@pytest.mark.slow
def test_int4_graph_on_the_default_model(default_model_dir):
    model = load_model(default_model_dir, "float32")[0]
    reference = load_model(default_model_dir, "float32")[0]
    ref, got = step_logits(model, decode_graph(model, "int4"), 8)
    # The default model's blocks ship as Q4_1 and its head as Q8_0: the rounding recovers them (up to float32 ulps).
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    # What is left is the int8 rounding of the activations. Measured: max abs diff 1.12 on logits up to 36.9 (3.0%),
    # 23 of 24 greedy tokens the same.
    assert float((got - ref).abs().max()) <= 5e-2 * float(ref.abs().max())
    assert float((got.argmax(-1) == ref.argmax(-1)).float().mean()) >= 0.9
