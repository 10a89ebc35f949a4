"""Run prompts through every layer once and keep the last token's exit features and top-1 after each block.

Calibration fits classifiers on these traces, and evaluation uses them for the oracle, the per-layer accuracy
curves and the feature plots. `simulate` replays an exit rule over a trace with the very decision the block loop
makes (ExitRule.fire), so a simulated exit layer is the layer the real run stops at.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from adainfer.exit import ExitClassifier, ExitRule, Plan
from adainfer.generate import left_pad
from adainfer.model import Decoder


@dataclass
class Traces:
    features: dict[str, np.ndarray]  # name -> (N, L - 1) float32, after blocks 1 .. L-1
    top1: np.ndarray  # (N, L) int64 vocabulary ids after blocks 1 .. L (the last column is the dense answer)
    n_layers: int
    prompt_tokens: np.ndarray  # (N,) prompt lengths in tokens
    seconds: float  # wall-clock of the collection (every layer plus a check after each)
    top1_candidates: np.ndarray | None = None  # (N, L) argmax over `also` candidates (vocabulary ids), if asked
    also: np.ndarray | None = None  # those candidates' token ids

    def save(self, path: Path, key: str) -> None:
        """Write to an .npz, tagged with `key` (what the traces were collected from; see `load`)."""
        arrays = {f"feature_{k}": v for k, v in self.features.items()}
        if self.top1_candidates is not None:
            arrays["top1_candidates"] = self.top1_candidates
            arrays["also"] = self.also
        tmp = Path(path).with_name(f".{Path(path).name}.tmp.npz")
        np.savez_compressed(tmp, top1=self.top1, prompt_tokens=self.prompt_tokens, key=np.array(key),
                            meta=np.array([self.n_layers, self.seconds]), **arrays)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path, key: str, also: np.ndarray | None = None) -> Traces | None:
        """The traces saved at `path` if they were collected for `key` (and hold the argmax over `also`)."""
        try:
            z = np.load(path, allow_pickle=False)
            if str(z["key"]) != key:
                return None
            if also is not None and ("also" not in z.files or not np.array_equal(z["also"], also)):
                return None
            feats = {k[len("feature_"):]: z[k] for k in z.files if k.startswith("feature_")}
            cand = z["top1_candidates"] if "top1_candidates" in z.files else None
            out = cls(feats, z["top1"], int(z["meta"][0]), z["prompt_tokens"], float(z["meta"][1]), cand)
            out.also = z["also"] if "also" in z.files else None
            return out
        except (OSError, ValueError, KeyError):
            return None

    def select(self, idx) -> Traces:
        cand = None if self.top1_candidates is None else self.top1_candidates[idx]
        return Traces({k: v[idx] for k, v in self.features.items()}, self.top1[idx], self.n_layers,
                      self.prompt_tokens[idx], self.seconds, cand, self.also)


def collect(model: Decoder, ids: list[list[int]], features=("gap", "top_prob"), candidates: torch.Tensor | None = None,
            batch_size: int = 8, progress: bool = True, desc: str = "prompts",
            also: torch.Tensor | None = None) -> Traces:
    """Dense runs of every prompt, recording the features after every block but the last. With `also` (token ids,
    features staying over the full vocabulary), each layer's argmax over those tokens is kept too."""
    from tqdm import tqdm

    L = model.config.n_layers
    clf = ExitClassifier("never", list(features), [0.0] * len(features), -1.0, 1, 1)
    plan = Plan(exit=ExitRule(clf, model.device), candidates=candidates, record_features=True,
                record_logits=also is not None)
    feats = {f: np.zeros((len(ids), L - 1), dtype=np.float32) for f in features}
    top1 = np.zeros((len(ids), L), dtype=np.int64)
    top1_also = np.zeros((len(ids), L), dtype=np.int64) if also is not None else None
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths together: little padding
    pad = model.config.pad_id if model.config.pad_id is not None else 0
    t0 = time.perf_counter()
    with tqdm(total=len(ids), desc=desc, unit="prompt", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            tokens, mask = left_pad([ids[i] for i in rows], pad, model.device)
            out = model(tokens, pad_mask=mask, plan=plan)
            for rec in out.features:
                n = rec["layer"]
                t = rec["top1"] if candidates is None else candidates[rec["top1"]]
                top1[rows, n - 1] = t.cpu().numpy()
                for f in features:
                    feats[f][rows, n - 1] = rec[f].float().cpu().numpy()
                if also is not None:
                    top1_also[rows, n - 1] = also[rec["logits"][:, also].argmax(-1).cpu()].numpy()
            top1[rows, L - 1] = out.token.cpu().numpy()
            if also is not None:
                top1_also[rows, L - 1] = also[out.logits[:, also].argmax(-1).cpu()].numpy()
            bar.update(len(rows))
    return Traces(feats, top1, L, np.array([len(p) for p in ids]), time.perf_counter() - t0, top1_also,
                  None if also is None else also.cpu().numpy())


def traces_key(model: Decoder, ids: list[list[int]], features, candidates, dtype) -> str:
    """What identifies a collection: the model, its dtype, the exact prompts, the features and candidate set."""
    h = hashlib.sha256()
    for part in (model.fingerprint, str(dtype), list(features), None if candidates is None else candidates.tolist()):
        h.update(repr(part).encode())
    for p in ids:
        h.update(np.asarray(p, dtype=np.int64).tobytes() + b"|")
    return h.hexdigest()


def collect_cached(model: Decoder, ids: list[list[int]], path: Path | None, features=("gap", "top_prob"),
                   candidates=None, batch_size: int = 8, progress: bool = True, desc: str = "prompts",
                   also=None) -> Traces:
    """collect(), reusing the traces saved at `path` when they came from the same model, prompts and settings."""
    key = traces_key(model, ids, features, candidates, model.dtype)
    if path is not None and Path(path).is_file():
        cached = Traces.load(path, key, None if also is None else also.cpu().numpy())
        if cached is not None:
            return cached
    traces = collect(model, ids, features, candidates, batch_size, progress, desc, also)
    if path is not None:
        traces.save(path, key)
    return traces


def final_labels(traces: Traces) -> np.ndarray:
    """(N, L - 1) bool: the layer's top-1 equals the last layer's (the paper's default label)."""
    return traces.top1[:, :-1] == traces.top1[:, -1:]


def gold_labels(traces: Traces, golds: list[set[int]]) -> np.ndarray:
    """(N, L - 1) bool: the layer's top-1 is an accepted answer token (the paper's appendix B label)."""
    return np.array([[t in g for t in row[:-1]] for row, g in zip(traces.top1, golds)], dtype=bool)


def decisions(rule: ExitRule, traces: Traces) -> list[tuple[int, np.ndarray]]:
    """(layer, (N,) bool fire) for each layer `rule` checks, replayed on every prompt as if none had left."""
    out, state = [], {}
    for n in range(1, traces.n_layers):
        if not rule.should_check(n):
            continue
        feats = {f: torch.from_numpy(traces.features[f][:, n - 1]) for f in rule.features}
        fire, state = rule.fire(feats, state)
        out.append((n, fire.cpu().numpy()))
    return out


def simulate(rule: ExitRule, traces: Traces, fires: list[tuple[int, np.ndarray]] | None = None) -> np.ndarray:
    """(N,) blocks each prompt runs under `rule`: the first checked layer where it fires, else L. `fires` are
    the rule's decisions() when the caller already has them."""
    N, L = traces.top1.shape
    exit_layer = np.full(N, L, dtype=np.int64)
    alive = np.ones(N, dtype=bool)
    for n, fire in decisions(rule, traces) if fires is None else fires:
        fire = fire & alive
        exit_layer[fire] = n
        alive &= ~fire
    return exit_layer


def tokens_at(traces: Traces, layers: np.ndarray) -> np.ndarray:
    """The top-1 token each prompt answers with when it stops after `layers[i]` blocks."""
    return traces.top1[np.arange(len(layers)), layers - 1]


def oracle_layers(traces: Traces, candidates: bool = False) -> np.ndarray:
    """The earliest layer from which the top-1 never changes again: exiting there keeps every answer."""
    top1 = traces.top1_candidates if candidates else traces.top1
    same = top1 == top1[:, -1:]  # (N, L)
    # from the back, the run of layers that all agree with the last one
    stable = np.flip(np.cumprod(np.flip(same, 1), 1), 1).astype(bool)
    return traces.n_layers - stable.sum(1) + 1
