"""python -m adainfer.run: answer prompts with early exit, showing exit layer and time against the dense run.

With no arguments it runs a short few-shot sentiment prompt on the default model (SmolLM2-135M-Instruct, fetched
and converted on first use) with the shipped exit classifier.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from adainfer.cli import add_check_options, add_prefill_option, check_check_options, cli_main
from adainfer.errors import AdainferError

DEFAULT_PROMPT = (
    "Q: a gripping, beautifully acted film\nA: positive\n\n"
    "Q: the plot is a tedious, predictable mess\nA: negative\n\n"
    "Q: one of the warmest comedies of the year\nA: positive\n\n"
    "Q: flat characters and a script that goes nowhere\nA: negative\n\n"
    "Q: a smart, funny and moving story\nA: positive\n\n"
    "Q: an utterly charming movie that made me laugh out loud\nA:"
)
# The default prompt's answer is one of its label words: it runs in candidate mode with the classifier shipped for
# them (fitted on SST-2's train split), which can exit where full-vocabulary features on this model rarely do.
DEFAULT_CANDIDATES = [" negative", " positive"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m adainfer.run", description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="converted model folder (default: the embedded SmolLM2-135M-Instruct)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="one prompt")
    src.add_argument("--prompts", type=Path, help='a .jsonl file, one {"prompt": "..."} a line')
    p.add_argument("--max-new-tokens", type=int, default=1, help="tokens to generate per prompt (default 1)")
    p.add_argument("--batch-size", type=int, default=1, help="prompts per forward (default 1)")
    p.add_argument("--dtype", default="auto",
                   help="auto (bfloat16 on a GPU or a CPU with AMX, else float32: the faster one), float32, bfloat16, "
                        "float16")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--decode", default="eager", choices=["eager", "compiled", "int4"],
                   help="how decode steps run: eager (the block loop, default), compiled (on a CPU one torch.compile "
                        "graph for full-depth steps, compiled on first use, ~1-2 min for the default model; on CUDA "
                        "CUDA graphs of inductor-compiled blocks, one per batch-size bucket and depth, sequence-mode "
                        "exits included) or int4 (that graph "
                        "on 4-bit block weights, an 8-bit head and int8 activations, C++ kernels built on first use; "
                        "CPU; lossy, see README)")
    add_prefill_option(p)
    add_check_options(p)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--tp", type=int, default=1, metavar="N",
                   help="under torchrun: ranks per model replica, tensor parallel (default 1: every rank holds the "
                        "whole model and runs its share of the prompts)")
    p.add_argument("--exit", type=Path, help="exit classifier file (default: the one shipped for the default model)")
    p.add_argument("--dense", action="store_true", help="no early exit: run every layer")
    p.add_argument("--candidates", nargs="+", metavar="TEXT",
                   help='restrict the answer and the exit features to these strings\' first tokens, e.g. " A" " B"')
    p.add_argument("--exit-mode", default="sequence", choices=["none", "sequence", "token"],
                   help="beyond the first token: none (dense), sequence (every token runs the depth the prompt "
                        "chose, default) or token (each token exits on its own, skipped layers' K/V propagated)")
    p.add_argument("--min-layers", type=int, help="never exit before this many blocks")
    p.add_argument("--check-head", default="full", choices=["full", "int8"],
                   help="exit features from the LM head in the model's dtype (full, default) or from an int8 copy "
                        "of it (full-vocabulary features; a quarter of float32's bytes per check on the CPU, 56%% of "
                        "a 16-bit head's on a GPU, read by the Triton kernel; answers still come from the "
                        "full-precision head)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (row i of the input uses seed + i)")
    p.add_argument("--truncate", action="store_true",
                   help="cut prompts longer than the context to their last tokens (default: refuse them)")
    p.add_argument("--speculate", action="store_true",
                   help="self-speculative decoding: a subset of the model's blocks drafts, the whole model "
                        "verifies; greedy: the same tokens as --dense; with --temperature: the same distribution as "
                        "dense sampling (the speculative rejection rule); the exit classifier is not used")
    p.add_argument("--draft-layers", metavar="SPEC",
                   help="with --speculate: the drafting blocks, e.g. 0-19 or 0,1,8-29 (default: the first two thirds)")
    p.add_argument("--draft-length", type=int, default=3, help="with --speculate: tokens drafted a round (default 3)")
    p.add_argument("--draft", type=Path, metavar="FILE",
                   help="with --speculate: a draft file from python -m adainfer.calibrate --draft (default: the one "
                        "shipped for the model, if any, unless --draft-layers is given); a draft its calibration "
                        "found slower than dense runs dense, saying so")
    p.add_argument("--draft-min-prob", type=float, default=0.0, metavar="P",
                   help="with --speculate: a row stops drafting in a round at a token its draft gives less than P "
                        "(default 0: always --draft-length)")
    p.add_argument("--draft-head", default="full", choices=["full", "int8"],
                   help="with --speculate: the draft's head, float or rounded to int8 (default full; --decode int4 "
                        "drafts with its int8 head either way)")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt, in input order")
    p.add_argument("--no-compare", action="store_true", help="do not time a dense run beside the exit run")
    return p


def main(argv: list[str] | None = None) -> int:
    return cli_main(build_parser(), run, argv)


def run(args: argparse.Namespace) -> int:
    """The CLI over adainfer.engine: read the prompts, load, generate, print."""
    from adainfer import distributed
    from adainfer.engine import SHIPPED, check_counts, load
    from adainfer.exit import shipped_classifier
    from adainfer.generate import Sampling

    check_counts(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)  # before anything loads
    world = distributed.init(args.device, args.tp)
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    if args.prompts:
        from adainfer.prompts import read_prompts

        sources, prompts = zip(*read_prompts(args.prompts))
    else:
        sources, prompts = ["--prompt"], [args.prompt if args.prompt is not None else DEFAULT_PROMPT]
    if args.dense and args.exit:
        raise AdainferError("--exit", "cannot be combined with --dense")
    check_check_options(args)
    drafting = (args.draft_layers is not None or args.draft_length != 3 or args.draft_min_prob or
                args.draft_head != "full")
    options = "--draft-layers/--draft-length/--draft-min-prob/--draft-head"
    if (drafting or args.draft) and not args.speculate:
        raise AdainferError(f"--draft/{options}", "only apply with --speculate")
    if drafting and args.draft:
        raise AdainferError("--draft", f"give a draft file or {options}, not both")
    if args.speculate and args.exit:
        raise AdainferError("--exit", "cannot be combined with --speculate (its answers are the dense model's)")
    from adainfer.speculative import check_draft

    check_draft(args.draft_length, args.draft_min_prob, args.draft_head)
    if args.draft_head == "int8" and args.device.startswith("cuda"):
        raise AdainferError("--draft-head", "int8 drafts run in the CPU's int8 kernels: with --device cuda use "
                                            "--draft-head full")
    with world.main_first():  # the default model is fetched and converted once, by rank 0
        engine = load(args.model, args.dtype, args.device, args.threads, progress=not args.json and world.main)
    draft, dense_why = None, None
    if args.speculate:
        from adainfer.speculative import Draft, default_layers, load_draft, parse_layers, shipped_draft

        L = engine.model.config.n_layers
        source = args.draft or (None if drafting else shipped_draft(engine.model.fingerprint))
        if source is not None:
            draft, reports = load_draft(source, engine.model)
            report = reports.get(args.decode)
            if report is None:  # its verdict was reached for other decode steps: say so, and draft
                print(f"speculative: the draft {source} was measured with --decode {', '.join(reports) or '?'}, "
                      f"not {args.decode}: running it unmeasured", file=sys.stderr)
            elif not report.get("pays", True):
                cpu = (report.get("machine") or {}).get("cpu")
                dense_why = (f"running dense: the draft {source} was measured at "
                             f"{report.get('predicted_speed_vs_dense')}x dense with --decode {args.decode} on {cpu} "
                             "(give --draft-layers to run a draft anyway)")
                draft = None
        else:
            spec = args.draft_layers or default_layers(L)
            draft = Draft(parse_layers(spec, L), args.draft_length, min_prob=args.draft_min_prob,
                          head=args.draft_head)
    candidates = args.candidates
    if (args.prompt is None and args.prompts is None and candidates is None and args.exit is None
            and args.max_new_tokens == 1 and shipped_classifier(engine.model.fingerprint, DEFAULT_CANDIDATES)):
        candidates = DEFAULT_CANDIDATES
    exit = None if args.dense or args.speculate else (args.exit or SHIPPED)
    choice = engine.resolve_exit(exit, candidates, args.min_layers, args.check_head)
    if args.exit_mode == "token" and args.max_new_tokens > 1 and choice.rule is not None and world.main:
        note = token_mode_note(engine.model, choice, args.check_head)
        if note:
            print(f"exit: {note}", file=sys.stderr)
    if args.decode != "eager" and args.max_new_tokens > 1 and not args.json and args.device == "cpu" and world.main:
        print(f"compiling the {args.decode} decode graph (first use on this machine: about a minute)...",
              file=sys.stderr, flush=True)
    if args.prefill != "eager" and not args.json and world.main:
        print("compiling the prompt's blocks (first use on this machine: seconds to a minute)...", file=sys.stderr,
              flush=True)
    results = engine.generate(list(prompts), args.max_new_tokens, exit=choice, mode=args.exit_mode,
                              sampling=sampling, batch_size=args.batch_size, check_head=args.check_head,
                              decode=args.decode, truncate=args.truncate, sources=list(sources),
                              compare_dense=(choice.rule is not None or draft is not None) and not args.json
                              and not args.no_compare, speculate=draft, prefill=args.prefill,
                              sync_every=args.sync_every, capture_checks=args.capture_checks)
    if not world.main:  # rank 0 prints for every rank
        return 0
    if dense_why:
        print(f"speculative: {dense_why}", file=sys.stderr)
    if args.json:
        for r in results:
            print(json.dumps(r.to_dict(), ensure_ascii=False))
        return 0
    model = engine.model
    weights = "int4 weights, " if args.decode == "int4" else ""
    print(f"model: {engine.path} ({model.config.arch}, {model.config.n_layers} layers), {str(model.dtype)[6:]}, "
          f"{weights}{args.decode} decode, {torch.get_num_threads()} threads")
    if draft is not None:
        blocks = args.draft_layers or (str(args.draft) if args.draft else f"0-{len(draft.layers) - 1}")
        print(f"speculative: blocks {blocks} ({len(draft.layers)} of {model.config.n_layers}) draft {draft.length} "
              "tokens a round, the whole model verifies")
    else:
        print(f"exit: {choice.description}")
    for i, r in enumerate(results):
        shown = r.prompt if len(r.prompt) <= 70 else "..." + r.prompt[-67:]
        print(f"[{i + 1}] {shown!r}")
        depth = f"exit at layer {r.layers_run[0]}/{r.num_layers}" if r.layers_run[0] < r.num_layers else \
            f"layers {r.layers_run[0]}/{r.num_layers}"
        if r.accepted is not None:
            depth = f"{len(r.token_ids) / max(1, len(r.accepted)):.2f} tokens per verify"
        line = f"    answer: {r.text!r}   {depth}   {1000 * r.seconds:.1f} ms"
        if r.dense_seconds is not None:
            speedup = r.dense_seconds / r.seconds if r.seconds else float("nan")
            same = "same answer" if r.dense_text == r.text else f"dense answered {r.dense_text!r}"
            line += f"   (dense {1000 * r.dense_seconds:.1f} ms, {speedup:.2f}x; {same})"
        print(line)
    return 0


def token_mode_note(model, choice, check_head: str) -> str | None:
    """Where token mode's checks cannot pay: every decode step checks, and a check reading more weights than the
    blocks left after it costs more than an exit there could save (on the default model a full-vocabulary check reads
    as much as 8 blocks: 0.74x dense measured, README)."""
    from adainfer.exit import check_cost_in_blocks

    L = model.config.n_layers
    cost = check_cost_in_blocks(model, check_head, None if choice.candidates is None else len(choice.candidates))
    last = L - math.ceil(cost)
    if choice.rule.first <= last:
        return None
    cheaper = "--candidates" if check_head == "int8" else \
        f"--check-head int8, {check_cost_in_blocks(model, 'int8'):.1f} blocks; --candidates"
    return (f"token mode checks every decode step, and a check here reads as many weights as {cost:.1f} blocks: past "
            f"layer {last} it costs more than an exit could save, and this classifier checks from layer "
            f"{choice.rule.first}, so expect token mode slower than dense (cheaper checks: {cheaper})")


if __name__ == "__main__":
    sys.exit(main())
