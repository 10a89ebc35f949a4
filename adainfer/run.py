"""python -m adainfer.run: answer prompts with early exit, showing exit layer and time against the dense run.

With no arguments it runs a short few-shot sentiment prompt on the default model (SmolLM2-135M-Instruct, fetched
and converted on first use) with the shipped exit classifier.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

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
                   help="how dense decode steps run: eager (the block loop, default), compiled (one torch.compile "
                        "graph per step; compiles on first use, ~1-2 min for the default model) or int4 (that graph "
                        "on 4-bit block weights, an 8-bit head and int8 activations, C++ kernels built on first use; "
                        "CPU; lossy, see README)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
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
                        "of it (a quarter of float32's bytes per check; CPU, full-vocabulary features; answers still "
                        "come from the full-precision head)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (row i of the input uses seed + i)")
    p.add_argument("--truncate", action="store_true",
                   help="cut prompts longer than the context to their last tokens (default: refuse them)")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt, in input order")
    p.add_argument("--no-compare", action="store_true", help="do not time a dense run beside the exit run")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except AdainferError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(args) -> int:
    from adainfer.exit import Plan
    from adainfer.generate import Sampling, check_prompts, generate
    from adainfer.loading import load_model

    for name in ("max_new_tokens", "batch_size", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise AdainferError(f"--{name.replace('_', '-')}", f"must be at least 1, got {value}")
    if args.device not in ("cpu", "cuda") or (args.device == "cuda" and not torch.cuda.is_available()):
        here = "cpu, cuda" if torch.cuda.is_available() else "cpu"
        raise AdainferError("--device", f"{args.device!r} is not available here ({here})")
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.prompts:
        from adainfer.prompts import read_prompts

        prompts = read_prompts(args.prompts)
    else:
        prompts = [("--prompt", args.prompt if args.prompt is not None else DEFAULT_PROMPT)]

    if args.model is None:
        from adainfer.default_model import default_model_dir

        args.model = default_model_dir(progress=not args.json)
    model, tok = load_model(args.model, args.dtype, args.device)
    if args.decode != "eager" and args.device != "cpu":
        raise AdainferError("--decode", f"{args.decode} decoding is built for the CPU (on a GPU use eager)")
    from adainfer.fast_decode import decode_graph, prepare_check_head

    graph = decode_graph(model, args.decode)
    if tok is None:
        raise AdainferError(args.model, "the model folder has no tokenizer.json or tokenizer.model")

    ids = [tok.encode(text) for _, text in prompts]
    dropped = [0] * len(ids)
    if args.truncate:
        ids, dropped = truncate(ids, model.config.max_seq_len - args.max_new_tokens + 1, tok)
    # The whole input is checked before anything runs, so a bad row never costs the others their answers.
    for (where, _), row in zip(prompts, ids):
        check_prompts([row], model, args.max_new_tokens, where)

    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    default_prompt = args.prompt is None and args.prompts is None
    rule, candidate_texts, why_dense = resolve_exit(args, model, default_prompt)
    if rule is not None and args.exit_mode == "token" and rule.clf.candidates and args.max_new_tokens > 1:
        raise AdainferError("--exit-mode", "token mode checks every generated token over the full vocabulary; this "
                                           "classifier was calibrated on candidate features (use sequence mode)")
    candidates = None
    if candidate_texts:
        candidates = torch.tensor([tok.piece_id(c) for c in candidate_texts], device=model.device)
        if len(set(candidates.tolist())) != len(candidates):
            raise AdainferError("--candidates", f"{candidate_texts} do not start with distinct tokens")
    prepare_check_head(model, args.check_head, candidates, "--check-head")
    plan = Plan(exit=rule, candidates=candidates, check_head=args.check_head)
    dense_plan = Plan(candidates=candidates)
    compare = rule is not None and not args.json and not args.no_compare

    # Sort by length so batches carry little padding; answers come back in input order.
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    eos = model.config.eos_id
    # Warm-up: first-call allocations (and the decode graph's compilation) off the clock.
    warm = ids[order[0]][-8:]
    if graph is not None and args.max_new_tokens > 1:
        if not args.json:
            print(f"compiling the {args.decode} decode graph (first use in this machine: about a minute)...",
                  file=sys.stderr, flush=True)
        # The graph compiles twice per batch size: for its first KV cache as constants, then, at a cache of another
        # size, once for every size and length. Each batch size the run will see, with two caches of different sizes.
        for size in {min(args.batch_size, len(ids) - start) for start in range(0, len(ids), args.batch_size)}:
            for n in (2, 3):
                generate(model, [warm] * size, n, dense_plan, graph=graph)
    else:
        generate(model, [warm] * min(args.batch_size, len(ids)), 1, dense_plan)
    results: list[dict | None] = [None] * len(ids)
    for start in range(0, len(order), args.batch_size):
        batch = order[start:start + args.batch_size]
        t0 = time.perf_counter()
        seeds = [args.seed + i for i in batch]
        gens = generate(model, [ids[i] for i in batch], args.max_new_tokens, plan, eos, args.exit_mode, sampling,
                        row_seeds=seeds, graph=graph)
        seconds = time.perf_counter() - t0
        dense_seconds = None
        if compare:
            t0 = time.perf_counter()
            dense = generate(model, [ids[i] for i in batch], args.max_new_tokens, dense_plan, eos, "none", sampling,
                             row_seeds=seeds, graph=graph)
            dense_seconds = time.perf_counter() - t0
        for j, i in enumerate(batch):
            g = gens[j]
            results[i] = {
                "prompt": prompts[i][1], "text": tok.decode(g.token_ids), "token_ids": g.token_ids,
                "layers_run": g.layers_run, "num_layers": model.config.n_layers,
                "seconds": round(seconds / len(batch), 6), "batch_seconds": round(seconds, 6),
                "batch_size": len(batch),
            }
            if dropped[i]:
                results[i]["truncated_tokens"] = dropped[i]
            if dense_seconds is not None:
                results[i]["dense_seconds"] = round(dense_seconds / len(batch), 6)
                results[i]["dense_text"] = tok.decode(dense[j].token_ids)

    if args.json:
        for r in results:
            print(json.dumps(r, ensure_ascii=False))
        return 0
    weights = "int4 weights, " if args.decode == "int4" else ""
    print(f"model: {args.model} ({model.config.arch}, {model.config.n_layers} layers), {str(model.dtype)[6:]}, "
          f"{weights}{args.decode} decode, {torch.get_num_threads()} threads")
    print(f"exit: {describe_exit(rule, args, why_dense)}")
    for i, r in enumerate(results):
        shown = r["prompt"] if len(r["prompt"]) <= 70 else "..." + r["prompt"][-67:]
        print(f"[{i + 1}] {shown!r}")
        layers = r["layers_run"]
        depth = f"exit at layer {layers[0]}/{r['num_layers']}" if layers[0] < r["num_layers"] else \
            f"layers {layers[0]}/{r['num_layers']}"
        line = f"    answer: {r['text']!r}   {depth}   {1000 * r['seconds']:.1f} ms"
        if "dense_seconds" in r:
            speedup = r["dense_seconds"] / r["seconds"] if r["seconds"] else float("nan")
            same = "same answer" if r["dense_text"] == r["text"] else f"dense answered {r['dense_text']!r}"
            line += f"   (dense {1000 * r['dense_seconds']:.1f} ms, {speedup:.2f}x; {same})"
        print(line)
    return 0


def truncate(ids: list[list[int]], limit: int, tok) -> tuple[list[list[int]], list[int]]:
    """Keep the last `limit` tokens of each prompt (the question sits at the end); a leading BOS stays."""
    out, dropped = [], []
    for p in ids:
        if len(p) <= limit or limit < 2:
            out.append(p)
            dropped.append(0)
            continue
        head = [p[0]] if tok.add_bos and p[0] == tok.bos_id else []
        out.append(head + p[len(p) - limit + len(head):])
        dropped.append(len(p) - limit)
    return out, dropped


def resolve_exit(args, model, default_prompt: bool):
    """(exit rule or None, candidate strings or None, why there is no rule) from --exit / --dense / --candidates
    and the classifiers shipped for the model."""
    from adainfer.exit import ExitClassifier, ExitRule, shipped_classifier

    if args.dense:
        if args.exit:
            raise AdainferError("--exit", "cannot be combined with --dense")
        return None, args.candidates, "--dense"
    if args.min_layers is not None and not 1 <= args.min_layers <= model.config.n_layers:
        raise AdainferError("--min-layers", f"must be between 1 and {model.config.n_layers}")
    path, candidates = args.exit, args.candidates
    if path is None:
        if default_prompt and candidates is None and args.max_new_tokens == 1:
            candidates = DEFAULT_CANDIDATES
        path = shipped_classifier(model.fingerprint, candidates)
        if path is None and candidates is DEFAULT_CANDIDATES:
            candidates = None
            path = shipped_classifier(model.fingerprint)
        if path is None:
            over = f"features over {candidates}" if candidates else "this model"
            return None, candidates, (f"no exit classifier is shipped for {over}; calibrate one with "
                                      "python -m adainfer.calibrate and pass --exit FILE")
    clf = ExitClassifier.load(path)
    clf.check_model(model, path)
    if clf.candidates is not None and candidates is None:
        candidates = clf.candidates  # the classifier's features are over these tokens; its answers are too
    if (clf.candidates or None) != (candidates or None):
        space = f"candidates {clf.candidates}" if clf.candidates else "the full vocabulary"
        raise AdainferError(path, f"this classifier was calibrated on features over {space}, not over "
                                  f"{candidates}; calibrate one with the same --candidates")
    return ExitRule(clf, model.device, args.min_layers), candidates, None


def describe_exit(rule, args, why_dense: str | None = None) -> str:
    if rule is None:
        return f"none, dense ({why_dense})" if why_dense else "none (dense)"
    c = rule.clf
    over = f"the candidates {c.candidates}" if c.candidates else "the full vocabulary"
    fitted = c.calibration.get("tasks") or c.calibration.get("prompts")
    fitted = f", fitted on {'+'.join(fitted) if isinstance(fitted, list) else fitted}" if fitted else ""
    head = ", int8 check head" if args.check_head != "full" else ""
    return (f"{c.kind} on {'+'.join(c.features)} over {over}{fitted}, checks from layer {rule.first} every "
            f"{c.stride}{head}")


if __name__ == "__main__":
    sys.exit(main())
