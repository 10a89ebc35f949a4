"""Metrics of AdaInfer §5.1 and appendix A: accuracy, pruning ratio, average layers and variance, FLOPs ratio."""

from __future__ import annotations

import numpy as np


def pruning_ratio(layers: np.ndarray, n_layers: int) -> float:
    """1 - average layers run / L."""
    return float(1 - np.mean(layers) / n_layers)


def flops_ratio(layers: np.ndarray, prompt_tokens: np.ndarray, n_layers: int, hidden: int, vocab: int,
                attn_skipped: np.ndarray | None = None) -> float:
    """The paper's eq. (2), (2 l'(6h + s) + V) / (2 l (6h + s) + V), per prompt with its real length s, averaged.

    A block's 6h + s splits into its sublayers as in the paper's count (per token, in units of 4h FLOPs): attention
    2h + s (q, k, v, o projections and the scores), MLP 4h. So a block whose attention sublayer is skipped counts
    4h, and a row with `attn_skipped` such blocks among its l' counts 2 (l'(6h + s) - a(2h + s)) + V. The blocks
    and one LM head are counted; the per-layer exit checks (a last-token head each) are not."""
    s = np.asarray(prompt_tokens, dtype=np.float64)
    lp = np.asarray(layers, dtype=np.float64)
    a = np.zeros_like(lp) if attn_skipped is None else np.asarray(attn_skipped, dtype=np.float64)
    ratio = (2 * (lp * (6 * hidden + s) - a * (2 * hidden + s)) + vocab) / (2 * n_layers * (6 * hidden + s) + vocab)
    return float(ratio.mean())


def summarize(records: list[dict], n_layers: int, hidden: int, vocab: int, seconds: float,
              dense_seconds: float | None) -> dict:
    layers = np.array([r["layers_run"] for r in records])
    tokens = np.array([r["prompt_tokens"] for r in records])
    out = {
        "rows": len(records),
        "accuracy": float(np.mean([r["correct"] for r in records])),
        "pruning_ratio": pruning_ratio(layers, n_layers),
        "avg_layers": float(layers.mean()),
        "var_layers": float(layers.var()),
        "flops_ratio": flops_ratio(layers, tokens, n_layers, hidden, vocab,
                                   np.array([r.get("attn_skipped", 0) for r in records])),
        "seconds": seconds,
    }
    if records and "correct_candidates" in records[0]:
        out["accuracy_candidates"] = float(np.mean([r["correct_candidates"] for r in records]))
    if dense_seconds:
        out["speedup"] = dense_seconds / seconds
    return out
