"""Tables from eval results: `table(run)` for one (task, shots) run, and

    python -m adainfer.eval.report results/*.json [--figures DIR]

for the paper-style tables (per shot count: task x method with Acc, Acc over candidates, P.ratio, Avg L +- var,
FLOPs ratio, speedup) and the cross-task figures (per-layer accuracy, mean gap / top-prob along the layers).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

COLUMNS = ("Method", "Acc", "Acc (cand.)", "P.ratio", "Avg L ± var", "FLOPs", "Time s", "Speedup")


def row_cells(name: str, s: dict) -> list[str]:
    cand = s.get("accuracy_candidates")
    return [name, f"{100 * s['accuracy']:.1f}", "-" if cand is None else f"{100 * cand:.1f}",
            f"{100 * s['pruning_ratio']:.1f}%", f"{s['avg_layers']:.2f} ± {s['var_layers']:.2f}",
            f"{s['flops_ratio']:.3f}", f"{s['seconds']:.1f}", f"{s.get('speedup', float('nan')):.2f}x"]


def table(run: dict, task: str | None = None) -> str:
    head = (["Task"] if task else []) + list(COLUMNS)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in run["methods"].items():
        cells = row_cells(name + _note(m["info"]), m["summary"])
        lines.append("| " + " | ".join(([task] if task else []) + cells) + " |")
    return "\n".join(lines)


def _note(info: dict) -> str:
    if "layers_removed" in info and "block_influence" in info:
        return f" (removed {info['layers_removed']})"
    if "first_layer" in info:
        return f" (checks from {info['first_layer']})"
    return ""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m adainfer.eval.report", description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", type=Path)
    p.add_argument("--figures", type=Path, help="write the cross-task figures into this folder")
    args = p.parse_args(argv)
    loaded = [json.loads(path.read_text()) for path in args.results]
    shots = sorted({run["shots"] for r in loaded for run in r["runs"]})
    for k in shots:
        print(f"\n### {k}-shot\n")
        head = ["Task", *COLUMNS]
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for r in loaded:
            for run in r["runs"]:
                if run["shots"] != k:
                    continue
                for name, m in run["methods"].items():
                    cells = row_cells(name + _note(m["info"]), m["summary"])
                    print("| " + " | ".join([f"{r['task']} ({run['rows']})", *cells]) + " |")
    if args.figures:
        from adainfer.eval.figures import cross_task_figures

        for path in cross_task_figures(loaded, args.figures):
            print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
