"""What int4 weights (--decode int4) cost in answers: first-token accuracy on the tasks and greedy continuations,
float32 vs bfloat16 vs int4, on the same prompts in one process.

Classification answers are the first generated token (prefill: the int4 model computes with the dequantized int4
weights); continuations run --new-tokens greedy tokens with every decode step in the int4 graph. `agree` is the
fraction of answers equal to float32's; `same rows` the continuations identical to float32's, `prefix` the mean
fraction of tokens equal to float32's before the first difference.

CPU only, by subject: int4 weights run on the CPU (their kernels are C++).

    python benchmarks/bench_int4_quality.py [--tasks sst2 agnews mmlu csqa squad] [--shots 5] [--limit 60]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import load_ours, machine, print_table, write_json  # noqa: E402

from adainfer.fast_decode import decode_graph  # noqa: E402
from adainfer.generate import generate  # noqa: E402
from adainfer.tasks import answer_ids, load_task, task_prompts  # noqa: E402


def first_tokens(model, ids, batch_size=8):
    out = []
    for i in range(0, len(ids), batch_size):
        out += [g.token_ids[0] for g in generate(model, ids[i:i + batch_size], 1)]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path)
    p.add_argument("--tasks", nargs="+", default=["sst2", "agnews", "mmlu", "csqa", "squad"])
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--limit", type=int, default=60)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--gen-rows", type=int, default=20, help="SQuAD prompts continued for --new-tokens tokens")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("results/bench_int4_quality.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from adainfer.default_model import default_model_dir

    folder = args.model or default_model_dir(progress=False)
    models = {"float32": load_ours(folder, "float32")[0], "bfloat16": load_ours(folder, "bfloat16")[0]}
    int4, tok = load_ours(folder, "float32")  # int4 weights, float32 activations (what --decode int4 runs on AVX2)
    graphs = {"float32": None, "bfloat16": None, "int4": decode_graph(int4, "int4")}
    models["int4"] = int4
    rows = []
    for name in args.tasks:
        task = load_task(name)
        pairs = task_prompts(task, "eval", args.shots, limit=args.limit)
        ids = [tok.encode(prompt) for prompt, _ in pairs]
        answers = {k: first_tokens(m, ids) for k, m in models.items()}
        for k, got in answers.items():
            acc = sum(t in answer_ids(tok, ex) for t, (_, ex) in zip(got, pairs)) / len(pairs)
            agree = sum(a == b for a, b in zip(got, answers["float32"])) / len(pairs)
            rows.append({"what": f"{name} {args.shots}-shot first token", "weights": k, "rows": len(pairs),
                         "accuracy": acc, "agree": agree})
    if args.gen_rows and "squad" in args.tasks:
        pairs = task_prompts(load_task("squad"), "eval", 0, limit=args.gen_rows)
        ids = [tok.encode(prompt) for prompt, _ in pairs]
        conts = {k: [generate(m, [x], args.new_tokens, graph=graphs[k])[0].token_ids for x in ids]
                 for k, m in models.items()}
        for k, got in conts.items():
            prefix = []
            for a, b in zip(got, conts["float32"]):
                n = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                prefix.append(n / len(b))
            rows.append({"what": f"squad 0-shot, {args.new_tokens} greedy tokens", "weights": k, "rows": len(ids),
                         "same_rows": sum(a == b for a, b in zip(got, conts["float32"])) / len(ids),
                         "prefix": sum(prefix) / len(prefix)})
    print_table(rows, ["what", "weights", "rows", "accuracy", "agree", "same_rows", "prefix"])
    write_json(args.out, {"benchmark": "int4 weights: answers vs float32", "machine": machine(),
                          "model": str(folder), "shots": args.shots, "rows": rows})


if __name__ == "__main__":
    main()
