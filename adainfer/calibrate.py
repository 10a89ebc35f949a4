"""python -m adainfer.calibrate: fit an exit classifier for a model on a task's prompts and save it.

A thin command line over adainfer.calibration (the Python API: adainfer.calibrate); see there for what is fitted.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from adainfer.cli import add_prefill_option, check_prefill_option, cli_main
from adainfer.exit import FEATURES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m adainfer.calibrate", description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="converted model folder (default: the embedded SmolLM2-135M-Instruct)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--task", nargs="+", help="one or more of sst2 agnews mmlu csqa squad (their train splits)")
    src.add_argument("--task-file", type=Path,
                     help='your own task, a .jsonl of {"prompt", "answer"}, {"text", "label"} (with --labels) or '
                          '{"question", "choices", "answer"} rows; calibrates on its train part: every third row, '
                          "or --demos")
    src.add_argument("--prompts", type=Path, help='ready prompts, one {"prompt": ..., "answer": ...} a line')
    p.add_argument("--labels", nargs="+", metavar="WORD", help="label words of a {text, label} task file")
    p.add_argument("--demos", type=Path, help="train part of --task-file: a .jsonl of the same shape")
    p.add_argument("--data", type=Path, help="data folder in the layout of shared/data (default: $ADAINFER_DATA, "
                                             "else ../shared/data)")
    p.add_argument("--shots", type=int, default=5, help="demonstrations per prompt (default 5)")
    p.add_argument("--template", help="prompt template: qa (the paper's, default), review, or text with {x} and {y}")
    p.add_argument("--limit", type=int, default=400, help="prompts per task, sampled with --seed (default 400)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", choices=["final", "gold"], default="final")
    p.add_argument("--classifier", choices=["svm", "gap", "crf"], default="svm")
    p.add_argument("--features", nargs="+", default=["gap", "top_prob"], choices=FEATURES)
    p.add_argument("--threshold", type=float, default=0.8, help="gap rule threshold (default 0.8, the paper's)")
    p.add_argument("--candidates", nargs="+", metavar="TEXT",
                   help='restrict answers and features to these strings ("auto": the task\'s label words)')
    p.add_argument("--first-layer", type=int, help="first layer to check (default: calibrated)")
    p.add_argument("--target-agreement", type=float, default=0.99,
                   help="pick the first layer and a bias shift that keep at least this fraction of the train part's "
                        "answers equal to the dense ones, pruning the most layers (default 0.99; 0 = the paper's "
                        "plain fit, checking from the first layer where an exit was ever right)")
    p.add_argument("--check-cost", type=float, metavar="BLOCKS",
                   help="one exit check's time in blocks, weighed against the blocks an exit saves when the first "
                        "layer and bias are tuned (default: measured on this machine, a timing, so two fits can "
                        "differ; give a number for a reproducible fit; 0: checks are free)")
    p.add_argument("--stride", type=int, default=1, help="check every N layers (default 1)")
    p.add_argument("--translator", default="none", metavar="KIND",
                   help="read each checked layer through a fitted map before the exit check: affine (dim x dim per "
                        "layer), lowrank:R (identity + rank R) or none (default); written beside --out as "
                        "<stem>.translator.safetensors")
    p.add_argument("--translator-positions", type=int, default=8, metavar="N",
                   help="states per train prompt the translator is fitted on besides the last token's (default 8)")
    p.add_argument("--holdout", type=float, default=0.25, help="fraction of prompts held out for the report")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--check-dtype", nargs="+", default=[], metavar="DTYPE",
                   help="also run the held-out prompts in these dtypes (e.g. bfloat16 for a classifier fitted in "
                        "float32) and report the classifier there against that dtype's dense answers")
    p.add_argument("--threads", type=int)
    add_prefill_option(p)
    p.add_argument("--tp", type=int, default=1, metavar="N",
                   help="under torchrun: ranks per model replica, tensor parallel (default 1: data parallel only, "
                        "each rank runs its share of the prompts)")
    p.add_argument("--out", type=Path, required=True, help="classifier file to write (JSON)")
    p.add_argument("--report", type=Path, help="also write the held-out report as JSON here")
    p.add_argument("--traces", type=Path,
                   help="cache of the per-layer traces (.npz): reused when model, prompts and settings match, so "
                        "that refitting with other options skips running the model")
    p.add_argument("--default", action="store_true", help="mark the file as the model's default classifier")
    d = p.add_argument_group("speculative drafts (--draft: write a draft file for run --speculate --draft FILE "
                             "instead of an exit classifier)")
    d.add_argument("--draft", action="store_true",
                   help="measure a self-speculative draft on the prompts (greedy continuations, drafts accepted, "
                        "the step costs on this machine) and write it with the speed it predicts; a draft predicted "
                        "slower than dense makes run --speculate run dense and say why")
    d.add_argument("--draft-layers", metavar="SPEC",
                   help="drafting blocks, e.g. 0,1,8-29 (default: searched, by greedy block removal scored by the "
                        "speed predicted on this machine)")
    d.add_argument("--draft-length", type=int, default=3,
                   help="tokens drafted a round (default 3; with the search: the longest it tries)")
    d.add_argument("--draft-head", choices=["full", "int8"],
                   help="the draft's head (run's option; default: with the search, the one predicted faster, else "
                        "full)")
    d.add_argument("--draft-decode", nargs="+", default=["eager"], choices=["eager", "compiled", "int4"],
                   metavar="MODE", help="decode modes to measure the draft in (eager, compiled, int4; default eager): "
                                        "run --speculate --decode MODE reads that mode's verdict; the search is "
                                        "scored in the first of them in the order eager, compiled, int4")
    d.add_argument("--draft-min-prob", type=float, default=0.0, metavar="P", help="adaptive length (run's option)")
    d.add_argument("--draft-vocab", type=int, default=0, metavar="K",
                   help="the draft's head: the K most frequent tokens of the prompts' text (default 0: all rows)")
    d.add_argument("--draft-tokens", type=int, default=32, help="tokens generated per prompt to measure (default 32)")
    return p


def main(argv: list[str] | None = None) -> int:
    return cli_main(build_parser(), run, argv)


def run(args: argparse.Namespace) -> int:
    from adainfer import distributed
    from adainfer.calibration import FitOptions, calibrate, calibration_set, check_fit, print_report
    from adainfer.engine import load
    from adainfer.fast_prefill import prefill_mode
    from adainfer.translator import parse_kind

    world = distributed.init(args.device, args.tp)
    if args.draft:
        from adainfer.engine import check_counts
        from adainfer.errors import AdainferError
        from adainfer.speculative import check_draft

        if world.size > 1:
            raise AdainferError("--draft", "times decode steps in one process: run it without torchrun")
        check_counts(draft_tokens=args.draft_tokens)
        check_draft(args.draft_length, args.draft_min_prob, args.draft_head or "full")
    # Options and prompts first: bad input is refused before the model loads.
    check_fit(FitOptions(args.classifier, tuple(args.features), args.threshold, args.first_layer,
                         args.target_agreement, args.stride), args.label, args.holdout, args.batch_size,
              args.check_dtype)
    parse_kind(args.translator)
    check_prefill_option(args)
    data = calibration_set(tasks=args.task, task_file=args.task_file, prompts_file=args.prompts, labels=args.labels,
                           demos=args.demos, data=args.data, shots=args.shots, template=args.template,
                           limit=args.limit, seed=args.seed, candidates=args.candidates)
    with world.main_first():  # the default model is fetched and converted once, by rank 0
        engine = load(args.model, args.dtype, args.device, threads=args.threads, progress=world.main)
    if args.draft:
        prefill_mode(engine.model, args.prefill)
        return write_draft(engine, data, args)
    clf = calibrate(engine, data, label=args.label, classifier=args.classifier, features=args.features,
                    threshold=args.threshold, first_layer=args.first_layer, target_agreement=args.target_agreement,
                    stride=args.stride, holdout=args.holdout, seed=args.seed, batch_size=args.batch_size,
                    check_dtypes=args.check_dtype, traces=args.traces, default=args.default,
                    translator=args.translator, translator_positions=args.translator_positions,
                    check_cost=args.check_cost, progress=world.main, prefill=args.prefill)
    if not world.main:  # rank 0 prints and writes for every rank
        return 0
    print_report(clf)
    clf.save(args.out)
    if args.report:
        report = {"summary": clf.calibration["heldout"], "per_layer": clf.calibration["heldout_per_layer"]}
        args.report.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}" + ("" if clf.translator is None else
                                 f" and {args.out.with_name(args.out.stem + '.translator.safetensors')}"))
    return 0


def write_draft(engine, data, args: argparse.Namespace) -> int:
    """calibrate --draft (its options checked in run, before the model loads): search the blocks (unless given),
    measure the draft on the calibration prompts in each decode mode asked, write the draft file, print the
    verdicts."""
    from dataclasses import replace

    from adainfer.draft_search import Positions, best_draft, choose_head, cost_model, predict, search_blocks
    from adainfer.eval.harness import machine
    from adainfer.fast_decode import decode_graph
    from adainfer.generate import generate
    from adainfer.speculative import PAYS_AT, Draft, frequent_tokens, measure_draft, parse_layers, save_draft

    model, tok = engine.model, engine.tokenizer
    L = model.config.n_layers
    modes = sorted(dict.fromkeys(args.draft_decode), key=["eager", "compiled", "int4"].index)  # int4 rounds weights:
    vocab = frequent_tokens(tok, data.prompts, args.draft_vocab) if args.draft_vocab else None  # it goes last
    base = Draft(None, args.draft_length, vocab=vocab, min_prob=args.draft_min_prob, head=args.draft_head or "full")
    ids = [tok.encode(p) for p in data.prompts]
    search = None
    if args.draft_layers:
        draft = replace(base, layers=parse_layers(args.draft_layers, L))
    else:
        first = modes[0]
        print(f"searching the draft's blocks ({len(ids)} prompts, {args.draft_tokens} greedy tokens each; costs "
              f"with --decode {first})", flush=True)
        gens = [generate(model, [i], args.draft_tokens, eos_id=model.config.eos_id)[0].token_ids for i in ids]
        seqs = [(i + g[:-1], len(g) - 1) for i, g in zip(ids, gens) if len(g) > 1]
        where = Positions(model, seqs)
        path = search_blocks(where, base, min_blocks=max(1, L // 3),
                             progress=lambda step: print(f"  {len(step[0])} blocks: first-draft acceptance "
                                                         f"{step[1]:.3f}", flush=True))
        middle, graph = sorted(ids, key=len)[len(ids) // 2], decode_graph(model, first)
        costs = cost_model(model, middle, base, args.draft_length, graph=graph)
        blocks, length, _, speed = best_draft(path, costs)
        draft = replace(base, layers=blocks, length=length)
        heads = {}
        if args.draft_head is None and first != "int4":  # (int4 drafts read the int8 head either way)
            head, heads = choose_head(where, middle, draft, ["full", "int8"], graph=graph)
            draft = replace(draft, head=head)
            print(f"  head: {', '.join(f'{h} {v:.3f}x' for h, v in heads.items())} predicted", flush=True)
        search = {"decode": first, "costs": costs, "chosen_predicted_speed": round(speed, 4), "heads": heads,
                  "path": [{"blocks": b, "acceptance": round(a, 4),
                            "predicted_speed_by_length": {g: round(predict(a, g, len(b), costs)[1], 4)
                                                          for g in costs["verify_ms"]}} for b, a in path]}
    spec = ",".join(map(str, draft.layers))
    reports = {}
    for mode in modes:
        report = measure_draft(model, ids, draft, args.draft_tokens, eos_id=model.config.eos_id,
                               graph=decode_graph(model, mode))
        report.update({"decode": mode, "head_rows": len(vocab) if vocab is not None else model.config.vocab_size,
                       "dtype": str(model.dtype)[6:], "prompts_from": data.description, "machine": machine()})
        reports[mode] = report
    save_draft(draft, args.out, {"fingerprint": model.fingerprint, "name": model.config.name or str(engine.path),
                                 "n_layers": L}, reports, search)
    print(f"draft: blocks {spec} ({len(draft.layers)} of {L}), {draft.length} tokens a round, "
          f"{reports[modes[0]]['head_rows']} head rows ({draft.head})")
    for mode, report in reports.items():
        verdict = "it drafts" if report["pays"] else \
            f"under the {PAYS_AT}x a draft must reach: run --speculate with it runs dense"
        print(f"--decode {mode}: accepted per round {report['accepted_per_round']:.2f}, tokens per verify "
              f"{report['tokens_per_verify']:.2f}; dense step {report['dense_step_ms']:.1f} ms, draft step "
              f"{report['draft_step_ms']:.1f} ms, verify {report['verify_ms']:.1f} ms; predicted speed "
              f"{report['predicted_speed_vs_dense']:.2f}x dense on this machine ({verdict})")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
