"""Accuracy / pruning trade-off of exit classifiers, from cached traces (no model run beyond the traces).

For each task: fit on the train split's traces at several target agreements (and the paper's plain fit, and the
gap rule), replay each classifier on the eval split's traces with the loop's own decision (adainfer.traces.simulate),
and report accuracy (full vocabulary and over the label words), its drop against dense, pruning ratio and average
layers, next to the oracle. Targets are chosen on the train split only; the eval split just reports.

    python benchmarks/sweep_exit.py --tasks sst2 agnews --shots 5 --train-limit 150 --eval-limit 150 \\
        --traces results/traces --out results/sweep_exit.json

With --translator affine (or lowrank:R), a translator per layer (adainfer.translator) is fitted on the train
split's states, and every SVM variant is fitted again on the translated reading ("svm+translator, ..."), next to
the translated oracle. --classifiers then writes each task's translated classifier (and its translator) too.
The tuning weighs blocks against exit checks at the check cost measured here (--check-cost to fix it).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import add_device, check_device, machine, print_table, write_json  # noqa: E402

from adainfer.calibration import FitOptions, checks_made, fit, measure_check_cost, shifted, tune  # noqa: E402
from adainfer.exit import ExitRule, gap_rule  # noqa: E402
from adainfer.loading import load_model  # noqa: E402
from adainfer.tasks import answer_ids, label_candidates, load_task, task_prompts  # noqa: E402
from adainfer.traces import (  # noqa: E402
    Traces,
    collect_cached,
    final_labels,
    fit_translator_on,
    oracle_layers,
    simulate,
    tokens_at,
    translated,
    translated_out_of_fold,
)
from adainfer.translator import parse_kind  # noqa: E402

SKIP_LAST = (1, 2, 3, 5, 8)
MATCHED = (1, 2, 3)
MATCH_SHIFTS = (-4.0, -3.0, -2.0, -1.5, -1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0, 2.0)
TARGETS = (0.999, 0.99, 0.98, 0.97, 0.95, 0.9, 0.8)


def traces_for(model, tok, task, split, shots, limit, folder, cands, hidden=None):
    rows = task_prompts(task, split, shots, 0, None, limit)
    ids = [tok.encode(p) for p, _ in rows]
    path = Path(folder) / f"{task.name}_{shots}shot_{split}{'' if hidden is None else '_states'}.npz"
    traces = collect_cached(model, ids, path, also=cands, desc=f"{task.name} {split}", hidden=hidden)
    return traces, [answer_ids(tok, e) for _, e in rows], ids


def score(traces, golds, exits, L) -> dict:
    ans = tokens_at(traces, exits)
    out = {"accuracy": float(np.mean([a in g for a, g in zip(ans, golds)])),
           "agreement": float((ans == traces.top1[:, -1]).mean()), "avg_layers": float(exits.mean()),
           "pruning": float(1 - exits.mean() / L)}
    if traces.top1_candidates is not None:
        cand = traces.top1_candidates[np.arange(len(exits)), exits - 1]
        out["accuracy_candidates"] = float(np.mean([a in g for a, g in zip(cand, golds)]))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path)
    p.add_argument("--tasks", nargs="+", default=["sst2", "agnews", "mmlu", "csqa", "squad"])
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--train-limit", type=int, default=150)
    p.add_argument("--eval-limit", type=int, default=150)
    p.add_argument("--eval-limits", nargs="*", default=[], metavar="TASK=N",
                   help="per-task eval limits, e.g. squad=100 (to reuse traces collected with another limit)")
    p.add_argument("--train-limits", nargs="*", default=[], metavar="TASK=N", help="per-task train limits")
    p.add_argument("--traces", type=Path, default=Path("results/traces"))
    p.add_argument("--out", type=Path, default=Path("results/sweep_exit.json"))
    p.add_argument("--classifiers", type=Path,
                   help="write each task's classifier at --keep-target here, as TASK_Kshot.json (for the eval CLI)")
    p.add_argument("--keep-target", type=float, default=0.99)
    p.add_argument("--translator", default="none", help="affine, lowrank:R or none (default)")
    p.add_argument("--translator-positions", type=int, default=8)
    p.add_argument("--check-cost", type=float, help="a check's time in blocks (default: measured per task)")
    p.add_argument("--inter", nargs=2, action="append", default=[], metavar=("TRAIN", "TEST"),
                   help="inter-task generalisation: fit on the comma-separated TRAIN tasks' train traces, replay "
                        "on each TEST task's eval traces, e.g. --inter mmlu,csqa sst2,agnews")
    p.add_argument("--dtype", default="auto")
    add_device(p)
    args = p.parse_args()
    check_device(args.device)
    if args.model is None:
        from adainfer.default_model import default_model_dir

        args.model = default_model_dir(progress=False)
    model, tok = load_model(args.model, args.dtype, args.device)
    L = model.config.n_layers
    kind, rank = parse_kind(args.translator)
    eval_limits = {k: int(v) for k, v in (x.split("=", 1) for x in args.eval_limits)}
    train_limits = {k: int(v) for k, v in (x.split("=", 1) for x in args.train_limits)}
    rows, inter_rows, fitted = [], [], {}
    for name in args.tasks:
        task = load_task(name)
        c = label_candidates(task)
        cands = torch.tensor([tok.piece_id(x) for x in c]) if c else None  # (traces read them on the CPU)
        train, _, train_ids = traces_for(model, tok, task, "train", args.shots,
                                         train_limits.get(name, args.train_limit), args.traces, cands,
                                         args.translator_positions if kind else None)
        evals, golds, _ = traces_for(model, tok, task, "eval", args.shots, eval_limits.get(name, args.eval_limit),
                                     args.traces, cands, 0 if kind else None)
        cost = args.check_cost
        if cost is None:
            cost = measure_check_cost(model, train_ids, None, "full", L // 2 if kind else None)
        dense = score(evals, golds, np.full(len(golds), L), L)
        oracle = score(evals, golds, oracle_layers(evals), L)
        base = {"task": name, "dense_acc": dense["accuracy"], "dense_acc_cand": dense.get("accuracy_candidates"),
                "check_cost_blocks": cost}
        rows.append({**base, "method": "oracle", **_drop(oracle, dense)})
        readings = [("", train, evals, None)]
        if kind:
            t0 = time.perf_counter()
            reader = fit_translator_on(train, kind, rank)
            reader.model = {"fingerprint": model.fingerprint, "name": model.config.name, "n_layers": L}
            base["translator_fit_seconds"] = round(time.perf_counter() - t0, 1)
            # the train prompts read out of fold (a translator reads the prompts it was fitted on too well)
            t_train, t_evals = translated_out_of_fold(train, model, reader), translated(evals, model, reader)
            res = score(t_evals, golds, oracle_layers(t_evals), L)
            rows.append({**base, "method": "translated oracle", **_drop(res, dense)})
            readings.append(("+translator", t_train, t_evals, reader))
        for n in SKIP_LAST:  # skip-last-N is exactly the traces' answer after L - N blocks
            res = score(evals, golds, np.full(len(golds), L - n), L)
            rows.append({**base, "method": f"skip-last-{n}", **_drop(res, dense)})
        for suffix, tr_train, tr_evals, reader in readings:
            labels = final_labels(tr_train)
            variants = [(f"svm{suffix}, paper fit", 0.0)] + [(f"svm{suffix}, target {t}", t) for t in TARGETS]
            for label, target in variants:
                opts = FitOptions(target_agreement=target, check_cost=cost)
                clf, tuning = tune(opts, tr_train, labels, L, quiet=True)
                exits = simulate(ExitRule(clf), tr_evals)
                res = score(tr_evals, golds, exits, L)
                checks = checks_made(exits, clf.first_layer, clf.stride, L)
                rows.append({**base, "method": label, "first_layer": clf.first_layer,
                             "train_agreement": tuning["train_agreement"], "avg_checks": float(checks.mean()),
                             **_drop(res, dense)})
                if target == args.keep_target and args.classifiers:
                    clf.model = {"fingerprint": model.fingerprint, "name": model.config.name, "n_layers": L}
                    clf.calibration = {"tasks": [name], "shots": args.shots, "n_train_prompts": len(labels),
                                       "dtype": str(model.dtype)[6:], "features_over": "vocabulary", "tuning": tuning}
                    if reader is not None:
                        clf.translator = reader.keep(range(clf.first_layer, L))
                    args.classifiers.mkdir(parents=True, exist_ok=True)
                    clf.save(args.classifiers / f"{name}_{args.shots}shot{suffix.replace('+', '_')}.json")
        labels = final_labels(train)
        res = score(evals, golds, simulate(ExitRule(gap_rule(0.8)), evals), L)
        rows.append({**base, "method": "gap > 0.8", "first_layer": 1, **_drop(res, dense)})
        candidates = svm_candidates(train, labels, L)
        for n in MATCHED:  # the SVM at the average depth of skip-last-n (chosen on the train split)
            clf = max((c for c in candidates if c[1] <= L - n), key=lambda c: c[2])[0]
            res = score(evals, golds, simulate(ExitRule(clf), evals), L)
            rows.append({**base, "method": f"svm, avg layers <= {L - n} on train", "first_layer": clf.first_layer,
                         **_drop(res, dense)})
        print_table([r for r in rows if r["task"] == name], COLUMNS)
        fitted[name] = (train, labels, evals, golds, dense)
    for train_names, test_names in args.inter:
        inter_rows += generalisation(fitted, train_names.split(","), test_names.split(","), L, args.keep_target)
    print()
    print_table(rows, COLUMNS)
    if inter_rows:
        print()
        print_table(inter_rows, ["fitted_on", "task", "first_layer", "agreement", "accuracy", "acc_drop_pts",
                                 "pruning", "avg_layers"])
    summary = summarize(rows, args.keep_target, kind is not None)
    print()
    print_table(summary, list(summary[0]))
    write_json(args.out, {"benchmark": "exit classifier trade-off from traces", "machine": machine(),
                          "device": args.device,
                          "shots": args.shots, "model": str(args.model), "translator": args.translator,
                          "keep_target": args.keep_target, "rows": rows, "summary": summary,
                          "generalisation": inter_rows})


def summarize(rows: list[dict], keep: float, translated: bool) -> list[dict]:
    """Per task and reading (plain, translated): the classifier at the kept target (agreement with dense and
    pruning on the eval split), the most pruning among the targets whose eval accuracy dropped <= 1 and <= 3 points
    (picked on the eval split: an optimistic reading), and the oracles; then the mean over tasks."""
    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        mine = [r for r in rows if r["task"] == task]
        by = {r["method"]: r for r in mine}
        for suffix in ("", "+translator") if translated else ("",):
            svms = [r for r in mine if r["method"].startswith(f"svm{suffix}, target")]
            kept = by.get(f"svm{suffix}, target {keep}")
            row = {"task": task, "reading": "translated" if suffix else "plain",
                   "agreement": kept and kept["agreement"], "pruning": kept and kept["pruning"]}
            for pts in (1, 3):
                ok = [r["pruning"] for r in svms if r["acc_drop_pts"] <= pts + 1e-9]
                row[f"pruning_drop<={pts}pt"] = max(ok, default=0.0)
            row["oracle"] = by[("translated oracle" if suffix else "oracle")]["pruning"]
            row["check_cost_blocks"] = mine[0].get("check_cost_blocks")
            out.append(row)
    for reading in dict.fromkeys(r["reading"] for r in out):
        part = [r for r in out if r["reading"] == reading]
        out.append({"task": "mean", "reading": reading, **{k: float(np.mean([r[k] for r in part])) for k in part[0]
                                                           if k not in ("task", "reading")}})
    return out


def svm_candidates(train: Traces, labels: np.ndarray, L: int) -> list:
    """(classifier, average depth, agreement with dense) on the train split, over first check layers and bias
    shifts (eager ones included): the pool from which the SVM matching skip-last-n's depth is picked, keeping the
    most train answers at an average depth of at most L - n."""
    opts = FitOptions()
    dense = train.top1[:, -1]
    out = []
    for first in range(1, L):
        base = fit(opts, train, labels, list(range(first, L)))
        base.first_layer, base.stride = first, 1
        for shift in MATCH_SHIFTS:
            clf = shifted(base, shift)
            exits = simulate(ExitRule(clf), train)
            out.append((clf, float(exits.mean()), float((tokens_at(train, exits) == dense).mean())))
    return out


def generalisation(fitted: dict, train_names: list[str], test_names: list[str], L: int, target: float) -> list:
    """Table 5 of the paper: a classifier fitted (at `target`) on some tasks' train traces, on other tasks."""
    missing = [n for n in train_names + test_names if n not in fitted]
    if missing:
        raise SystemExit(f"--inter: {', '.join(missing)} not among --tasks")
    train = concat([fitted[n][0] for n in train_names])
    labels = np.concatenate([fitted[n][1] for n in train_names])
    opts = FitOptions(target_agreement=target)
    clf, _ = tune(opts, train, labels, L)
    out = []
    for name in test_names:
        _, _, evals, golds, dense = fitted[name]
        res = score(evals, golds, simulate(ExitRule(clf), evals), L)
        res.pop("accuracy_candidates", None)
        out.append({"fitted_on": "+".join(train_names), "task": name, "first_layer": clf.first_layer,
                    **_drop(res, dense)})
    return out


def concat(traces: list) -> Traces:
    """Several tasks' traces as one set (features and vocabulary top-1 only; candidate sets differ per task)."""
    feats = {k: np.concatenate([t.features[k] for t in traces]) for k in traces[0].features}
    return Traces(feats, np.concatenate([t.top1 for t in traces]), traces[0].n_layers,
                  np.concatenate([t.prompt_tokens for t in traces]), sum(t.seconds for t in traces))


COLUMNS = ["task", "method", "first_layer", "train_agreement", "agreement", "accuracy", "acc_drop_pts",
           "accuracy_candidates", "acc_cand_drop_pts", "pruning", "avg_layers", "avg_checks"]


def _drop(res: dict, dense: dict) -> dict:
    out = dict(res)
    out["acc_drop_pts"] = 100 * (dense["accuracy"] - res["accuracy"])
    if "accuracy_candidates" in res:
        out["acc_cand_drop_pts"] = 100 * (dense["accuracy_candidates"] - res["accuracy_candidates"])
    return out


if __name__ == "__main__":
    main()
