"""The evaluation harness behind python -m adainfer.eval (adainfer.evaluate): every method on the same rows of a task,
in one process, the methods taking turns batch by batch, against the dense run's clock.

    engine = adainfer.load()
    results = adainfer.evaluate(engine, "sst2", ["dense", "svm", "oracle"], shots=[5], limit=200)
    results.summary()["svm"]["pruning_ratio"]
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from adainfer.distributed import current_world
from adainfer.errors import AdainferError
from adainfer.eval.metrics import summarize
from adainfer.quant import _FLAGS, CPU_INFO, cpu_name
from adainfer.tasks import Task
from adainfer.timing import device_sync

DEFAULT_METHODS = ["dense", "skip-last-3", "shortgpt-3", "skip-attn-latter-3", "gap-rule", "svm", "oracle"]


@dataclass
class Results:
    """What evaluate returns; to_dict() is the results JSON (python -m adainfer.eval.report and the figures read it)."""

    task: str
    model: str
    runs: list[dict] = field(default_factory=list)  # per shot count: shots, rows, per_layer, methods -> {summary,
    #                                                  info, records (one per row)}
    meta: dict = field(default_factory=dict)  # model name, layers, dtype, limit, seed, template, machine, candidates
    files: list[Path] = field(default_factory=list)  # written with out=: the results JSON, then the figures

    def summary(self, shots: int | None = None) -> dict[str, dict]:
        """method -> its summary (accuracy, pruning ratio, layers, FLOPs ratio, seconds, speedup) at `shots`
        (default: the first shot count run)."""
        run = self.runs[0] if shots is None else next((r for r in self.runs if r["shots"] == shots), None)
        if run is None:
            raise AdainferError("shots", f"no run with {shots} shots (ran {[r['shots'] for r in self.runs]})")
        return {name: m["summary"] for name, m in run["methods"].items()}

    def to_dict(self) -> dict:
        return {"task": self.task, "model": self.model, **self.meta, "runs": self.runs}


def evaluate(engine, task: str | Task | None = None, methods: list[str] | None = None, *,
             shots: list[int] | tuple[int, ...] = (5,), task_file: Path | None = None, labels: list[str] | None = None,
             demos: Path | None = None, data: Path | None = None, exit: Path | None = None, limit: int | None = None,
             template: str | None = None, seed: int = 0, batch_size: int = 8, calibration_prompts: int = 32,
             out: Path | None = None, figures: bool = True, progress: bool = True, sync_every: int = 1,
             capture_checks: bool = False, prefill: str = "eager") -> Results:
    """Run `methods` (adainfer.eval.methods; default DEFAULT_METHODS) on the eval split of `task` (a built-in
    name with its data from `data`, a Task, or `task_file` with `labels` / `demos`: adainfer.tasks), at each of
    `shots` demonstrations, `limit` rows sampled with `seed`. svm / crf use `exit` (default: the classifier shipped
    for the model); shortgpt computes Block Influence on `calibration_prompts` train prompts. With `out`, the
    results JSON is written there (atomically), the per-layer traces beside it (reused by a rerun) and, with
    `figures`, the PNGs. The exit methods read their decisions every `sync_every` checks and, with
    `capture_checks`, replay each check as a CUDA graph (Plan; for GPUs). `prefill`: eager | compiled | captured,
    how the prompts' blocks run (adainfer.fast_prefill.prefill_mode); compiled or captured, every method first runs
    the first two batches off the clock (the compiles and captures)."""
    from adainfer.eval.methods import build_method, oracle_translators, parse_method
    from adainfer.exit import check_capture_checks
    from adainfer.fast_prefill import prefill_mode
    from adainfer.tasks import answer_ids, label_candidates, task_prompts, task_source

    methods = list(methods or DEFAULT_METHODS)
    for spec in methods:
        parse_method(spec)  # refuse a bad method name before any work
    if limit is not None and limit < 1 or batch_size < 1 or calibration_prompts < 1 or sync_every < 1:
        raise AdainferError("--limit/--batch-size/--calibration-prompts/--sync-every", "must be at least 1")
    check_capture_checks(capture_checks, engine.model.device)
    if not shots or any(k < 0 for k in shots):
        raise AdainferError("--shots", "must be 0 or more")
    if not isinstance(task, Task):
        task = task_source(task, data, task_file, labels, demos)
    model, tok = engine.model, engine.tokenizer
    prefill_mode(model, prefill)
    cand_texts = label_candidates(task)
    cands = None
    if cand_texts:
        cands = torch.tensor([tok.piece_id(c) for c in cand_texts])
        if len(set(cands.tolist())) != len(cands):
            cands = None  # label words that share a first token cannot be told apart by one token

    results = Results(task.name, str(engine.path), meta={
        "task_file": str(task_file) if task_file else None, "model_name": model.config.name,
        "n_layers": model.config.n_layers, "dtype": str(model.dtype)[6:], "limit": limit, "seed": seed,
        "template": template or "qa", "machine": machine(), "candidates": cand_texts if cands is not None else None,
        "sync_every": sync_every, "capture_checks": capture_checks, "prefill": prefill})
    for k in shots:
        rows = task_prompts(task, "eval", k, seed, template, limit)
        ids = [tok.encode(p) for p, _ in rows]
        golds = [answer_ids(tok, ex) for _, ex in rows]
        calib = [tok.encode(p) for p, _ in task_prompts(task, "train", k, seed + 1, template, calibration_prompts)]
        built = [build_method(spec, model, calib, exit, cands) for spec in methods]
        for m in built:
            if m.plan is not None and m.plan.exit is not None:
                m.plan = replace(m.plan, sync_every=sync_every, capture_checks=capture_checks)
        oracle_translators(built, model)
        traces = None if out is None else Path(out).with_name(f"{Path(out).stem}_{k}shot_traces.npz")
        run = evaluate_shots(model, tok, ids, golds, cands, built, batch_size, traces, progress,
                             warm=prefill != "eager")
        results.runs.append({"shots": k, **run})
    if out is not None and current_world().main:  # one writer among data-parallel ranks
        write_results(out, results.to_dict())
        results.files.append(Path(out))
        if figures:
            from adainfer.eval.figures import write_figures

            results.files += write_figures(results.to_dict(), out)
    return results


def evaluate_shots(model, tok, ids, golds, cands, methods, batch_size, traces_path=None, progress=True,
                   warm: bool = False) -> dict:
    """Every method on every batch, the methods taking turns batch by batch (each batch starting with the next
    method), so that a slow spell of a shared machine, or the first run on a new shape, hits them all alike. `warm`:
    every method runs the first two batches once before (compiled blocks compile there, not on the clock)."""
    from tqdm import tqdm

    from adainfer.generate import length_batches
    from adainfer.traces import collect_cached, oracle_layers, translated

    L = model.config.n_layers
    # With a translator among the methods, the traces keep the last token's states, to be read through it too.
    reader = next((m.translator for m in methods if m.kind == "translated-oracle"), None) or \
        next((m.plan.translator for m in methods if m.plan is not None and m.plan.translator is not None), None)
    traces = collect_cached(model, ids, traces_path, batch_size=batch_size, progress=progress, desc="traces",
                            also=cands, hidden=None if reader is None else 0)
    read = None if reader is None else translated(traces, model, reader)
    batches = length_batches(ids, batch_size)
    methods = sorted(methods, key=lambda m: m.kind != "dense")
    depths = {}
    for m in methods:
        if m.kind in ("oracle", "translated-oracle"):
            t = traces
            if m.kind == "translated-oracle":  # the per-layer reading above when it is the same translator
                t = read if m.translator is reader else translated(traces, model, m.translator)
            depths[m.name] = oracle_layers(t)
            m.info["pruning_ratio_candidates"] = (
                None if t.top1_candidates is None else float(1 - oracle_layers(t, True).mean() / L))
    records = {m.name: [None] * len(ids) for m in methods}
    seconds = dict.fromkeys(records, 0.0)
    for b in batches[:2] if warm else []:  # two lengths: the compiled blocks' length symbolic before the clock
        for m in methods:
            run_batch(model, tok, ids, golds, cands, b, m.plan, depths.get(m.name), {}, m.translator)
    world = current_world()

    def run(b: int) -> tuple[dict, dict]:
        """Every method on batch b: per method, its rows' records (row -> record) and its seconds."""
        recs, spent = {m.name: {} for m in methods}, {}
        # The first run on a new batch shape pays for allocations the others reuse: rotate who goes first.
        for m in methods[b % len(methods):] + methods[:b % len(methods)]:
            spent[m.name] = run_batch(model, tok, ids, golds, cands, batches[b], m.plan, depths.get(m.name),
                                      recs[m.name], m.translator)
        bar.update(1)
        return recs, spent

    # Data-parallel ranks each run their share of the batches (adainfer.distributed), gathered in batch order.
    with tqdm(total=len(batches), desc="methods", unit="batch", file=sys.stderr,
              disable=not progress or not world.main) as bar:
        parts = world.map_batches(run, batches, ids)
    for recs, spent in parts:
        for name in records:
            seconds[name] += spent[name]
            for i, rec in recs[name].items():
                records[name][i] = rec
    run = {"rows": len(ids), "per_layer": per_layer_stats(traces, golds), "methods": {}}
    if read is not None:  # the same curves with each layer read through the translator
        run["per_layer_translated"] = {**per_layer_stats(read, golds), "translator": reader.describe()}
    for m in methods:
        summary = summarize(records[m.name], L, model.config.dim, model.config.vocab_size, seconds[m.name],
                            seconds[methods[0].name] if methods[0].kind == "dense" else None)
        run["methods"][m.name] = {"summary": summary, "info": m.info, "records": records[m.name]}
    return run


def run_batch(model, tok, ids, golds, cands, batch, plan, depths, records, translator=None) -> float:
    """Run one batch with `plan`, or with forced exits at per-row `depths` (the oracles: rows grouped by depth, each
    layer read through `translator` when given); fill the rows' records; return the seconds spent in the model."""
    from adainfer.exit import Plan
    from adainfer.generate import left_pad, prefill_pad

    pad = model.config.pad_id if model.config.pad_id is not None else 0
    if depths is None:
        groups = [(batch, plan)]
    else:
        levels = sorted({int(depths[i]) for i in batch})
        groups = [([i for i in batch if depths[i] == k], Plan(exit_at=k, translator=translator)) for k in levels]
    total = 0.0
    for rows, plan in groups:
        tokens, mask = left_pad([ids[i] for i in rows], pad, model.device, prefill_pad(model))
        t0 = time.perf_counter()
        out = model(tokens, pad_mask=mask, plan=plan)
        device_sync(model.device)()  # a GPU runs what was queued after the call returns
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


def write_results(path: Path, results: dict) -> None:
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(path)


def machine() -> dict:
    """The machine a figure came from: CPU model (vendor, family and model numbers: two "AMD EPYC"s may differ in
    everything), its bfloat16 units and capability, cores, threads, torch, Python, GPU if any."""
    import os
    import platform

    cpu = CPU_INFO.get("model name") or platform.processor() or ""
    info = {"cpu": cpu, "cpu_id": cpu_name(), "cpu_bf16": sorted(_FLAGS & {"avx512_bf16", "amx_bf16"}),
            "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info
