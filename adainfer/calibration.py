"""Fit an exit classifier for a model on a task's prompts: the Python side of python -m adainfer.calibrate.

Every prompt runs all layers once; after each block the last token's features (gap, top_prob, optional cosine
similarities) are paired with a label: 1 if that layer's top-1 equals the last layer's (label "final", the paper's
default) or the answer's first token ("gold"). A linear SVM (scikit-learn LinearSVC, default settings, with a
StandardScaler folded into the exported weights), the paper's gap rule, or a CRF over the layers is fitted on a train
part and reported on a held-out part. Checking starts at the first layer where an exit was ever right in the train
part. This is the only module that imports scikit-learn.

    engine = adainfer.load()
    clf = adainfer.calibrate(engine, tasks=["sst2"], candidates="auto", limit=200)
    clf.save("sst2_exit.json")
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from adainfer.distributed import current_world
from adainfer.errors import AdainferError
from adainfer.exit import FEATURES, ExitClassifier, ExitRule, gap_rule
from adainfer.timing import device_sync
from adainfer.traces import (
    Traces,
    collect_cached,
    decisions,
    final_labels,
    fit_translator_on,
    gold_labels,
    simulate,
    tokens_at,
    translated,
    translated_out_of_fold,
)
from adainfer.translator import parse_kind


@dataclass
class CalibrationSet:
    """Prompts to calibrate on, before any model loads: their texts, accepted answers (None: no answer), what they
    are (stored in the classifier file) and the candidate strings the features are over (None: the vocabulary)."""

    prompts: list[str]
    answers: list[list[str] | None]
    description: dict
    candidates: list[str] | None


def calibration_set(*, tasks: list[str] | None = None, task_file: Path | None = None, prompts_file: Path | None = None,
                    labels: list[str] | None = None, demos: Path | None = None, data: Path | None = None,
                    shots: int = 5, template: str | None = None, limit: int = 400, seed: int = 0,
                    candidates: list[str] | str | None = None) -> CalibrationSet:
    """The train part of built-in `tasks` (data from `data`, the layout of shared/data), of a `task_file` (every
    third row, or `demos`), or ready prompts from `prompts_file` ({"prompt", "answer"?} rows). `limit` prompts per
    task, sampled with `seed`, each with `shots` demonstrations. candidates "auto": the task's label words or
    option letters."""
    from adainfer.prompts import read_jsonl
    from adainfer.tasks import label_candidates, task_prompts, task_source

    if sum(x is not None and x != [] for x in (tasks, task_file, prompts_file)) != 1:
        raise AdainferError("--task", "give one of --task NAME ..., --task-file FILE or --prompts FILE")
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise AdainferError("--limit", "must be at least 1")
    if shots < 0:
        raise AdainferError("--shots", "must be 0 or more")
    auto = candidates in ("auto", ["auto"])
    if prompts_file is not None:
        prompts, answers = [], []
        for n, row in read_jsonl(prompts_file):
            if not isinstance(row.get("prompt"), str):
                raise AdainferError(f"{prompts_file}:{n}", 'expected {"prompt": str, "answer": str (optional)}')
            prompts.append(row["prompt"])
            answer = row.get("answer")
            answers.append([answer] if isinstance(answer, str) and answer.strip() else None)
        if auto:
            raise AdainferError("--candidates", "auto needs --task or --task-file (it takes the task's label words)")
        return CalibrationSet(prompts, answers, {"prompts": str(prompts_file)}, candidates)
    loaded = [task_source(None, None, task_file, labels, demos)] if task_file is not None else \
        [task_source(name, data, labels=labels, demos=demos) for name in tasks]
    prompts, answers = [], []
    for task in loaded:
        for prompt, ex in task_prompts(task, "train", shots, seed, template, limit):
            prompts.append(prompt)
            answers.append(ex.answers)
    if auto:
        if len(loaded) != 1 or label_candidates(loaded[0]) is None:
            raise AdainferError("--candidates", "auto needs exactly one task with label words or options (not a "
                                                "free-answer task)")
        candidates = label_candidates(loaded[0])
    names = [str(task_file)] if task_file is not None else list(tasks)
    desc = {"tasks": names, "shots": shots, "template": template or "qa", "split": "train", "limit_per_task": limit,
            "seed": seed}
    return CalibrationSet(prompts, answers, desc, candidates)


def calibrate(engine, data: CalibrationSet | None = None, *, label: str = "final", classifier: str = "svm",
              features: tuple[str, ...] | list[str] = ("gap", "top_prob"), threshold: float = 0.8,
              first_layer: int | None = None, target_agreement: float = 0.99, stride: int = 1,
              holdout: float = 0.25, seed: int = 0, batch_size: int = 8, check_dtypes: tuple[str, ...] = (),
              traces: Path | None = None, default: bool = False, progress: bool = True,
              translator: str | None = None, translator_positions: int = 8, check_cost: float | None = None,
              check_head: str = "full", prefill: str = "eager", **prompts) -> ExitClassifier:
    """Fit an exit classifier for `engine`'s model on `data` (a CalibrationSet) or on the prompts that
    calibration_set(**prompts) makes (tasks=[...], task_file=..., candidates=..., limit=..., shots=...). The fit:
    `classifier` (svm | gap | crf) over `features`, label "final" or "gold", the first check layer and a bias shift
    tuned so that at least `target_agreement` of the train part keeps its dense answer (0: the paper's plain fit),
    a `holdout` fraction held out (shuffled with `seed`) and reported in clf.calibration; `check_dtypes`: the
    held-out prompts run again in those dtypes (e.g. bfloat16 for a float32 fit). `traces`: an .npz cache of the
    per-layer traces, reused when model, prompts and settings match. `translator` ("affine", "lowrank:R"; None:
    the plain reading): a translator per layer (adainfer.translator) fitted on the train part's states (the last
    token and up to `translator_positions` other positions per prompt), then the features, labels, first layer and
    classifier from the translated reading; the plain classifier's held-out figures are reported beside it.
    `check_cost`: one exit check's time in blocks, which the tuning weighs against the blocks an exit saves (None:
    measured here on the median prompt at batch 1 with `check_head`; 0: checks are free). `prefill`: eager |
    compiled | captured, how the prompts' blocks run (adainfer.fast_prefill.prefill_mode; the block time a check is
    weighed against included). Returns the classifier (save it with .save; its translator is written beside it)."""
    from adainfer.fast_prefill import prefill_mode
    from adainfer.generate import check_prompts
    from adainfer.loading import load_model

    opts = FitOptions(classifier, tuple(features), threshold, first_layer, target_agreement, stride,
                      0.0 if check_cost is None else check_cost)
    check_fit(opts, label, holdout, batch_size, check_dtypes)
    kind, rank = parse_kind(translator)
    if isinstance(translator_positions, bool) or not isinstance(translator_positions, int) or translator_positions < 0:
        raise AdainferError("--translator-positions", "must be 0 or more")
    if data is None:
        data = calibration_set(seed=seed, **prompts)
    elif prompts:
        raise AdainferError("calibrate", f"give the prompts as data= or as {sorted(prompts)}, not both")
    if label == "gold" and any(a is None for a in data.answers):
        raise AdainferError("--label", "gold labels need an answer for every prompt")
    model, tok = engine.model, engine.tokenizer
    prefill_mode(model, prefill)
    golds = [None if a is None else {tok.piece_id(" " + x.lstrip(" ")) for x in a} for a in data.answers]
    ids = [tok.encode(p) for p in data.prompts]
    check_prompts(ids, model, 1, "prompt")
    cand_ids = None
    if data.candidates:
        cand_ids = torch.tensor(tok.candidate_ids(data.candidates), device=model.device)
    L = model.config.n_layers
    if first_layer is not None and not 1 <= first_layer < L:
        raise AdainferError("--first-layer", f"must be between 1 and {L - 1}, got {first_layer}")

    if check_cost is None:
        # A timing: rank 0's, so that every data-parallel rank tunes alike (adainfer.distributed).
        opts.check_cost = current_world().broadcast(
            measure_check_cost(model, ids, cand_ids, check_head, L // 2 if kind else None))
    elif not check_cost >= 0:
        raise AdainferError("--check-cost", f"must be 0 or more, got {check_cost}")
    hidden = translator_positions if kind else None
    found = collect_cached(model, ids, traces, opts.features, cand_ids, batch_size, progress, desc="calibrating",
                           hidden=hidden, seed=seed)
    order = list(range(len(ids)))
    random.Random(seed).shuffle(order)
    n_held = max(1, int(round(len(order) * holdout)))
    held, train = np.array(sorted(order[:n_held])), np.array(sorted(order[n_held:]))
    if len(train) == 0:
        raise AdainferError("--holdout", "leaves no prompts to fit on")
    model_info = {"fingerprint": model.fingerprint, "name": model.config.name or str(engine.path), "n_layers": L}
    train_golds, held_golds = [golds[i] for i in train], [golds[i] for i in held]

    def labelled(t: Traces, g: list) -> np.ndarray:
        return final_labels(t) if label == "final" else gold_labels(t, g)

    fit_on, check_on = found.select(train), found.select(held)
    plain = None
    if kind:  # the plain reading's classifier first, for comparison; then the translated readings replace it
        plain_clf, _ = tune(opts, fit_on, labelled(fit_on, train_golds), L, quiet=True)
        plain = heldout_report(ExitRule(plain_clf), check_on, labelled(check_on, held_golds), held_golds, L)
        plain = {**plain["summary"], "first_layer": plain_clf.first_layer}
        fitted = fit_translator_on(fit_on, kind, rank, progress=progress, seed=seed)
        fitted.model = model_info
        fit_on = translated_out_of_fold(fit_on, model, fitted, cand_ids, seed=seed)
        check_on = translated(check_on, model, fitted, cand_ids)
    clf, tuning = tune(opts, fit_on, labelled(fit_on, train_golds), L)
    clf.candidates = data.candidates
    clf.model = model_info
    if kind:
        clf.translator = fitted.keep(range(clf.first_layer, L, clf.stride))
    report = heldout_report(ExitRule(clf), check_on, labelled(check_on, held_golds), held_golds, L)
    clf.calibration = {**data.description, "label": label,
                       "features_over": "candidates" if data.candidates else "vocabulary",
                       "dtype": str(model.dtype)[6:], "n_train_prompts": int(len(train)),
                       "n_heldout_prompts": int(len(held)), "tuning": tuning, "heldout": report["summary"],
                       "heldout_per_layer": report["per_layer"], "default": bool(default)}
    if kind:
        clf.calibration["translator"] = {
            "kind": translator, "positions_per_prompt": translator_positions,
            "samples": fitted.fit["samples"], "parameters": clf.translator.parameters,
            "bytes_float32": 4 * clf.translator.parameters,
            "penalty": {n: round(f["penalty"], 4) for n, f in fitted.fit["layers"].items()}}
        clf.calibration["heldout_without_translator"] = plain
    for name in check_dtypes:  # the same held-out prompts, features and dense answers in another dtype
        other = load_model(engine.path, name, engine.model.device, current_world())[0]
        t = collect_cached(other, [ids[i] for i in held], None, opts.features, cand_ids, batch_size, progress,
                           desc=f"held-out in {name}", hidden=0 if kind else None)
        if kind:
            t = translated(t, other, clf.translator, cand_ids)
        summary = heldout_report(ExitRule(clf), t, labelled(t, held_golds), held_golds, L)["summary"]
        clf.calibration[f"heldout_{str(other.dtype)[6:]}"] = summary
    return clf.validate("calibrated classifier")


@torch.inference_mode()
def measure_check_cost(model, ids: list[list[int]], candidates: torch.Tensor | None = None, check_head: str = "full",
                       translated_layer: int | None = None, repeats: int = 7) -> float:
    """One exit check's time over one block's, on the median-length prompt at batch 1 (median of `repeats`): what a
    check costs in blocks it has to save. `translated_layer`: the check reads through an affine map first (zeros:
    the same arithmetic as a fitted one)."""
    import time

    from adainfer.exit import probe
    from adainfer.fast_decode import prepare_check_head
    from adainfer.translator import identity

    prompt = sorted(ids, key=len)[len(ids) // 2]
    tokens = torch.tensor([prompt], device=model.device)
    weight = model.head_rows(candidates)
    check_head = check_head if candidates is None else "full"
    prepare_check_head(model, check_head, candidates, "--check-head")
    reader = None if translated_layer is None else identity(model.config.dim, [translated_layer]).to(model.device)
    h = torch.randn(1, model.config.dim, device=model.device).to(model.dtype)

    def check():
        read = h if reader is None else reader.read(translated_layer, h)
        probe(model, read, weight, check_head)

    def timed(fn) -> float:
        fn()
        sync = device_sync(model.device)  # queued GPU work counts
        out = []
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            out.append(time.perf_counter() - t0)
        return float(np.median(out))

    block = timed(lambda: model(tokens)) / model.config.n_layers
    return round(timed(check) / block, 4)


def check_fit(opts: FitOptions, label: str = "final", holdout: float = 0.25, batch_size: int = 8,
              check_dtypes: tuple[str, ...] = ()) -> None:
    """Refuse bad fitting options before any work."""
    from adainfer.loading import check_dtype

    if opts.classifier not in ("svm", "gap", "crf"):
        raise AdainferError("--classifier", f"unknown classifier {opts.classifier!r} (svm, gap, crf)")
    if label not in ("final", "gold"):
        raise AdainferError("--label", f"unknown label {label!r} (final, gold)")
    if not opts.features or any(f not in FEATURES for f in opts.features):
        raise AdainferError("--features", f"features come from {FEATURES}, got {list(opts.features)}")
    for name, value in (("batch_size", batch_size), ("stride", opts.stride)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise AdainferError(f"--{name.replace('_', '-')}", "must be at least 1")
    if not 0 < holdout < 1:
        raise AdainferError("--holdout", "must be between 0 and 1")
    if opts.classifier == "crf":
        try:
            import sklearn_crfsuite  # noqa: F401
        except ImportError:
            raise AdainferError("--classifier", "crf needs sklearn-crfsuite (pip install 'adainfer[crf]')") from None
    for name in check_dtypes:
        try:
            check_dtype(name)
        except AdainferError as e:
            raise AdainferError("--check-dtype", e.problem) from None


SHIFTS = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0)  # bias shifts tried, in units of the decision function


@dataclass
class FitOptions:
    """How a classifier is fitted and tuned (adainfer.calibrate's keyword arguments of the same names)."""

    classifier: str = "svm"  # svm | gap | crf
    features: tuple[str, ...] = ("gap", "top_prob")
    threshold: float = 0.8  # the gap rule's
    first_layer: int | None = None  # None: tuned
    target_agreement: float = 0.99  # 0: the paper's plain fit
    stride: int = 1
    check_cost: float = 0.0  # one exit check's time in blocks: the tuning minimises blocks + check_cost x checks


def tune(opts: FitOptions, traces: Traces, labels: np.ndarray, L: int, quiet: bool = False
         ) -> tuple[ExitClassifier, dict]:
    """Fit with checks from each candidate first layer and each bias shift; keep the classifier with the least cost
    on the train part (blocks run + opts.check_cost x checks made, per prompt) while its answers agree with the
    dense ones at least `target` of the time."""
    lowest = opts.first_layer or first_exit_layer(labels)
    firsts = [lowest] if opts.first_layer or opts.target_agreement <= 0 else range(lowest, L)
    shifts = (0.0,) if opts.target_agreement <= 0 or opts.classifier == "gap" else SHIFTS
    dense = traces.top1[:, -1]
    best, best_key, tried = None, None, 0
    for first in firsts:
        checked = [n for n in range(first, L) if (n - first) % opts.stride == 0]
        base = fit(opts, traces, labels, checked)
        base.first_layer, base.stride = first, opts.stride
        for shift in shifts:
            clf = shifted(base, shift)
            exits = simulate(ExitRule(clf), traces)
            agree = float((tokens_at(traces, exits) == dense).mean())
            checks = checks_made(exits, first, opts.stride, L)
            cost = float(exits.mean() + opts.check_cost * checks.mean())
            key = (agree >= opts.target_agreement, -cost if agree >= opts.target_agreement else agree)
            tried += 1
            if best_key is None or key > best_key:
                best, best_key = clf, key
                best_stats = {"first_layer": first, "bias_shift": shift, "train_agreement": agree,
                              "train_avg_layers": float(exits.mean()), "train_avg_checks": float(checks.mean()),
                              "check_cost_blocks": opts.check_cost, "train_cost_blocks": cost}
    met = bool(best_key[0])
    if not met and not quiet:
        print(f"warning: no first layer / bias shift kept {opts.target_agreement:.0%} of the train part's answers; "
              f"using the most faithful one ({best_stats['train_agreement']:.1%})", file=sys.stderr)
    return best, {"target_agreement": opts.target_agreement, "met": met, "candidates_tried": tried, **best_stats}


def checks_made(exits: np.ndarray, first: int, stride: int, L: int) -> np.ndarray:
    """Exit checks each prompt made before stopping after `exits` blocks, checking from `first` every `stride`."""
    return np.clip((np.minimum(exits, L - 1) - first) // stride + 1, 0, None)


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


def fit(opts: FitOptions, traces: Traces, labels: np.ndarray, checked: list[int]) -> ExitClassifier:
    names = list(opts.features)
    X = np.stack([np.stack([traces.features[f][:, n - 1] for f in names], -1) for n in checked], 1)  # (N, C, F)
    y = labels[:, [n - 1 for n in checked]]  # (N, C)
    if opts.classifier == "gap":
        if names[0] != "gap":
            raise AdainferError("--features", "the gap rule uses the gap feature (list it first)")
        rule = gap_rule(opts.threshold)
        return ExitClassifier("gap", names, [1.0] + [0.0] * (len(names) - 1), rule.bias)
    if opts.classifier == "svm":
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


def heldout_report(rule: ExitRule, traces: Traces, labels: np.ndarray, golds: list, L: int) -> dict:
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


def print_report(clf: ExitClassifier) -> None:
    cal = clf.calibration
    s = cal["heldout"]
    print(f"classifier: {clf.kind} on {'+'.join(clf.features)}, checks from layer {clf.first_layer} "
          f"every {clf.stride}; w={[round(w, 4) for w in clf.weight]} b={clf.bias:.4f}")
    t = cal.get("tuning", {})
    if t.get("check_cost_blocks"):
        print(f"one check costs {t['check_cost_blocks']:.2f} blocks (tuned for the least blocks + checks)")
    print(f"held-out ({s['prompts']} prompts): avg layers {s['avg_layers']:.2f} (var {s['var_layers']:.2f}), "
          f"pruning ratio {100 * s['pruning_ratio']:.1f}%, agreement with dense {100 * s['agreement_with_dense']:.1f}%"
          + (f", accuracy {100 * s['accuracy']:.1f}% (dense {100 * s['dense_accuracy']:.1f}%)" if "accuracy" in s
             else ""))
    if clf.translator is not None:
        t, p = cal.get("translator", {}), cal.get("heldout_without_translator")
        print(f"translator: {clf.translator.describe()} ({4 * clf.translator.parameters / 1e6:.1f} MB in float32), "
              f"fitted on {t.get('samples', '?')} states")
        if p:
            print(f"without it (plain reading, checks from {p['first_layer']}): avg layers {p['avg_layers']:.2f}, "
                  f"pruning ratio {100 * p['pruning_ratio']:.1f}%, agreement with dense "
                  f"{100 * p['agreement_with_dense']:.1f}%")
    print("layer  positive  exit-rate  precision  recall")
    for r in cal["heldout_per_layer"]:
        fmt = (lambda v: "  -  " if v is None else f"{v:.3f}")
        print(f"{r['layer']:5d}  {r['positive_rate']:8.3f}  {r['exit_rate']:9.3f}  {fmt(r['precision']):>9}  "
              f"{fmt(r['recall']):>6}")
    for key in [k for k in cal if k.startswith("heldout_") and k not in ("heldout_per_layer",
                                                                          "heldout_without_translator")]:
        o = cal[key]
        print(f"held-out in {key[len('heldout_'):]}: avg layers {o['avg_layers']:.2f}, pruning ratio "
              f"{100 * o['pruning_ratio']:.1f}%, agreement with its own dense answers "
              f"{100 * o['agreement_with_dense']:.1f}%")
