"""python -m adainfer.calibrate: fit an exit classifier for a model on a task's prompts and save it.

Every prompt runs all layers once; after each block the last token's features (gap, top_prob, optional cosine
similarities) are paired with a label: 1 if that layer's top-1 equals the last layer's (--label final, the paper's
default) or the answer's first token (--label gold). A linear SVM (scikit-learn LinearSVC, default settings, with a
StandardScaler folded into the exported weights), the paper's gap rule, or a CRF over the layers is fitted on a train
part and reported on a held-out part. Checking starts at the first layer where an exit was ever right in the train
part. This is the only module that imports scikit-learn.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np
import torch

from adainfer.errors import AdainferError
from adainfer.exit import FEATURES, ExitClassifier, ExitRule, gap_rule
from adainfer.traces import Traces, collect_cached, decisions, final_labels, gold_labels, simulate, tokens_at


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
    p.add_argument("--stride", type=int, default=1, help="check every N layers (default 1)")
    p.add_argument("--holdout", type=float, default=0.25, help="fraction of prompts held out for the report")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--check-dtype", nargs="+", default=[], metavar="DTYPE",
                   help="also run the held-out prompts in these dtypes (e.g. bfloat16 for a classifier fitted in "
                        "float32) and report the classifier there against that dtype's dense answers")
    p.add_argument("--threads", type=int)
    p.add_argument("--out", type=Path, required=True, help="classifier file to write (JSON)")
    p.add_argument("--report", type=Path, help="also write the held-out report as JSON here")
    p.add_argument("--traces", type=Path,
                   help="cache of the per-layer traces (.npz): reused when model, prompts and settings match, so "
                        "that refitting with other options skips running the model")
    p.add_argument("--default", action="store_true", help="mark the file as the model's default classifier")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        calibrate(args)
    except AdainferError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def load_prompts(args) -> tuple[list[str], list[list[str] | None], dict, list[str] | None]:
    """(prompts, accepted answers per prompt or None, description, candidate strings), before any model loads."""
    from adainfer.prompts import read_jsonl
    from adainfer.tasks import label_candidates, task_prompts, task_source

    candidates = args.candidates
    if args.prompts:
        prompts, answers = [], []
        for n, row in read_jsonl(args.prompts):
            if not isinstance(row.get("prompt"), str):
                raise AdainferError(f"{args.prompts}:{n}", 'expected {"prompt": str, "answer": str (optional)}')
            prompts.append(row["prompt"])
            answer = row.get("answer")
            answers.append([answer] if isinstance(answer, str) and answer.strip() else None)
        if candidates == ["auto"]:
            raise AdainferError("--candidates", "auto needs --task or --task-file (it takes the task's label words)")
        return prompts, answers, {"prompts": str(args.prompts)}, candidates
    if not args.task and args.task_file is None:
        raise AdainferError("--task", "give --task NAME ..., --task-file FILE or --prompts FILE")
    tasks = [task_source(None, None, args.task_file, args.labels, args.demos)] if args.task_file else \
        [task_source(name, args.data, labels=args.labels, demos=args.demos) for name in args.task]
    prompts, answers, auto = [], [], []
    for task in tasks:
        auto.append(label_candidates(task))
        for prompt, ex in task_prompts(task, "train", args.shots, args.seed, args.template, args.limit):
            prompts.append(prompt)
            answers.append(ex.answers)
    if candidates == ["auto"]:
        if len(tasks) != 1 or auto[0] is None:
            raise AdainferError("--candidates", "auto needs exactly one task with label words or options (not a "
                                                "free-answer task)")
        candidates = auto[0]
    names = [str(args.task_file)] if args.task_file else args.task
    desc = {"tasks": names, "shots": args.shots, "template": args.template or "qa", "split": "train",
            "limit_per_task": args.limit, "seed": args.seed}
    return prompts, answers, desc, candidates


def calibrate(args) -> ExitClassifier:
    from adainfer.loading import load_model, resolve_dtype

    if args.threads:
        torch.set_num_threads(args.threads)
    for name in ("limit", "batch_size", "stride"):
        if getattr(args, name) < 1:
            raise AdainferError(f"--{name.replace('_', '-')}", "must be at least 1")
    if args.shots < 0:
        raise AdainferError("--shots", "must be 0 or more")
    if not 0 < args.holdout < 1:
        raise AdainferError("--holdout", "must be between 0 and 1")
    if args.classifier == "crf":
        try:
            import sklearn_crfsuite  # noqa: F401
        except ImportError:
            raise AdainferError("--classifier", "crf needs sklearn-crfsuite (pip install 'adainfer[crf]')") from None
    for name in args.check_dtype:
        try:
            resolve_dtype(name)
        except AdainferError as e:
            raise AdainferError("--check-dtype", e.problem) from None
    prompts, answers, desc, candidates = load_prompts(args)  # bad data is refused before the model loads
    if args.label == "gold" and any(a is None for a in answers):
        raise AdainferError("--label", "gold labels need an answer for every prompt")
    if args.model is None:
        from adainfer.default_model import default_model_dir

        args.model = default_model_dir()
    model, tok = load_model(args.model, args.dtype)
    if tok is None:
        raise AdainferError(args.model, "the model folder has no tokenizer")
    golds = [None if a is None else {tok.piece_id(" " + x.lstrip(" ")) for x in a} for a in answers]
    ids = [tok.encode(p) for p in prompts]
    from adainfer.generate import check_prompts

    check_prompts(ids, model, 1, "prompt")
    cand_ids = None
    if candidates:
        cand_ids = torch.tensor([tok.piece_id(c) for c in candidates], device=model.device)
        if len(set(cand_ids.tolist())) != len(cand_ids):
            raise AdainferError("--candidates", f"{candidates} do not start with distinct tokens, so one token "
                                                "cannot tell them apart")

    traces = collect_cached(model, ids, args.traces, args.features, cand_ids, args.batch_size, desc="calibrating")
    labels = final_labels(traces) if args.label == "final" else gold_labels(traces, golds)
    order = list(range(len(prompts)))
    random.Random(args.seed).shuffle(order)
    n_held = max(1, int(round(len(order) * args.holdout)))
    held, train = np.array(sorted(order[:n_held])), np.array(sorted(order[n_held:]))
    if len(train) == 0:
        raise AdainferError("--holdout", "leaves no prompts to fit on")

    L = model.config.n_layers
    if args.first_layer is not None and not 1 <= args.first_layer < L:
        raise AdainferError("--first-layer", f"must be between 1 and {L - 1}, got {args.first_layer}")
    clf, tuning = tune(args, traces.select(train), labels[train], L)
    clf.candidates = candidates
    clf.model = {"fingerprint": model.fingerprint, "name": model.config.name or str(args.model), "n_layers": L}
    held_golds = [golds[i] for i in held]
    report = evaluate(ExitRule(clf), traces.select(held), labels[held], held_golds, L)
    clf.calibration = {**desc, "label": args.label, "features_over": "candidates" if candidates else "vocabulary",
                       "dtype": str(model.dtype)[6:], "n_train_prompts": int(len(train)),
                       "n_heldout_prompts": int(len(held)),
                       "tuning": tuning, "heldout": report["summary"], "default": bool(args.default)}
    clf.validate(args.out)
    print_report(clf, report)
    for name in args.check_dtype:  # the same held-out prompts, features and dense answers in another dtype
        other = load_model(args.model, name)[0]
        t = collect_cached(other, [ids[i] for i in held], None, args.features, cand_ids, args.batch_size,
                           desc=f"held-out in {name}")
        lab = final_labels(t) if args.label == "final" else gold_labels(t, held_golds)
        s = evaluate(ExitRule(clf), t, lab, held_golds, L)["summary"]
        clf.calibration[f"heldout_{str(other.dtype)[6:]}"] = s
        print(f"held-out in {str(other.dtype)[6:]}: avg layers {s['avg_layers']:.2f}, pruning ratio "
              f"{100 * s['pruning_ratio']:.1f}%, agreement with its own dense answers "
              f"{100 * s['agreement_with_dense']:.1f}%")
    clf.save(args.out)
    if args.report:
        args.report.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
    return clf


SHIFTS = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0)  # bias shifts tried, in units of the decision function


def tune(args, traces: Traces, labels: np.ndarray, L: int) -> tuple[ExitClassifier, dict]:
    """Fit with checks from each candidate first layer and each bias shift; keep the classifier that prunes the
    most layers on the train part while its answers agree with the dense ones at least `target` of the time."""
    lowest = args.first_layer or first_exit_layer(labels)
    firsts = [lowest] if args.first_layer or args.target_agreement <= 0 else range(lowest, L)
    shifts = (0.0,) if args.target_agreement <= 0 or args.classifier == "gap" else SHIFTS
    dense = traces.top1[:, -1]
    best, best_key, tried = None, None, 0
    for first in firsts:
        checked = [n for n in range(first, L) if (n - first) % args.stride == 0]
        base = fit(args, traces, labels, checked)
        base.first_layer, base.stride = first, args.stride
        for shift in shifts:
            clf = shifted(base, shift)
            exits = simulate(ExitRule(clf), traces)
            agree = float((tokens_at(traces, exits) == dense).mean())
            key = (agree >= args.target_agreement, -exits.mean() if agree >= args.target_agreement else agree)
            tried += 1
            if best_key is None or key > best_key:
                best, best_key = clf, key
                best_stats = {"first_layer": first, "bias_shift": shift, "train_agreement": agree,
                              "train_avg_layers": float(exits.mean())}
    met = bool(best_key[0])
    if not met:
        print(f"warning: no first layer / bias shift kept {args.target_agreement:.0%} of the train part's answers; "
              f"using the most faithful one ({best_stats['train_agreement']:.1%})", file=sys.stderr)
    return best, {"target_agreement": args.target_agreement, "met": met, "candidates_tried": tried, **best_stats}


def shifted(clf: ExitClassifier, shift: float) -> ExitClassifier:
    """The same classifier, `shift` less eager to exit."""
    if shift == 0:
        return clf
    crf = None
    if clf.crf is not None:
        crf = {**clf.crf, "state_bias": [clf.crf["state_bias"][0], clf.crf["state_bias"][1] - shift]}
    return ExitClassifier(clf.kind, clf.features, clf.weight, clf.bias - shift, clf.first_layer, clf.stride,
                          crf=crf)


def first_exit_layer(labels: np.ndarray) -> int:
    """The first layer (1-based) at which an exit was right for any prompt (L - 1 if none ever was)."""
    ever = labels.any(0)
    return int(np.argmax(ever)) + 1 if ever.any() else labels.shape[1]


def fit(args, traces: Traces, labels: np.ndarray, checked: list[int]) -> ExitClassifier:
    names = list(args.features)
    X = np.stack([np.stack([traces.features[f][:, n - 1] for f in names], -1) for n in checked], 1)  # (N, C, F)
    y = labels[:, [n - 1 for n in checked]]  # (N, C)
    if args.classifier == "gap":
        if names[0] != "gap":
            raise AdainferError("--features", "the gap rule uses the gap feature (list it first)")
        rule = gap_rule(args.threshold)
        return ExitClassifier("gap", names, [1.0] + [0.0] * (len(names) - 1), rule.bias)
    if args.classifier == "svm":
        return fit_svm(X.reshape(-1, len(names)), y.reshape(-1), names)
    return fit_crf(X, y, names)


def fit_svm(X: np.ndarray, y: np.ndarray, names: list[str]) -> ExitClassifier:
    """LinearSVC with scikit-learn's defaults on standardised features; the scaler is folded into w and b."""
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    if y.all() or not y.any():
        # One class only: a constant decision (always or never exit) is the honest fit.
        return ExitClassifier("svm", names, [0.0] * len(names), 1.0 if y.all() else -1.0)
    scaler = StandardScaler().fit(X)
    svm = LinearSVC().fit(scaler.transform(X), y.astype(int))
    w, b = fold_scaler(svm.coef_[0], float(svm.intercept_[0]), scaler.mean_, scaler.scale_)
    return ExitClassifier("svm", names, [float(v) for v in w], float(b))


def fold_scaler(w: np.ndarray, b: float, mean: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, float]:
    """w . (x - mean) / scale + b  ==  (w / scale) . x + (b - w . mean / scale)."""
    w_raw = w / scale
    return w_raw, b - float(np.dot(w_raw, mean))


def fit_crf(X: np.ndarray, y: np.ndarray, names: list[str]) -> ExitClassifier:
    """A linear-chain CRF over the checked layers (sklearn-crfsuite, default settings) with a bias feature."""
    import sklearn_crfsuite

    seqs = [[{**{f: float(v) for f, v in zip(names, step)}, "bias": 1.0} for step in prompt] for prompt in X]
    tags = [[str(int(v)) for v in prompt] for prompt in y]
    crf = sklearn_crfsuite.CRF()
    crf.fit(seqs, tags)
    state = crf.state_features_  # {(attribute, label): weight}
    trans = crf.transition_features_  # {(from, to): weight}
    weight = [[state.get((f, lab), 0.0) for f in names] for lab in ("0", "1")]
    bias = [state.get(("bias", lab), 0.0) for lab in ("0", "1")]
    transitions = [[trans.get((a, b), 0.0) for b in ("0", "1")] for a in ("0", "1")]
    return ExitClassifier("crf", names, [0.0] * len(names), 0.0,
                          crf={"state_weight": weight, "state_bias": bias, "transitions": transitions})


def evaluate(rule: ExitRule, traces: Traces, labels: np.ndarray, golds: list, L: int) -> dict:
    """Held-out report: per-layer positive rate and exit precision/recall, then the simulated run."""
    N = len(traces.top1)
    fires = decisions(rule, traces)
    exit_layer = simulate(rule, traces, fires)
    answer = tokens_at(traces, exit_layer)
    dense = traces.top1[:, -1]
    per_layer = []
    for n, fire in fires:
        pos = labels[:, n - 1]
        tp = int((fire & pos).sum())
        per_layer.append({"layer": n, "positive_rate": float(pos.mean()), "exit_rate": float(fire.mean()),
                          "precision": tp / int(fire.sum()) if fire.any() else None,
                          "recall": tp / int(pos.sum()) if pos.any() else None})
    summary = {"prompts": N, "avg_layers": float(exit_layer.mean()), "var_layers": float(exit_layer.var()),
               "pruning_ratio": float(1 - exit_layer.mean() / L),
               "agreement_with_dense": float((answer == dense).mean())}
    if all(g is not None for g in golds):
        summary["accuracy"] = float(np.mean([a in g for a, g in zip(answer, golds)]))
        summary["dense_accuracy"] = float(np.mean([d in g for d, g in zip(dense, golds)]))
    return {"summary": summary, "per_layer": per_layer, "exit_layers": exit_layer.tolist()}


def print_report(clf: ExitClassifier, report: dict) -> None:
    s = report["summary"]
    print(f"classifier: {clf.kind} on {'+'.join(clf.features)}, checks from layer {clf.first_layer} "
          f"every {clf.stride}; w={[round(w, 4) for w in clf.weight]} b={clf.bias:.4f}")
    print(f"held-out ({s['prompts']} prompts): avg layers {s['avg_layers']:.2f} (var {s['var_layers']:.2f}), "
          f"pruning ratio {100 * s['pruning_ratio']:.1f}%, agreement with dense {100 * s['agreement_with_dense']:.1f}%"
          + (f", accuracy {100 * s['accuracy']:.1f}% (dense {100 * s['dense_accuracy']:.1f}%)" if "accuracy" in s
             else ""))
    print("layer  positive  exit-rate  precision  recall")
    for r in report["per_layer"]:
        fmt = (lambda v: "  -  " if v is None else f"{v:.3f}")
        print(f"{r['layer']:5d}  {r['positive_rate']:8.3f}  {r['exit_rate']:9.3f}  {fmt(r['precision']):>9}  "
              f"{fmt(r['recall']):>6}")


if __name__ == "__main__":
    sys.exit(main())
