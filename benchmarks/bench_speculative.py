"""Self-speculative greedy decoding against dense greedy decoding, in one process, with the cost breakdown.

Prompts: SQuAD (0-shot `Q: ... A:`) and open continuations (the first words of AG News articles), as in
bench_generation.py. For each draft (blocks and draft length) and batch size, every prompt gets `--new-tokens` greedy
tokens dense and speculative, the two taking turns batch by batch. Reported: rows identical to dense (must be all),
drafts accepted per verify round, tokens per verify, tokens/s and the ratio to dense. Then the cost of each piece
on a typical cache (the median of `--repeats` timings): a dense decode step, a draft step, a verify pass of g + 1
tokens; from them the speed-up the measured acceptance predicts, (tokens per verify x dense step) / (g x draft step
+ verify): what a draft must reach to pay on this machine.

With `--decode compiled` / `int4` both sides run their decode steps through the graphs of adainfer.fast_decode
(dense: the decode step; speculative: the draft step and the verify step, each its own graph), compiled before the
clock starts; `--draft-head int8` reads the draft's head rows through the int8 kernel.

    python benchmarks/bench_speculative.py [--rows 20] [--new-tokens 64] [--drafts 0,1,8-29:2 0-23:3] [--batch 1 8]
        [--decode eager|compiled|int4] [--draft-head full|int8]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_generation import open_prompts, squad_prompts  # noqa: E402
from common import add_device, check_device, machine, print_table, write_json  # noqa: E402

from adainfer.fast_decode import decode_graph  # noqa: E402
from adainfer.generate import generate  # noqa: E402
from adainfer.loading import load_model  # noqa: E402
from adainfer.speculative import (  # noqa: E402
    Draft,
    frequent_tokens,
    parse_layers,
    predicted_speed,
    speculative_generate,
    step_costs,
)
from adainfer.tasks import load_task  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path)
    p.add_argument("--data", type=Path)
    p.add_argument("--rows", type=int, default=20, help="prompts per set (default 20)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--drafts", nargs="+", default=["0,1,8-29:2", "0-23:3"], help="BLOCKS:LENGTH, e.g. 0-19:3")
    p.add_argument("--draft-vocab", nargs="+", type=int, default=[0], metavar="K",
                   help="draft heads: the K most frequent tokens of train-split text (AG News train, SQuAD's "
                        "demonstration pool; 0: the whole head), each with every draft")
    p.add_argument("--batch", nargs="+", type=int, default=[1])
    p.add_argument("--dtype", default="float32")
    p.add_argument("--decode", default="eager", choices=["eager", "compiled", "int4"])
    p.add_argument("--draft-head", default="full", choices=["full", "int8"])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int)
    p.add_argument("--out", type=Path, default=Path("results/bench_speculative.json"))
    add_device(p, cpu_only="--decode int4 and --draft-head int8 (refused)")
    args = p.parse_args()
    check_device(args.device)
    if args.device == "cuda" and (args.decode == "int4" or args.draft_head == "int8"):
        print("error: --decode int4 and --draft-head int8 run on the CPU, not with --device cuda", file=sys.stderr)
        sys.exit(2)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model is None:
        from adainfer.default_model import default_model_dir

        args.model = default_model_dir(progress=False)
    model, tok = load_model(args.model, args.dtype, args.device)
    graph = decode_graph(model, args.decode)
    L = model.config.n_layers
    corpus = [ex.x for ex in load_task("agnews", args.data).train[:3000]] + \
        [f"{ex.x} {' '.join(ex.answers)}" for ex in load_task("squad", args.data).train]
    drafts = {}
    for spec in args.drafts:
        blocks, _, length = spec.rpartition(":")
        for k in args.draft_vocab:
            vocab = frequent_tokens(tok, corpus, k) if k else None
            drafts[spec + (f" top{k}" if k else "")] = Draft(parse_layers(blocks, L), int(length), vocab=vocab,
                                                                       head=args.draft_head)
    sets = {"squad": squad_prompts(args.data, args.rows), "open": open_prompts(args.data, args.rows)}
    rows = []
    for set_name, prompts in sets.items():
        ids = [tok.encode(text) for text, _ in prompts]
        for B in args.batch:
            order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
            batches = [[ids[i] for i in order[s:s + B]] for s in range(0, len(order), B)]
            generate(model, batches[0], 3, graph=graph)  # first-call allocations and compiles off the clock
            for draft in drafts.values():
                speculative_generate(model, batches[0], 8, draft, graph=graph)
            seconds = {"dense": 0.0, **dict.fromkeys(drafts, 0.0)}
            dense_out, spec_out = [], {d: [] for d in drafts}
            for batch in batches:
                t0 = time.perf_counter()
                dense_out += [x.token_ids for x in generate(model, batch, args.new_tokens, graph=graph)]
                seconds["dense"] += time.perf_counter() - t0
                for name, draft in drafts.items():
                    t0 = time.perf_counter()
                    spec_out[name] += speculative_generate(model, batch, args.new_tokens, draft, graph=graph)
                    seconds[name] += time.perf_counter() - t0
            for name, draft in drafts.items():
                out = spec_out[name]
                rounds = [n for r in out for n in r.accepted]
                costs = step_costs(model, ids[order[len(order) // 2]], draft, args.repeats, graph)
                per_verify = sum(len(r.token_ids) for r in out) / max(1, sum(len(r.accepted) for r in out))
                predicted = predicted_speed(per_verify, draft.length, costs)
                rows.append({"set": set_name, "batch": B, "draft": name, "draft_blocks": len(draft.layers),
                             "draft_head_rows": model.config.vocab_size if draft.vocab is None else len(draft.vocab),
                             "identical_rows": sum(r.token_ids == d for r, d in zip(out, dense_out)) / len(out),
                             "accepted_per_round": sum(rounds) / max(1, len(rounds)),
                             "tokens_per_verify": per_verify,
                             "dense_tok_s": len(ids) * args.new_tokens / seconds["dense"],
                             "spec_tok_s": len(ids) * args.new_tokens / seconds[name],
                             "speed_vs_dense": seconds["dense"] / seconds[name], **costs,
                             "predicted_speed_vs_dense": predicted})
                print_table(rows[-1:], list(rows[-1]))
    print()
    print_table(rows, ["set", "batch", "draft", "identical_rows", "accepted_per_round", "tokens_per_verify",
                       "speed_vs_dense", "dense_step_ms", "draft_step_ms", "verify_ms", "predicted_speed_vs_dense"])
    write_json(args.out, {"benchmark": "self-speculative greedy decoding", "machine": machine(), "device": args.device,
                          "model": str(args.model), "dtype": args.dtype,
                          "decode": args.decode, "draft_head": args.draft_head, "rows_per_set": args.rows,
                          "new_tokens": args.new_tokens, "command": " ".join(sys.argv), "rows": rows})


if __name__ == "__main__":
    main()
