"""The GPU check (issue 15): one command for a session that is lent a CUDA GPU. Runs the CUDA tests, then measures
the table of the GPU engine's goals on a random-init Llama-3.2-1B-shaped model (16 blocks, d 2048, GQA 32/8, vocab
49152, tied, bfloat16) built by transformers and converted by our converter on the fly (nothing downloaded),
against transformers on the same weights in the same process:

  decode   ms/token at batch 1 and 8 (128 new tokens after a 32-token prompt): ours eager, ours through the decode
           graph (--decode compiled: CUDA graphs on a GPU, of the default `fuse` recorded as graph_fuse; the
           torch.compile graph on a CPU), transformers (dynamic cache; --hf-compile adds its static cache +
           torch.compile), against the weight-read limit (weight bytes / measured copy bandwidth)
           and, on a GPU with --variants, the same graphs replaying other kernels DecodeGraph's `fuse` and
           `attention` offer (recorded as variants: the eager step's, inductor's compiled blocks, its compiled step,
           the blocks or the step compiled with coordinate-descent tuning; any of them with the attention through
           adainfer.kernels.attention's Triton kernel, FUSE:triton, and the MLP's gate and up as two products
           instead of one, FUSE:two or FUSE:triton:two) with their agreement with the default graph's tokens
           and the seconds their first calls take (captures and compiles, at full and at half depth)
  exit     a forced exit at half depth in captured decode: ms/token against dense, as a fraction of the ideal 2x
  profile  batch-1 decode under torch.profiler: kernels per token, device-busy time against wall-clock, the top five;
           and a batch-1 prefill of 512 tokens through the modules, the compiled blocks and (GPU) the captured ones,
           with the host's top five, each dense and with a never-firing check after every block (8 candidate rows,
           read every 4, replayed on a GPU): where the checks' overhead goes
  prefill  512 and 2048 tokens at batch 1 and 8, last-token logits: ours (the modules, each block compiled by
           inductor: --prefill compiled, fast_prefill.compile_prefill, and on a GPU those blocks replayed from CUDA
           graphs: --prefill captured, fast_prefill.PrefillGraphs; first calls timed apart) against transformers
  checks   a never-firing exit check after every block (the real probe: Triton top-2 and the features), prefill of
           512 tokens, host read every check and every 4 checks, each check run eagerly or replayed as a CUDA graph
           (Plan.capture_checks, not yet the default), and the features over 8 candidate head rows (a
           classification task's answer tokens: Plan.candidates), and on a GPU the int8 check head replayed
           (--check-head int8), on each of those prefill paths: time
           over the same path's dense time; the bar adds the floor of a full-vocabulary check after every block once
           the dense pass is device-bound (the head's read at copy bandwidth over the dense time)
  kernel   the Triton top-2 exit check against the bare GEMV h @ W.T on the 32000 x 4096, 49152 x 2048 and 49152 x 576
           heads at batch 1 and 8: microseconds and fraction of copy bandwidth; also with its merge fused into the
           one launch (fused_merge=True, not yet the default) and how close it comes to the two-launch merge; the
           default call (its configuration autotuned on first use: adainfer.kernels.top2.config) and the GEMV both
           replayed from CUDA graphs (their kernels without the host's launch overhead), and the untuned defaults
           replayed so (what the autotuner bought); at batch 1 also the int8 head (--check-head int8) through the
           same kernel

    python benchmarks/gpu_check.py [--out benchmarks/results/gpu_check.json] [--skip-tests] [--test-workers 8]
                                   [--hf-compile] [--sections decode,prefill,kernel] [--variants tuned,blocks:triton]
                                   [--batches 1,8] [--repeats 5]

The tests (tests/test_cuda.py, tests/test_kernel.py) run first, dealt to --test-workers pytest processes at once
(mostly compiling on the host's cores: one process took ~6 minutes on the H100 machine, 4 took 271 s, their longest
251 s against a shortest 143 s), balanced by each test's seconds in the last recorded run (gpu_tests.TEST_SECONDS);
the measurements after them run alone. By default the sections of the issue's table (decode with its exit, prefill
with its checks, kernel); the profile and the other decode captures (--variants, each compiling its own graphs) are
asked for. The JSON has each section's seconds (section_seconds) and the tests' (tests.seconds): the issue asks for
the default under 5 minutes.

Prints each table and the bar (goal, measured, met) and writes JSON with the machine. `--device cpu --tiny` runs the
same code on a tiny model (seconds; the kernel section needs CUDA): how CPU CI keeps this script working.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
from common import machine, print_table, write_json  # noqa: E402
from gpu_bar import CANDIDATES, bar  # noqa: E402
from gpu_tests import TEST_WORKERS, run_tests  # noqa: E402

from adainfer.exit import ExitClassifier, ExitRule, Plan, never_rule  # noqa: E402
from adainfer.fast_decode import ATTENTIONS, FUSES, DecodeGraph, c_compiler, decode_graph  # noqa: E402
from adainfer.fast_prefill import compile_prefill, prefill_mode  # noqa: E402
from adainfer.generate import generate  # noqa: E402
from adainfer.loading import load_model  # noqa: E402

SHAPES = {  # Hugging Face LlamaConfig kwargs
    "llama-3.2-1b": dict(vocab_size=49152, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                         max_position_embeddings=4096),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, max_position_embeddings=512),
}
HEADS = ((32000, 4096), (49152, 2048), (49152, 576))
SECTIONS = ("decode", "profile", "prefill", "kernel")
TABLE = ("decode", "prefill", "kernel")  # the default: the table (profile: what to fix next, on request)


def build(shape: str, device: str, dtype: torch.dtype, root: Path):
    """(transformers model, our model) with the same random weights, ours through the converter."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from weights_convert import convert

    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[shape], initializer_range=0.02, attn_implementation="sdpa")
    with torch.device(device):
        hf = LlamaForCausalLM(config).to(dtype).eval().requires_grad_(False)
    hf.save_pretrained(root / "hf")
    convert(root / "hf", root / "ours", dtype={torch.bfloat16: "bfloat16", torch.float32: "float32"}[dtype],
            progress=False)
    ours = load_model(root / "ours", str(dtype)[6:], device)[0]
    return hf, ours


class Timer:
    def __init__(self, device: str, repeats: int):
        self.cuda, self.repeats = device == "cuda", repeats

    def __call__(self, fn) -> float:
        """Median seconds of fn() after one warm-up call, the device synchronised around each."""
        fn()
        times = []
        for _ in range(self.repeats):
            self.sync()
            t0 = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]

    def once(self, fn) -> float:
        """Seconds of one cold call of fn (its captures and compiles included)."""
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t0

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()


def copy_bandwidth(device: str, timer: Timer) -> float:
    """Bytes per second of a device-to-device copy (read + write counted)."""
    x = torch.empty(256 * 1024 * 1024 if device == "cuda" else 16 * 1024 * 1024, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    return 2 * x.numel() / timer(lambda: y.copy_(x))


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def half_depth_rule(L: int, device: str) -> ExitRule:
    """Fires at its first check, after L // 2 blocks, for every row (zero weights, positive bias)."""
    return ExitRule(ExitClassifier("svm", ["gap"], [0.0], 1.0, first_layer=L // 2), device)


def variant_specs(asked: list[str], default: str) -> dict[str, tuple[str, str, str | None]]:
    """--variants (FUSE[:ATTENTION][:two]; all: every fuse but the default) -> {column name: (fuse, attention,
    gate_up)}, in the order asked, the default graph left out: a name is the fuse, then _triton where the attention
    is the Triton kernel, then _two where the MLP's gate and up run as two products (DecodeGraph's gate_up)."""
    wanted = [f for f in FUSES if f != default and "all" in asked] + [v for v in asked if v != "all"]
    out = {}
    for v in wanted:
        fuse, *rest = v.split(":")
        attention = next((a for a in rest if a in ATTENTIONS), "sdpa")
        gate_up = "two" if "two" in rest else None
        if (fuse, attention, gate_up) != (default, "sdpa", None):
            name = fuse + ("" if attention == "sdpa" else f"_{attention}") + ("_two" if gate_up else "")
            out[name] = (fuse, attention, gate_up)
    return out


def bench_decode(hf, ours, device, timer, new, hf_compile, variants, batches=(1, 8)) -> tuple[list[dict], dict]:
    """`variants`: the other decode graphs to time beside the default one ({fuse: DecodeGraph}, on a GPU; else {})."""
    L = ours.config.n_layers
    graph = decode_graph(ours, "compiled")
    rows, same = [], {}
    for B in batches:
        g = torch.Generator().manual_seed(B)
        ids = torch.randint(10, ours.config.vocab_size, (B, 32), generator=g).tolist()
        row = {"batch": B, "new_tokens": new}

        def per_token(run):  # (time of prompt + new tokens - time of prompt + 1 token) / (new - 1)
            return 1e3 * (timer(lambda: run(new)) - timer(lambda: run(1))) / (new - 1)

        half = Plan(exit=half_depth_rule(L, device))

        def first_calls(g) -> float:  # seconds of the first dense and half-depth runs: their captures and compiles
            return timer.once(lambda: generate(ours, ids, 4, graph=g)) + timer.once(
                lambda: generate(ours, ids, 4, half, graph=g))

        row["ours_eager_ms"] = per_token(lambda n: generate(ours, ids, n))
        row["graph_first_calls_s"] = first_calls(graph)
        row["ours_graph_ms"] = per_token(lambda n: generate(ours, ids, n, graph=graph))
        row["ours_graph_half_depth_ms"] = per_token(lambda n: generate(ours, ids, n, half, graph=graph))
        row["half_depth_fraction_of_ideal_2x"] = row["ours_graph_ms"] / row["ours_graph_half_depth_ms"] / 2
        ours_tokens = [r.token_ids for r in generate(ours, ids, new, graph=graph)]
        for f, other in variants.items():  # the same graphs replaying other kernels (DecodeGraph(fuse=f))
            try:
                row[f"{f}_first_calls_s"] = first_calls(other)
                row[f"ours_{f}_ms"] = per_token(lambda n: generate(ours, ids, n, graph=other))
                row[f"ours_{f}_half_depth_ms"] = per_token(lambda n: generate(ours, ids, n, half, graph=other))
                row[f"{f}_half_depth_fraction_of_ideal_2x"] = row[f"ours_{f}_ms"] / row[f"ours_{f}_half_depth_ms"] / 2
                b = [r.token_ids for r in generate(ours, ids, new, graph=other)]
                row[f"{f}_same_tokens_as_graph"] = sum(
                    x == y for r, q in zip(ours_tokens, b) for x, y in zip(r, q)) / (B * new)
            except Exception as e:  # noqa: BLE001 (a variant that fails is said in its row; the rest still measured)
                row[f"{f}_error"] = failure(f"decode variant fuse={f}", e)
        x = torch.tensor(ids, device=device)

        def hf_run(n, **kw):
            with torch.inference_mode():
                return hf.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, **kw)

        row["hf_ms"] = per_token(hf_run)
        if hf_compile:
            hf.generation_config.cache_implementation = "static"
            hf.forward = torch.compile(hf.forward, mode="reduce-overhead")
            row["hf_static_compiled_ms"] = per_token(hf_run)
            del hf.forward  # back to the eager forward for the rest
            hf.generation_config.cache_implementation = None
        hf_tokens = hf_run(new)[:, 32:].tolist()
        same[B] = sum(a == b for r, s in zip(ours_tokens, hf_tokens) for a, b in zip(r, s)) / (B * new)
        row["same_tokens_as_hf"] = same[B]  # a random bfloat16 model's top-2 logits sit ~0.05 apart: greedy
        # continuations part ways by rounding alone; the first token's logits say whether the numerics agree
        with torch.inference_mode():
            first = ours(x).logits.float() - hf(x, logits_to_keep=1).logits[:, -1].float()
        row["first_logits_max_diff_vs_hf"] = float(first.abs().max())
        rows.append(row)
        print_table(rows[-1:], list(row))
    return rows, same


def bench_profile(ours, device, new: int, variants) -> list[dict]:
    """Where a decoded token's time goes, batch 1 through the decode graph (and the other ones on a GPU): the kernels
    (on a CPU the operators) a token runs, their summed device time against the wall-clock (a step that is mostly
    idle device time is host-bound), and the five costliest (the JSON has them all)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device == "cuda"
    graphs = {"graph": decode_graph(ours, "compiled"), **variants}
    ids = [list(range(10, 42))]
    rows = []
    for name, graph in graphs.items():
        try:
            generate(ours, ids, new, graph=graph)  # captures (compiles) outside the profile
            with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
                t0 = time.perf_counter()
                generate(ours, ids, new, graph=graph)
                if cuda:
                    torch.cuda.synchronize()
                wall = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 (a variant that fails: said in its row, the others profiled)
            rows.append({"graph": name, "new_tokens": new, "error": failure(f"decode profile ({name})", e)})
            continue
        kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
        events = [e for e in prof.key_averages() if e.device_type == kind]

        def spent(e) -> float:  # microseconds of the event itself
            return getattr(e, "self_device_time_total", 0.0) if cuda else e.self_cpu_time_total

        events.sort(key=spent, reverse=True)
        busy = sum(spent(e) for e in events) / 1e6
        top5 = "; ".join(f"{e.key[:48]} {spent(e) / new:.0f}us x{e.count / new:.0f}" for e in events[:5])
        rows.append({"graph": name, "new_tokens": new, "wall_ms_per_token": 1e3 * wall / new,
                     "device_busy_ms_per_token": 1e3 * busy / new,
                     "kernels_per_token": sum(e.count for e in events) / new, "top5": top5,
                     # every kernel (operator), for reading off the machine: name, us and calls a token
                     "all": [[e.key, round(spent(e) / new, 2), round(e.count / new, 2)] for e in events]})
        print_table(rows[-1:], [k for k in rows[-1] if k != "all"])
    return rows


def profile_prefill(ours, device, tokens: int, calls: int = 5) -> list[dict]:
    """Where a batch-1 prefill of `tokens` goes, through the modules and through the compiled blocks (and on a GPU
    the captured ones), each dense and with a never-firing check after every block (over CANDIDATES head rows, read
    every 4 checks, replayed as CUDA graphs on a GPU: the check variant nearest the bar): wall-clock, device-busy time
    and kernels a call (on a GPU), and the host's five costliest operators or regions by their own time (dynamo's
    cache lookups, the compiled graphs' wrappers, the dispatched ops): a call whose device time is far under its
    wall-clock is host-bound, and these say on what; the checks' rows, what a check adds."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device == "cuda"
    x = torch.arange(10, 10 + tokens, device=device)[None]
    checks = Plan(exit=ExitRule(never_rule(), device), sync_every=4, capture_checks=cuda,
                  candidates=torch.arange(10, 10 + CANDIDATES, device=device))
    rows = []
    for path in ("modules", "compiled") + (("captured",) if cuda else ()):
        for plan in (None, checks):
            row = {"prefill": path, "checks": "no" if plan is None else "candidates, read every 4", "batch": 1,
                   "tokens": tokens}
            try:
                prefill_mode(ours, "eager" if path == "modules" else path)
                with torch.inference_mode():
                    for _ in range(2):  # (the compiled path's first call compiles, a check's first captures)
                        ours(x, plan=plan)
                    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
                    with profile(activities=activities) as prof:
                        t0 = time.perf_counter()
                        for _ in range(calls):
                            ours(x, plan=plan)
                        if cuda:
                            torch.cuda.synchronize()
                        wall = (time.perf_counter() - t0) / calls
            except Exception as e:  # noqa: BLE001 (the compiled path: said in its row, the decode profile kept)
                rows.append({**row, "error": failure(f"prefill profile ({path}, checks {row['checks']})", e)})
                continue
            finally:
                compile_prefill(ours, False)
            events = prof.key_averages()
            host = sorted((e for e in events if e.device_type == torch.autograd.DeviceType.CPU),
                          key=lambda e: e.self_cpu_time_total, reverse=True)
            kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
            rows.append({**row, "wall_ms": 1e3 * wall,
                         "device_busy_ms": sum(e.self_device_time_total for e in kernels) / 1e3 / calls if cuda
                         else None,
                         "kernels": sum(e.count for e in kernels) / calls if cuda else None,
                         "host_top5": "; ".join(f"{e.key[:40]} {e.self_cpu_time_total / calls:.0f}us "
                                                f"x{e.count / calls:.0f}" for e in host[:5])})
            print_table(rows[-1:], list(rows[-1]))
    return rows


def bench_prefill(hf, ours, device, timer, lengths) -> list[dict]:
    """Each shape through the modules (`ours`), inductor's compiled blocks (compile_prefill: `compiled`) and on a GPU
    those replayed from CUDA graphs (PrefillGraphs: `captured`), their first call at each shape timed apart (the
    compiles and captures), against transformers; at the first length, a never-firing check after every block on
    each, over the same path's dense time. A failure of a compiled path is recorded in its row (`compiled_error`,
    `captured_error`) and the others still measured."""
    rows = []
    checks = {  # name: (read every N checks, captured, candidate rows only, check head)
        "check_every_block": (1, False, False, "full"), "check_every_block_read_every_4": (4, False, False, "full"),
        "check_every_block_captured": (1, True, False, "full"),
        "check_every_block_captured_read_every_4": (4, True, False, "full"),
        "check_every_block_candidates": (1, False, True, "full"),
        "check_every_block_candidates_captured": (1, True, True, "full"),
        "check_every_block_candidates_captured_read_every_4": (4, True, True, "full")}
    if device == "cuda":  # the int8 head through the Triton kernel (on the CPU the int8 kernels are C++, built apart)
        checks["check_every_block_int8_captured"] = (1, True, False, "int8")
    failed = False
    for B in (1, 8):
        for T in lengths:
            x = torch.randint(10, ours.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(T)).to(device)
            row = {"batch": B, "tokens": T}
            with torch.inference_mode():
                modules = ours(x).logits
                row["hf_ms"] = 1e3 * timer(lambda: hf(x, logits_to_keep=1, use_cache=False))
                # captured last: a capture that fails may leave the device unusable for what follows it
                paths = ("ours", "compiled") + (("captured",) if device == "cuda" and not failed else ())
                for path in paths:
                    try:
                        prefill_path(ours, x, path, modules, row, timer, checks, T == lengths[0], device)
                    except Exception as e:  # noqa: BLE001 (a compiled path: said in the row, the rest measured)
                        if path == "ours":
                            raise
                        row[f"{path}_error"] = failure(f"{path} prefill", e)
                        failed |= path == "captured"  # (not tried again at the other shapes)
                    finally:
                        compile_prefill(ours, False)
            row["speedup_vs_hf"] = row["hf_ms"] / row["ours_ms"]
            for path in ("compiled", "captured"):
                if f"{path}_ms" in row:
                    row[f"{path}_speedup_vs_hf"] = row["hf_ms"] / row[f"{path}_ms"]
            rows.append(row)
            print_table(rows[-1:], list(row))
    return rows


def prefill_path(ours, x, path: str, modules, row: dict, timer, checks: dict, with_checks: bool, device) -> None:
    """One path of bench_prefill ("ours": the modules; "compiled": compile_prefill; "captured": the compiled blocks
    replayed from CUDA graphs, PrefillGraphs) into `row`."""
    prefill_mode(ours, "eager" if path == "ours" else path)
    if path != "ours":
        row[f"{path}_first_call_s"] = timer.once(lambda: ours(x))
        row[f"{path}_max_abs_diff"] = (ours(x).logits - modules).abs().max().item()
    row[f"{path}_ms"] = 1e3 * timer(lambda: ours(x))
    if path == "captured":  # what generate runs: the prompt left-padded (here by one token) to a multiple, masked
        pad = torch.ones_like(x, dtype=torch.bool)
        pad[:, 0] = False
        row["captured_masked_ms"] = 1e3 * timer(lambda: ours(x, pad_mask=pad))
    # capture: Plan.capture_checks; candidates: the features over CANDIDATES head rows (a task's answer tokens)
    candidates = torch.arange(10, 10 + CANDIDATES, device=device)
    for name, (window, capture, restrict, head) in checks.items() if with_checks else ():
        plan = Plan(exit=ExitRule(never_rule(), device), sync_every=window, capture_checks=capture,
                    candidates=candidates if restrict else None, check_head=head)
        timer.once(lambda: ours(x, plan=plan))  # (its first call compiles the blocks' variant)
        t = 1e3 * timer(lambda: ours(x, plan=plan))
        row[f"{'' if path == 'ours' else path + '_'}{name}_overhead"] = t / row[f"{path}_ms"] - 1


def graphed(fn):
    """fn captured in a CUDA graph (after a warm-up call): its replay."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def bench_kernel(timer_bw: float) -> list[dict]:
    """kernel_rows, each configuration tuned afresh (what a user's first call on that head does)."""
    import adainfer.kernels.top2 as top2

    top2._tuned.clear()
    return kernel_rows(timer_bw)


def kernel_rows(timer_bw: float) -> list[dict]:
    from triton.testing import do_bench

    from adainfer.kernels.top2 import _default_config, config, lm_head_top2_reference, lm_head_top2_triton
    from adainfer.quant import quantize_int8

    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for V, d in HEADS:
        w = (torch.randn(V, d, generator=g, device="cuda") * 0.02).to(torch.bfloat16)
        nw = torch.ones(d, device="cuda", dtype=torch.bfloat16)
        gb = w.numel() * w.element_size()
        for B in (1, 8):
            h = torch.randn(B, d, device="cuda", dtype=torch.bfloat16, generator=g)
            t_kernel = do_bench(lambda: lm_head_top2_triton(h, w, nw), warmup=25, rep=200, return_mode="median") / 1e3
            t_gemv = do_bench(lambda: h @ w.T, warmup=25, rep=200, return_mode="median") / 1e3
            t_fused = do_bench(lambda: lm_head_top2_triton(h, w, nw, fused_merge=True), warmup=25, rep=200,
                               return_mode="median") / 1e3
            # the same call replayed from a CUDA graph: the kernels' own time, without the host's launch overhead
            t_graph = do_bench(graphed(lambda: lm_head_top2_triton(h, w, nw)), warmup=25, rep=200,
                               return_mode="median") / 1e3
            t_gemv_graph = do_bench(graphed(lambda: h @ w.T), warmup=25, rep=200, return_mode="median") / 1e3
            fixed = _default_config(h.device, B, d)  # the untuned defaults, for what the autotuner bought
            t_fixed_graph = do_bench(graphed(lambda: lm_head_top2_triton(h, w, nw, **fixed)), warmup=25, rep=200,
                                     return_mode="median") / 1e3
            # the fused merge first: a merge that read another launch's partials would show here as a large error
            fused = lm_head_top2_triton(h, w, nw, fused_merge=True)
            got, want = lm_head_top2_triton(h, w, nw), lm_head_top2_reference(h.float(), w.float(), nw.float())
            rows.append({"head": f"{V} x {d}", "batch": B, "kernel_us": 1e6 * t_kernel, "gemv_us": 1e6 * t_gemv,
                         "kernel_over_gemv": t_kernel / t_gemv, "kernel_fraction_of_copy_bw": gb / t_kernel / timer_bw,
                         "gemv_fraction_of_copy_bw": gb / t_gemv / timer_bw,
                         "same_top1": bool(torch.equal(got.top1, want.top1)),
                         "kernel_in_graph_us": 1e6 * t_graph, "gemv_in_graph_us": 1e6 * t_gemv_graph,
                         "kernel_in_graph_over_gemv_in_graph": t_graph / t_gemv_graph,
                         "kernel_in_graph_fraction_of_copy_bw": gb / t_graph / timer_bw,
                         "config": config(h, w, nw, 1e-5), "untuned_in_graph_us": 1e6 * t_fixed_graph,
                         "fused_merge_us": 1e6 * t_fused,
                         "fused_merge_over_gemv": t_fused / t_gemv,
                         "fused_merge_same_bits": all(bool(torch.equal(a, b)) for a, b in zip(fused, got)),
                         "fused_merge_same_top1": bool(torch.equal(fused.top1, got.top1)),
                         "fused_merge_max_rel_diff": max(float(((a - b).abs() / b.abs()).max())
                                                         for a, b in zip(fused[1:], got[1:]))})
            if B == 1:  # --check-head int8: the same head as int8 values and scales, through the same kernel
                q, scale = quantize_int8(w)
                t_int8 = do_bench(graphed(lambda: lm_head_top2_triton(h, q, nw, scale=scale)), warmup=25, rep=200,
                                  return_mode="median") / 1e3
                int8, exact = lm_head_top2_triton(h, q, nw, scale=scale), lm_head_top2_reference(
                    h.float(), q, nw.float(), scale=scale)
                rows[-1].update({"int8_in_graph_us": 1e6 * t_int8, "int8_over_gemv_in_graph": t_int8 / t_gemv_graph,
                                 "int8_fraction_of_copy_bw": (q.numel() + 4 * scale.numel()) / t_int8 / timer_bw,
                                 "int8_same_top1_as_its_reference": bool(torch.equal(int8.top1, exact.top1)),
                                 "int8_config": config(h, q, nw, 1e-5, scale)})
            print_table(rows[-1:], list(rows[-1]))
    return rows


def failure(what: str, e: Exception) -> str:
    """What broke, said on stderr and returned for the JSON (a part that failed; the rest is still measured)."""
    said = f"{type(e).__name__}: {e}"[:500]
    print(f"{what} failed: {said}", file=sys.stderr)
    return said


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_check.json"))
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="a tiny model and short runs (a check of this script)")
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--test-workers", type=int, default=TEST_WORKERS,
                   help=f"pytest processes the tests are dealt to (default: half this host's cores, at most 8: "
                        f"{TEST_WORKERS})")
    p.add_argument("--hf-compile", action="store_true", help="also transformers' static cache + torch.compile (slow)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batches", type=lambda v: [int(b) for b in v.split(",")], default=[1, 8],
                   help="comma-separated: the decode section's batch sizes (default 1,8; the bar's are 1 and 8)")
    p.add_argument("--sections", type=lambda v: v.split(","), default=list(TABLE),
                   help=f"comma-separated: which of {', '.join(SECTIONS)} to measure, in that order "
                        f"(default: {','.join(TABLE)})")
    p.add_argument("--variants", type=lambda v: v.split(","), default=[],
                   help=f"comma-separated: decode graphs of other `fuse`s ({', '.join(FUSES)}; all: every one but "
                        f"the default), each as FUSE, FUSE:triton (its attention through "
                        f"adainfer.kernels.attention), FUSE:two (the MLP's gate and up as two products) or "
                        f"FUSE:triton:two, timed and profiled beside the default one (GPU; not given: the default "
                        f"only)")
    args = p.parse_args(argv)
    # `timeout` (or a lent machine's limit) stops this script with SIGTERM: exit through the finally blocks, so the
    # test processes it started stop with it instead of holding the GPU
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    known_variants = (*(f + a + t for f in FUSES for a in ("", *(f":{a}" for a in ATTENTIONS)) for t in ("", ":two")),
                      "all")
    for option, given, known, choose in (
            ("--sections", args.sections, SECTIONS, ", ".join(SECTIONS)),
            ("--variants", args.variants, known_variants,
             f"{', '.join(FUSES)}, all; each may add :{' or :'.join(ATTENTIONS)}, then :two")):
        unknown = sorted(set(given) - set(known))
        if unknown:
            print(f"error: {option}: unknown {', '.join(unknown)} (choose from {choose})", file=sys.stderr)
            return 2
    if min(args.batches) < 1:
        print(f"error: --batches: {','.join(map(str, args.batches))} (each at least 1)", file=sys.stderr)
        return 2
    if args.test_workers < 1:
        print(f"error: --test-workers: {args.test_workers} (at least 1)", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device: CUDA is not available here (--device cpu --tiny checks the script)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    result = {"machine": machine(), "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "torch": torch.__version__, "transformers": transformers.__version__, "date": time.strftime("%Y-%m-%d"),
              "shape": "tiny" if args.tiny else "llama-3.2-1b", "command": " ".join(sys.argv)}
    if not args.skip_tests:
        result["tests"] = run_tests(args.test_workers)
        write_json(Path(args.out), result)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    # A compiled function past dynamo's recompile limit runs uncompiled, silently: here it raises (and is reported).
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    timer = Timer(args.device, args.repeats)
    with tempfile.TemporaryDirectory() as root:
        hf, ours = build(result["shape"], args.device, dtype, Path(root))
    bw = copy_bandwidth(args.device, timer)
    result["copy_bandwidth_GBps"] = bw / 1e9
    result["weight_GB"] = weight_bytes(ours) / 1e9
    result["weight_read_limit_ms"] = 1e3 * weight_bytes(ours) / bw
    result["head_GB"] = ours.head_weight.numel() * ours.head_weight.element_size() / 1e9  # what a full check reads
    result["n_layers"] = ours.config.n_layers
    print(f"weights {result['weight_GB']:.2f} GB, copy bandwidth {bw / 1e9:.0f} GB/s: weight-read limit "
          f"{result['weight_read_limit_ms']:.3f} ms/token")
    default = decode_graph(ours, "compiled").fuse
    # (a captured path's option; inductor's need a C compiler, without which the default is the eager step's)
    specs = variant_specs(args.variants, default) if args.device == "cuda" and c_compiler() else {}
    if default in args.variants:
        print(f"--variants: {default} is the default graph, measured anyway", file=sys.stderr)
    if args.variants and not (args.device == "cuda" and c_compiler()):
        print("--variants: the other captures need a GPU with a C compiler: none timed", file=sys.stderr)
    variants = {name: DecodeGraph(ours, "compiled", fuse=f, attention=a, gate_up=g)
                for name, (f, a, g) in specs.items()}
    result["graph_fuse"], result["variants"] = default, list(variants)  # one graph each for both sections
    sections = {"decode": lambda: bench_decode(hf, ours, args.device, timer, 16 if args.tiny else 128,
                                               args.hf_compile, variants, args.batches)[0],
                "profile": lambda: bench_profile(ours, args.device, 8 if args.tiny else 32, variants)
                + profile_prefill(ours, args.device, 16 if args.tiny else 512),
                "prefill": lambda: bench_prefill(hf, ours, args.device, timer, (16, 64) if args.tiny else (512, 2048)),
                "kernel": lambda: bench_kernel(bw) if args.device == "cuda" else None}
    sections = {k: sections[k] for k in dict.fromkeys(args.sections)}  # in the order given
    result["section_seconds"] = {}
    for name, section in sections.items():  # a failing section is reported, the others still run
        started = time.perf_counter()
        try:
            result[name] = section()
        except Exception as e:  # noqa: BLE001 (a measurement script: say what broke and go on)
            result[name], result[f"{name}_error"] = None, f"{type(e).__name__}: {e}"
            print(f"{name} failed: {result[f'{name}_error']}", file=sys.stderr)
        result["section_seconds"][name] = time.perf_counter() - started
        write_json(Path(args.out), result)  # what is measured so far, should the run be cut off
    result["bar"] = bar(result)
    if result["bar"]:  # (the goals of the sections measured)
        print()
        print_table(result["bar"], ["goal", "target", "measured", "met"])
    result["seconds"] = time.perf_counter() - t0
    write_json(Path(args.out), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
