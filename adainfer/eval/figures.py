"""Figures (matplotlib PNG): per-layer accuracy (AdaInfer Fig. 1), mean gap and top-prob along the layers (Fig. 3),
and exit-layer histograms per method."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_figures(results: dict, out: Path) -> list[Path]:
    """Two PNGs per shot count beside `out`: <stem>_<k>shot_layers.png and <stem>_<k>shot_exits.png."""
    plt = _plt()
    out = Path(out)
    paths = []
    for run in results["runs"]:
        k, pl = run["shots"], run["per_layer"]
        layers = np.arange(1, len(pl["accuracy"]) + 1)
        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
        a.plot(layers, pl["accuracy"], marker=".", label="accuracy (full vocabulary)")
        if "accuracy_candidates" in pl:
            a.plot(layers, pl["accuracy_candidates"], marker=".", label="accuracy (candidates)")
        a.plot(layers, pl["agreement_with_final"], ls="--", label="top-1 = last layer's")
        tr = run.get("per_layer_translated")
        if tr:
            a.plot(layers, tr["accuracy"], marker=".", label="accuracy, read through the translator")
            a.plot(layers, tr["agreement_with_final"], ls="--", label="top-1 = last layer's, translated")
        a.set(xlabel="exit layer", ylabel="fraction of rows", title=f"{results['task']} {k}-shot: exit at each layer")
        a.legend()
        for f in ("gap", "top_prob"):
            if f"mean_{f}" in pl:
                b.plot(layers[:-1], pl[f"mean_{f}"], marker=".", label=f)
        b.set(xlabel="layer", ylabel="mean over rows", title="exit features along the layers")
        b.legend()
        fig.tight_layout()
        paths.append(_save(fig, out.with_name(f"{out.stem}_{k}shot_layers.png")))

        fig, ax = plt.subplots(figsize=(7, 4))
        L = results["n_layers"]
        for name, m in run["methods"].items():
            exits = [r["layers_run"] for r in m["records"]]
            if len(set(exits)) > 1 or name in ("dense",):
                ax.hist(exits, bins=np.arange(0.5, L + 1.5), alpha=0.5, label=name)
        ax.set(xlabel="layers run", ylabel="rows", title=f"{results['task']} {k}-shot: exit layers")
        ax.legend()
        fig.tight_layout()
        paths.append(_save(fig, out.with_name(f"{out.stem}_{k}shot_exits.png")))
    return paths


def cross_task_figures(results: list[dict], folder: Path) -> list[Path]:
    """Fig. 1 and Fig. 3 across tasks, one PNG per shot count each."""
    plt = _plt()
    folder = Path(folder)
    paths = []
    shots = sorted({run["shots"] for r in results for run in r["runs"]})
    for k in shots:
        fig1, ax1 = plt.subplots(1, 2, figsize=(12, 4))
        fig3, ax3 = plt.subplots(1, 2, figsize=(12, 4))
        for r in results:
            for run in r["runs"]:
                if run["shots"] != k:
                    continue
                pl = run["per_layer"]
                x = np.arange(1, len(pl["accuracy"]) + 1)
                ax1[0].plot(x, pl["accuracy"], marker=".", label=r["task"])
                if "accuracy_candidates" in pl:
                    ax1[1].plot(x, pl["accuracy_candidates"], marker=".", label=r["task"])
                ax3[0].plot(x[:-1], pl["mean_gap"], marker=".", label=r["task"])
                ax3[1].plot(x[:-1], pl["mean_top_prob"], marker=".", label=r["task"])
        ax1[0].set(title=f"{k}-shot: accuracy when exiting at each layer (full vocabulary)", xlabel="layer",
                   ylabel="accuracy")
        ax1[1].set(title=f"{k}-shot: ... over the label words / option letters", xlabel="layer", ylabel="accuracy")
        ax3[0].set(title=f"{k}-shot: mean gap (p1 - p2) after each block", xlabel="layer")
        ax3[1].set(title=f"{k}-shot: mean top prob after each block", xlabel="layer")
        for ax in (*ax1, *ax3):
            ax.legend()
        for fig, name in ((fig1, "layer_accuracy"), (fig3, "features")):
            fig.tight_layout()
            paths.append(_save(fig, folder / f"{name}_{k}shot.png"))
    return paths


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path
