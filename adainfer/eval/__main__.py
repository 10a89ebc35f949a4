"""python -m adainfer.eval: accuracy, layers and wall-clock of early-exit methods against dense on a task.

Every method runs on the same rows in this one process, after a dense run that sets the clock; rows go in batches
sorted by length. The results JSON holds every row (prediction, gold, layers run, seconds) and the summary per
method; figures are written next to it.

    python -m adainfer.eval --task sst2 --shots 0 5 --method dense shortgpt-4 skip-last-4 gap-rule svm oracle \\
        --limit 200 --out results/sst2.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from adainfer.errors import AdainferError
from adainfer.eval.metrics import summarize

DEFAULT_METHODS = ["dense", "skip-last-3", "shortgpt-3", "skip-attn-latter-3", "gap-rule", "svm", "oracle"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m adainfer.eval", description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="converted model folder (default: the embedded SmolLM2-135M-Instruct)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--task", help="a built-in task: sst2, agnews, mmlu, csqa or squad (data from --data)")
    src.add_argument("--task-file", type=Path,
                     help='your own task, a .jsonl of {"prompt", "answer"}, {"text", "label"} (with --labels) or '
                          '{"question", "choices", "answer"} rows; every third row is the demonstration pool unless '
                          "--demos is given")
    p.add_argument("--labels", nargs="+", metavar="WORD", help="label words of a {text, label} task file")
    p.add_argument("--demos", type=Path, help="demonstrations for --task-file: a .jsonl of the same shape")
    p.add_argument("--data", type=Path, help="data folder in the layout of shared/data (default: $ADAINFER_DATA, "
                                             "else ../shared/data)")
    p.add_argument("--shots", type=int, nargs="+", default=[5], help="demonstrations (the paper: 0 5 10 15 20)")
    p.add_argument("--method", nargs="+", default=DEFAULT_METHODS, help=f"default: {' '.join(DEFAULT_METHODS)}")
    p.add_argument("--exit", type=Path, help="classifier for `svm`/`crf` (default: the shipped one)")
    p.add_argument("--limit", type=int, help="evaluate N rows of the eval split, sampled with --seed")
    p.add_argument("--template", help="qa (the paper's, default), review, or a template with {x} and {y}")
    p.add_argument("--seed", type=int, default=0, help="seed of the demonstrations and of the --limit sample")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--threads", type=int)
    p.add_argument("--calibration-prompts", type=int, default=32,
                   help="train-split prompts for ShortGPT's Block Influence (default 32)")
    p.add_argument("--out", type=Path, required=True,
                   help="results JSON; figures and the per-layer traces (.npz, reused by a rerun) go beside it")
    p.add_argument("--no-figures", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        evaluate(args)
    except AdainferError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def evaluate(args) -> dict:
    from adainfer.eval.methods import build_method, check_classifiers, parse_method
    from adainfer.loading import load_model
    from adainfer.tasks import answer_ids, label_candidates, task_prompts, task_source

    for spec in args.method:
        parse_method(spec)  # refuse a bad method name before any work
    if args.limit is not None and args.limit < 1 or args.batch_size < 1:
        raise AdainferError("--limit/--batch-size", "must be at least 1")
    if any(k < 0 for k in args.shots):
        raise AdainferError("--shots", "must be 0 or more")
    if args.threads:
        torch.set_num_threads(args.threads)
    task = task_source(args.task, args.data, args.task_file, args.labels, args.demos)
    if args.model is None:
        from adainfer.default_model import default_model_dir

        args.model = default_model_dir()
    check_classifiers(args.method, args.model, args.exit)  # before the model loads and ShortGPT calibrates
    model, tok = load_model(args.model, args.dtype)
    if tok is None:
        raise AdainferError(args.model, "the model folder has no tokenizer")
    cand_texts = label_candidates(task)
    cands = None
    if cand_texts:
        cands = torch.tensor([tok.piece_id(c) for c in cand_texts])
        if len(set(cands.tolist())) != len(cands):
            cands = None  # label words that share a first token cannot be told apart by one token

    results = {"task": task.name, "task_file": str(args.task_file) if args.task_file else None,
               "model": str(args.model), "model_name": model.config.name,
               "n_layers": model.config.n_layers, "dtype": str(model.dtype)[6:], "limit": args.limit,
               "seed": args.seed, "template": args.template or "qa", "machine": machine(),
               "candidates": cand_texts if cands is not None else None, "runs": []}
    for shots in args.shots:
        rows = task_prompts(task, "eval", shots, args.seed, args.template, args.limit)
        ids = [tok.encode(p) for p, _ in rows]
        golds = [answer_ids(tok, ex) for _, ex in rows]
        calib = [tok.encode(p) for p, _ in task_prompts(task, "train", shots, args.seed + 1, args.template,
                                                         args.calibration_prompts)]
        methods = [build_method(spec, model, calib, args.exit, cands) for spec in args.method]
        traces_path = Path(args.out).with_name(f"{Path(args.out).stem}_{shots}shot_traces.npz")
        run = evaluate_shots(model, tok, ids, golds, cands, methods, args.batch_size, traces_path)
        run["shots"] = shots
        results["runs"].append(run)
        print_summary(task.name, shots, run)
    write_results(args.out, results)
    if not args.no_figures:
        from adainfer.eval.figures import write_figures

        for path in write_figures(results, args.out):
            print(f"wrote {path}")
    return results


def evaluate_shots(model, tok, ids, golds, cands, methods, batch_size, traces_path=None) -> dict:
    """Every method on every batch, the methods taking turns batch by batch (each batch starting with the next
    method), so that a slow spell of a shared machine, or the first run on a new shape, hits them all alike."""
    from tqdm import tqdm

    from adainfer.traces import collect_cached, oracle_layers

    L = model.config.n_layers
    traces = collect_cached(model, ids, traces_path, batch_size=batch_size, desc="traces", also=cands)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    methods = sorted(methods, key=lambda m: m.kind != "dense")
    depths = {}
    for m in methods:
        if m.kind == "oracle":
            depths[m.name] = oracle_layers(traces)
            m.info["pruning_ratio_candidates"] = (
                None if traces.top1_candidates is None else float(1 - oracle_layers(traces, True).mean() / L))
    records = {m.name: [None] * len(ids) for m in methods}
    seconds = dict.fromkeys(records, 0.0)
    for b, batch in enumerate(tqdm(batches, desc="methods", unit="batch", file=sys.stderr)):
        # The first run on a new batch shape pays for allocations the others reuse: rotate who goes first.
        for m in methods[b % len(methods):] + methods[:b % len(methods)]:
            seconds[m.name] += run_batch(model, tok, ids, golds, cands, batch, m.plan, depths.get(m.name),
                                         records[m.name])
    run = {"rows": len(ids), "per_layer": per_layer_stats(traces, golds), "methods": {}}
    for m in methods:
        summary = summarize(records[m.name], L, model.config.dim, model.config.vocab_size, seconds[m.name],
                            seconds[methods[0].name] if methods[0].kind == "dense" else None)
        run["methods"][m.name] = {"summary": summary, "info": m.info, "records": records[m.name]}
    return run


def run_batch(model, tok, ids, golds, cands, batch, plan, depths, records) -> float:
    """Run one batch with `plan`, or with forced exits at per-row `depths` (the oracle: rows grouped by depth);
    fill the rows' records; return the seconds spent in the model."""
    from adainfer.exit import Plan
    from adainfer.generate import left_pad

    pad = model.config.pad_id if model.config.pad_id is not None else 0
    if depths is None:
        groups = [(batch, plan)]
    else:
        levels = sorted({int(depths[i]) for i in batch})
        groups = [([i for i in batch if depths[i] == k], Plan(exit_at=k)) for k in levels]
    total = 0.0
    for rows, plan in groups:
        tokens, mask = left_pad([ids[i] for i in rows], pad, model.device)
        t0 = time.perf_counter()
        out = model(tokens, pad_mask=mask, plan=plan)
        dt = time.perf_counter() - t0
        total += dt
        order = list(range(model.config.n_layers)) if plan.layers is None else plan.layers
        for j, i in enumerate(rows):
            token, ran = int(out.token[j]), int(out.layers_run[j])
            rec = {"row": i, "prediction": token, "prediction_text": tok.decode([token]),
                   "gold": sorted(golds[i]), "correct": token in golds[i], "layers_run": ran,
                   "attn_skipped": sum(b in plan.skip_attn for b in order[:ran]),
                   "prompt_tokens": len(ids[i]), "seconds": dt / len(rows)}
            if cands is not None:
                logits = out.logits[j]
                if plan.candidates is None:
                    logits = logits[cands.to(logits.device)]
                pick = int(cands[int(logits.argmax())])
                rec["prediction_candidates"] = pick
                rec["correct_candidates"] = pick in golds[i]
            records[i] = rec
    return total


def per_layer_stats(traces, golds) -> dict:
    """Per-layer accuracy (Fig. 1) and mean features (Fig. 3) from the dense traces."""
    acc = [float(np.mean([t in g for t, g in zip(traces.top1[:, n], golds)])) for n in range(traces.n_layers)]
    out = {"accuracy": acc, "agreement_with_final": (traces.top1 == traces.top1[:, -1:]).mean(0).tolist()}
    if traces.top1_candidates is not None:
        out["accuracy_candidates"] = [float(np.mean([t in g for t, g in zip(traces.top1_candidates[:, n], golds)]))
                                      for n in range(traces.n_layers)]
    for f, v in traces.features.items():
        out[f"mean_{f}"] = v.mean(0).tolist()
    return out


def print_summary(task: str, shots: int, run: dict) -> None:
    from adainfer.eval.report import table

    print(f"\n{task}, {shots}-shot, {run['rows']} rows")
    print(table(run))


def write_results(path: Path, results: dict) -> None:
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(path)
    print(f"wrote {path}")


def machine() -> dict:
    import os
    import platform

    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}


if __name__ == "__main__":
    sys.exit(main())
