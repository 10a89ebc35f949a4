"""Generation with early exit: quality and speed against dense greedy decoding, in one process.

Two prompt sets: SQuAD (context + question, the `Q: ... A:` template, 0-shot) and open continuations (the first
words of AG News articles, plain text). Every prompt gets `--new-tokens` greedy tokens (no EOS stop, so every
configuration produces the same number of tokens) under: dense; `sequence` mode (depth chosen at prefill) and
`token` mode (per-token exit, CALM K/V propagation) for each exit classifier given. Configurations take turns batch
by batch so that a slow spell of the machine hits them all alike. Reported per set and configuration: token
agreement with the dense output (position by position), rows identical to dense, mean position of the first
difference, SQuAD exact match / F1 of the first generated line, average blocks per generated token, tokens/s and
its ratio to dense.

    python benchmarks/bench_generation.py --rows 100 --new-tokens 32 --exit DEFAULT results/classifiers/squad_5shot.json
"""

from __future__ import annotations

import argparse
import collections
import re
import string
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import add_device, check_device, machine, print_table, write_json  # noqa: E402

from adainfer.exit import (  # noqa: E402
    ExitClassifier,
    ExitRule,
    Plan,  # noqa: E402
    shipped_classifier,
)
from adainfer.generate import generate  # noqa: E402
from adainfer.loading import load_model  # noqa: E402
from adainfer.tasks import load_task, task_prompts  # noqa: E402


def squad_prompts(data, rows):
    return [(p, ex.answers) for p, ex in task_prompts(load_task("squad", data), "eval", 0, 0, None, rows)]


def open_prompts(data, rows, words=12):
    task = load_task("agnews", data)
    return [(" ".join(ex.x.split()[:words]), None) for ex in task.eval[:rows]]


def normalize(s: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    s = "".join(c for c in s.lower() if c not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())


def em_f1(prediction: str, answers: list[str]) -> tuple[float, float]:
    pred = normalize(prediction).split()
    em, f1 = 0.0, 0.0
    for a in answers:
        gold = normalize(a).split()
        em = max(em, float(pred == gold))
        common = sum((collections.Counter(pred) & collections.Counter(gold)).values())
        if common:
            p, r = common / len(pred), common / len(gold)
            f1 = max(f1, 2 * p * r / (p + r))
    return em, f1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path)
    p.add_argument("--data", type=Path)
    p.add_argument("--rows", type=int, default=100, help="prompts per set (default 100)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--exit", nargs="+", default=["DEFAULT"],
                   help="classifier files to try (DEFAULT = the model's shipped classifier)")
    p.add_argument("--min-layers", type=int, help="floor for token mode")
    p.add_argument("--threads", type=int)
    p.add_argument("--out", type=Path, default=Path("results/bench_generation.json"))
    p.add_argument("--dtype", default="auto")
    add_device(p)
    args = p.parse_args()
    check_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model is None:
        from adainfer.default_model import default_model_dir

        args.model = default_model_dir(progress=False)
    model, tok = load_model(args.model, args.dtype, args.device)
    L = model.config.n_layers
    configs = {"dense": ("none", None)}
    for spec in args.exit:
        path = shipped_classifier(model.fingerprint) if spec == "DEFAULT" else Path(spec)
        label = "default" if spec == "DEFAULT" else Path(spec).stem
        for mode in ("sequence", "token"):
            clf = ExitClassifier.load(path)
            clf.check_model(model, path)
            rule = ExitRule(clf, model.device, args.min_layers if mode == "token" else None)
            configs[f"{mode}, {label}"] = (mode, rule)

    rows = []
    sets = {"squad": squad_prompts(args.data, args.rows), "open": open_prompts(args.data, args.rows)}
    for set_name, prompts in sets.items():
        ids = [tok.encode(text) for text, _ in prompts]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        batches = [order[s:s + args.batch_size] for s in range(0, len(order), args.batch_size)]
        out = {c: [None] * len(ids) for c in configs}
        seconds = dict.fromkeys(configs, 0.0)
        for n, batch in enumerate(batches):
            for name, (mode, rule) in configs.items():
                t0 = time.perf_counter()
                gens = generate(model, [ids[i] for i in batch], args.new_tokens, Plan(exit=rule), mode=mode)
                seconds[name] += time.perf_counter() - t0
                for i, g in zip(batch, gens):
                    out[name][i] = g
            print(f"{set_name}: batch {n + 1}/{len(batches)}", file=sys.stderr, flush=True)
        dense = out["dense"]
        for name in configs:
            gens = out[name]
            agree = [np.mean(np.array(g.token_ids) == np.array(d.token_ids)) for g, d in zip(gens, dense)]
            first = [next((k for k, (a, b) in enumerate(zip(g.token_ids, d.token_ids)) if a != b), args.new_tokens)
                     for g, d in zip(gens, dense)]
            n_tokens = sum(len(g.token_ids) for g in gens)
            row = {"set": set_name, "config": name, "token_agreement": float(np.mean(agree)),
                   "identical_rows": float(np.mean([a == 1.0 for a in agree])),
                   "first_difference": float(np.mean(first)),
                   "avg_layers_per_token": float(np.mean([x for g in gens for x in g.layers_run])),
                   "tokens_per_s": n_tokens / seconds[name], "seconds": seconds[name]}
            row["pruning"] = 1 - row["avg_layers_per_token"] / L
            row["speed_vs_dense"] = row["tokens_per_s"] * seconds["dense"] / n_tokens
            if set_name == "squad":
                scores = [em_f1(tok.decode(g.token_ids).strip().split("\n")[0], answers)
                          for g, (_, answers) in zip(gens, prompts)]
                row["exact_match"] = float(np.mean([s[0] for s in scores]))
                row["f1"] = float(np.mean([s[1] for s in scores]))
            rows.append(row)
    columns = ["set", "config", "token_agreement", "identical_rows", "first_difference", "exact_match", "f1",
               "avg_layers_per_token", "pruning", "tokens_per_s", "speed_vs_dense"]
    print_table(rows, columns)
    write_json(args.out, {"benchmark": "generation with early exit", "machine": machine(), "device": args.device,
                          "model": str(args.model),
                          "dtype": str(model.dtype)[6:], "rows_per_set": args.rows, "new_tokens": args.new_tokens,
                          "batch_size": args.batch_size, "exit": args.exit, "rows": rows})


if __name__ == "__main__":
    main()
