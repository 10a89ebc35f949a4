"""python -m adainfer.eval: accuracy, layers and wall-clock of early-exit methods against dense on a task.

A thin command line over adainfer.eval.harness (the Python API: adainfer.evaluate).

Every method runs on the same rows in this one process, after a dense run that sets the clock; rows go in batches
sorted by length. The results JSON holds every row (prediction, gold, layers run, seconds) and the summary per
method; figures are written next to it.

    python -m adainfer.eval --task sst2 --shots 0 5 --method dense shortgpt-4 skip-last-4 gap-rule svm oracle \\
        --limit 200 --out results/sst2.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from adainfer.cli import add_check_options, add_prefill_option, check_check_options, cli_main
from adainfer.eval.harness import DEFAULT_METHODS


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
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int)
    add_check_options(p)
    add_prefill_option(p)
    p.add_argument("--tp", type=int, default=1, metavar="N",
                   help="under torchrun: ranks per model replica, tensor parallel (default 1: data parallel only, "
                        "each rank runs its share of the batches)")
    p.add_argument("--calibration-prompts", type=int, default=32,
                   help="train-split prompts for ShortGPT's Block Influence (default 32)")
    p.add_argument("--out", type=Path, required=True,
                   help="results JSON; figures and the per-layer traces (.npz, reused by a rerun) go beside it")
    p.add_argument("--no-figures", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    return cli_main(build_parser(), run, argv)


def run(args: argparse.Namespace) -> int:
    from adainfer import distributed
    from adainfer.engine import load
    from adainfer.eval.harness import evaluate
    from adainfer.eval.methods import check_classifiers, parse_method
    from adainfer.eval.report import table
    from adainfer.tasks import task_source

    check_check_options(args)
    world = distributed.init(args.device, args.tp)
    for spec in args.method:
        parse_method(spec)  # bad input is refused before the model loads
    task = task_source(args.task, args.data, args.task_file, args.labels, args.demos)
    model = args.model
    with world.main_first():  # the default model is fetched and converted once, by rank 0
        if model is None:
            from adainfer.default_model import default_model_dir

            model = default_model_dir(progress=world.main)
        check_classifiers(args.method, model, args.exit)  # before the model loads and ShortGPT calibrates
        engine = load(model, args.dtype, args.device, threads=args.threads, progress=world.main)
    results = evaluate(engine, task, args.method, shots=args.shots, task_file=args.task_file, exit=args.exit,
                       limit=args.limit, template=args.template, seed=args.seed, batch_size=args.batch_size,
                       calibration_prompts=args.calibration_prompts, out=args.out, figures=not args.no_figures,
                       progress=world.main, sync_every=args.sync_every, capture_checks=args.capture_checks,
                       prefill=args.prefill)
    if not world.main:  # rank 0 prints and writes for every rank
        return 0
    for run in results.runs:
        print(f"\n{results.task}, {run['shots']}-shot, {run['rows']} rows")
        print(table(run))
    for path in results.files:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
