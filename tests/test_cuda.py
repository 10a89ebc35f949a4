"""CUDA only (marked `cuda`; skipped on a machine without a GPU, run by benchmarks/gpu_check.py where there is one):
captured decode against the block loop, exits in captured decode, the CLIs on --device cuda. The captured path's
logic (static buffers, pooled cache, depth graphs, translator readings) is tested on the CPU in test_fast_decode.py;
here the CUDA graphs themselves. The Triton kernel on real head shapes: test_kernel.py."""

import json

import pytest
import torch
from helpers import random_translator, run_cli
from torch._dynamo.utils import counters

from adainfer.exit import ExitClassifier, ExitRule, Plan, gap_rule
from adainfer.fast_decode import DecodeGraph, decode_graph, default_fuse
from adainfer.fast_prefill import PREFILL_PAD, PrefillGraphs, compile_prefill, prefill_mode
from adainfer.generate import generate
from adainfer.loading import load_model

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.py)")]


def prompts(B, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 200, (int(n),), generator=g).tolist() for n in torch.randint(4, 40, (B,), generator=g)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from tiny import make_converted

    return make_converted("llama-gqa-tied", tmp_path_factory.mktemp("cuda"), seed=5, n_layers=6)[1]


@pytest.mark.parametrize("B", [1, 3, 8])
def test_captured_decode_equals_eager_decode(folder, B):
    ids = prompts(B)
    # float32: the captured graph gives the block loop's greedy tokens, 64 of them.
    model = load_model(folder, "float32", "cuda")[0]
    graph = decode_graph(model, "compiled")
    assert graph.capture and graph.fuse == default_fuse(model.device)  # blocks where Triton has a C compiler
    want = [g.token_ids for g in generate(model, ids, 64)]
    assert [g.token_ids for g in generate(model, ids, 64, graph=graph)] == want
    # bfloat16: the same step function eagerly and replayed from its graph, token for token (same kernels: fuse none;
    # the default, inductor's blocks, rounds differently, within test_fused_capture_equals_the_block_loop's bound;
    # 3 rows replay the 4-row bucket's graph, whose matmuls may be other kernels than 3 rows' eager ones).
    if B & (B - 1):
        return
    model = load_model(folder, "bfloat16", "cuda")[0]
    eager = DecodeGraph(model, "compiled", compile=False, capture=False)
    captured = DecodeGraph(model, "compiled", fuse="none")
    want = [g.token_ids for g in generate(model, ids, 64, graph=eager)]
    assert [g.token_ids for g in generate(model, ids, 64, graph=captured)] == want
    assert len(captured.graphs) == 1


@pytest.mark.parametrize("fuse", ["none", "blocks"])
def test_exits_in_captured_decode_equal_the_block_loop(folder, fuse):
    model = load_model(folder, "float32", "cuda")[0]
    graph = DecodeGraph(model, "compiled", fuse=fuse)
    ids = prompts(8, seed=1)
    clf = gap_rule(0.02)  # rows of this random model pass a top-2 gap of 0.02 at different layers
    reader = random_translator(model.config.dim, range(1, 6), scale=0.05)
    for translator in (None, reader):
        clf.translator = translator
        plan = Plan(exit=ExitRule(clf, "cuda"))
        for mode in ("sequence", "token"):
            want = generate(model, ids, 24, plan, mode=mode)
            got = generate(model, ids, 24, plan, mode=mode, graph=graph)
            assert [g.token_ids for g in got] == [g.token_ids for g in want]
            assert [g.layers_run for g in got] == [g.layers_run for g in want]
        # one row at a time every step is a single depth: all through graphs, the depths the rows exit at
        for b in range(4):
            want = generate(model, ids[b:b + 1], 24, plan)
            assert generate(model, ids[b:b + 1], 24, plan, graph=graph)[0].token_ids == want[0].token_ids
    assert {k[1] for k in graph.graphs} - {model.config.n_layers}, "some step should have run a shallower graph"


@pytest.mark.parametrize("fuse", ["none", "blocks"])
def test_a_longer_generation_after_a_short_one_captures_again(folder, fuse):
    """A short generation captures graphs around a small cache; a longer one outgrows it, drops them and captures
    into a new memory pool (the old one, its graphs all gone, fails the allocator's assert when captured into
    again: measured in gpu_check on an H100). Then EOS, read back every few steps, ends each row at its own."""
    ids = prompts(2, seed=3)
    model = load_model(folder, "float32", "cuda")[0]
    graph = DecodeGraph(model, "compiled", fuse=fuse)
    for n in (4, 100, 4):
        want = [g.token_ids for g in generate(model, ids, n)]
        assert [g.token_ids for g in generate(model, ids, n, graph=graph)] == want
    eos = want[0][1]
    want = [g.token_ids for g in generate(model, ids, 40, eos_id=eos)]
    assert [g.token_ids for g in generate(model, ids, 40, eos_id=eos, graph=graph)] == want
    assert want[0][-1] == eos and len(want[0]) <= 2


@pytest.mark.parametrize("fuse", ["blocks", "step", "tuned", "tuned_step"])
def test_fused_capture_equals_the_block_loop(folder, fuse):
    """fuse: inductor's fused kernels captured in the graphs. float32: the block loop's greedy tokens, dense and
    through a sequence-mode exit, 8 rows and 1 (where the tuned ones write the GEMVs as their own Triton reductions);
    bfloat16: the first step's logits within rounding of the eager capture's."""
    ids = prompts(8, seed=2)
    model = load_model(folder, "float32", "cuda")[0]
    fused = DecodeGraph(model, "compiled", fuse=fuse)
    assert fused.fuse == fuse
    half = ExitClassifier("svm", ["gap"], [0.0], 1.0, first_layer=3)  # every row exits after 3 of the 6 blocks
    for rows in (ids, ids[:1]):
        for plan in (None, Plan(exit=ExitRule(half, "cuda"))):  # two compiles: full depth and depth 3
            want = generate(model, rows, 32, plan)
            got = generate(model, rows, 32, plan, graph=fused)
            assert [g.token_ids for g in got] == [g.token_ids for g in want]
            assert [g.layers_run for g in got] == [g.layers_run for g in want]
    model = load_model(folder, "bfloat16", "cuda")[0]
    x = torch.tensor([p[:4] for p in ids], device="cuda")
    logits = []
    for graph in (DecodeGraph(model, "compiled", fuse="none"), DecodeGraph(model, "compiled", fuse=fuse)):
        cache = graph.cache(len(x), 64)
        with torch.inference_mode():
            for t in range(4):
                out = graph(x[:, t:t + 1], cache)
                cache.length += 1
        logits.append(out.float())
    torch.testing.assert_close(logits[1], logits[0], atol=0.05 * float(logits[0].abs().max()), rtol=0)


def test_compiled_prefill_equals_the_modules_on_cuda(folder):
    """compile_prefill on a GPU (Triton kernels): float32, the modules' greedy tokens and exit layers with rows
    leaving at different layers; bfloat16, the prompt's logits within rounding."""
    ids = prompts(8, seed=3)
    model = load_model(folder, "float32", "cuda")[0]
    some = ExitClassifier("svm", ["gap"], [1.0], -0.02)  # fires at different layers for different rows
    want = generate(model, ids, 16, Plan(exit=ExitRule(some, "cuda")))
    compile_prefill(model)
    compiled = counters["stats"]["unique_graphs"]
    got = generate(model, ids, 16, Plan(exit=ExitRule(some, "cuda")))
    assert counters["stats"]["unique_graphs"] > compiled, "the compiled blocks ran"
    assert [g.token_ids for g in got] == [g.token_ids for g in want]
    assert [g.layers_run for g in got] == [g.layers_run for g in want]
    model = load_model(folder, "bfloat16", "cuda")[0]
    x = torch.tensor([p[:4] for p in ids], device="cuda")
    logits = [model(x).logits]
    compile_prefill(model)
    logits.append(model(x).logits)
    torch.testing.assert_close(logits[1], logits[0], atol=0.05 * float(logits[0].abs().max()), rtol=0)


def test_captured_prefill_equals_the_modules_on_cuda(folder):
    """--prefill captured (PrefillGraphs: the compiled blocks replayed from CUDA graphs): float32, the modules'
    greedy tokens and exit layers with rows leaving at different layers (compacted batches, cache rows), the same
    prompts again replaying every block without a new capture; bfloat16, the prompt's logits within rounding."""
    ids = prompts(8, seed=3)
    model = load_model(folder, "float32", "cuda")[0]
    plan = Plan(exit=ExitRule(ExitClassifier("svm", ["gap"], [1.0], -0.02), "cuda"))  # rows leave at various layers
    # the reference pads the prompts as the captured path does (to PREFILL_PAD), through the modules uncaptured
    model.prefill_block = PrefillGraphs(model, graph=False, compiled=False, pad_multiple=PREFILL_PAD)
    want = generate(model, ids, 16, plan)
    prefill_mode(model, "captured")
    got = generate(model, ids, 16, plan)
    assert [g.token_ids for g in got] == [g.token_ids for g in want]
    assert [g.layers_run for g in got] == [g.layers_run for g in want]

    def captured():
        return sum(len(lane.graphs) for lane in model.prefill_graphs.lanes.values())

    n = captured()
    assert n > 0 and [g.token_ids for g in generate(model, ids, 16, plan)] == [g.token_ids for g in got]
    assert captured() == n, "the same prompts again: every block replayed (the cache handed out again)"
    x = torch.tensor([p[:4] for p in ids], device="cuda")  # (prompts hold at least 4 tokens)
    with torch.inference_mode():
        first = model(x, plan=plan)
        again = model(x, plan=plan)
    assert torch.equal(again.logits, first.logits) and torch.equal(again.layers_run, first.layers_run)
    model = load_model(folder, "bfloat16", "cuda")[0]
    with torch.inference_mode():
        logits = [model(x).logits]
        prefill_mode(model, "captured")
        logits.append(model(x).logits)
    torch.testing.assert_close(logits[1], logits[0], atol=0.05 * float(logits[0].abs().max()), rtol=0)


@pytest.mark.slow
def test_clis_on_cuda(folder, tmp_path):
    base = ("--model", folder, "--prompt", "hello there", "--max-new-tokens", "12", "--json", "--dense")
    eager = run_cli("adainfer.run", *base, "--device", "cuda", "--dtype", "float32")
    compiled = run_cli("adainfer.run", *base, "--device", "cuda", "--dtype", "float32", "--decode", "compiled")
    assert eager.returncode == 0 and compiled.returncode == 0, eager.stderr + compiled.stderr
    assert json.loads(compiled.stdout)["token_ids"] == json.loads(eager.stdout)["token_ids"]
    prefill = run_cli("adainfer.run", *base, "--device", "cuda", "--dtype", "float32", "--prefill", "compiled")
    assert prefill.returncode == 0, prefill.stderr
    assert json.loads(prefill.stdout)["token_ids"] == json.loads(eager.stdout)["token_ids"]
    prefill = run_cli("adainfer.run", *base, "--device", "cuda", "--dtype", "float32", "--prefill", "captured",
                      "--decode", "compiled")
    assert prefill.returncode == 0, prefill.stderr
    assert json.loads(prefill.stdout)["token_ids"] == json.loads(eager.stdout)["token_ids"]
    rows = tmp_path / "t.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"item {i} is", "answer": " x"}) + "\n" for i in range(12)))
    for dtype in ("float16", "bfloat16"):
        proc = run_cli("adainfer.calibrate", "--model", folder, "--prompts", rows, "--device", "cuda", "--dtype", dtype,
                       "--out", tmp_path / f"c-{dtype}.json")
        assert proc.returncode == 0, proc.stderr
        proc = run_cli("adainfer.eval", "--model", folder, "--task-file", rows, "--shots", "0", "--method", "dense",
                       "gap-rule", "--device", "cuda", "--dtype", dtype, "--out", tmp_path / f"e-{dtype}.json")
        assert proc.returncode == 0, proc.stderr
        assert json.loads((tmp_path / f"e-{dtype}.json").read_text())


def test_int8_check_head_on_cuda(folder):
    """--check-head int8 on a GPU: the Triton kernel reads the int8 head (1.125 bytes a weight). Each check's
    features equal the reference on the dequantized head; a gap rule's exits are the same eager and with its checks
    replayed from CUDA graphs; an exiting row's answer is the full-precision head's at its layer."""
    from adainfer.fast_decode import prepare_check_head
    from adainfer.generate import left_pad
    from adainfer.kernels.top2 import lm_head_top2_reference

    model = load_model(folder, "float32", "cuda")[0]  # (bfloat16 rows: test_kernel.py's int8 test on a GPU)
    prepare_check_head(model, "int8", None, "test")
    q8, c = model.int8_head(), model.config
    assert q8.q.is_cuda and q8.q.dtype == torch.int8
    tokens, mask = left_pad(prompts(8, seed=2), 0)
    tokens, mask = tokens.cuda(), mask.cuda()
    never = ExitRule(ExitClassifier("never", ["gap", "top_prob"], [0.0, 0.0], -1.0), "cuda")
    out = model(tokens, pad_mask=mask, plan=Plan(exit=never, record_features=True, hidden_states=True,
                                                 check_head="int8"))
    for f in out.features:
        h = out.hidden_states[f["layer"]][:, -1]
        want = lm_head_top2_reference(h.float(), q8.q, model.norm.weight.float(), c.norm_eps, scale=q8.scale)
        torch.testing.assert_close(f["top_prob"], want.p1, rtol=0, atol=1e-4)
        torch.testing.assert_close(f["gap"], want.p1 - want.p2, rtol=0, atol=1e-4)
    gaps = torch.cat([f["gap"] for f in out.features[:3]])
    rule = ExitRule(gap_rule(float(gaps.median())), "cuda")
    eager = model(tokens, pad_mask=mask, plan=Plan(exit=rule, check_head="int8"))
    replayed = model(tokens, pad_mask=mask, plan=Plan(exit=rule, check_head="int8", capture_checks=True))
    assert len(set(eager.layers_run.tolist())) > 1, "rows should exit at different layers"
    assert torch.equal(eager.layers_run, replayed.layers_run) and torch.equal(eager.token, replayed.token)
    assert all(g.graph is not None for g in rule.check_graphs.graphs.values())
    for b in range(tokens.shape[0]):
        forced = model(tokens[b:b + 1], pad_mask=mask[b:b + 1], plan=Plan(exit_at=int(eager.layers_run[b])))
        assert int(forced.token[0]) == int(eager.token[b])
        assert (forced.logits[0] - eager.logits[b]).abs().max() <= 1e-4


@pytest.mark.parametrize("fuse", ["none", "blocks"])
def test_the_triton_decode_attention_gives_the_block_loops_tokens(folder, fuse):
    """DecodeGraph(attention="triton"): each captured step's attention through adainfer.kernels.attention (inside
    inductor's compiled blocks with fuse="blocks": an opaque op there). float32: the block loop's greedy tokens, 64 of
    them, at batch 1 and 4; a forced exit at half depth too."""
    model = load_model(folder, "float32", "cuda")[0]
    for B in (1, 4):
        ids = prompts(B, seed=B)
        graph = DecodeGraph(model, "compiled", fuse=fuse, attention="triton")
        assert [g.token_ids for g in generate(model, ids, 64, graph=graph)] == \
            [g.token_ids for g in generate(model, ids, 64)]
        half = Plan(exit=ExitRule(ExitClassifier("svm", ["gap"], [0.0], 1.0, first_layer=3), "cuda"))  # after 3
        got, want = generate(model, ids, 16, half, graph=graph), generate(model, ids, 16, half)
        assert [g.token_ids for g in got] == [g.token_ids for g in want]
        assert [g.layers_run for g in got] == [g.layers_run for g in want]
