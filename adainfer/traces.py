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

from adainfer.distributed import current_world
from adainfer.exit import ExitClassifier, ExitRule, Plan
from adainfer.generate import left_pad, length_batches, prefill_pad
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
    hidden: np.ndarray | None = None  # (N, L, dim) float32: the last token's state after blocks 1 .. L, if asked
    samples: np.ndarray | None = None  # (M, L, dim) float16: states at other sampled positions (translator fits)
    sample_rows: np.ndarray | None = None  # (M,) the prompt each sample comes from

    def save(self, path: Path, key: str) -> None:
        """Write to an .npz, tagged with `key` (what the traces were collected from; see `load`)."""
        arrays = {f"feature_{k}": v for k, v in self.features.items()}
        for name in ("top1_candidates", "also", "hidden", "samples", "sample_rows"):
            if getattr(self, name) is not None:
                arrays[name] = getattr(self, name)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(path).with_name(f".{Path(path).name}.tmp.npz")
        save = np.savez if self.hidden is not None else np.savez_compressed  # states hardly compress
        save(tmp, top1=self.top1, prompt_tokens=self.prompt_tokens, key=np.array(key),
                            meta=np.array([self.n_layers, self.seconds]), **arrays)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path, key: str, also: np.ndarray | None = None, hidden: bool = False) -> Traces | None:
        """The traces saved at `path` if they were collected for `key` (and hold the argmax over `also`, and the
        hidden states when asked)."""
        try:
            z = np.load(path, allow_pickle=False)
            if str(z["key"]) != key or (hidden and "hidden" not in z.files):
                return None
            if also is not None and ("also" not in z.files or not np.array_equal(z["also"], also)):
                return None
            feats = {k[len("feature_"):]: z[k] for k in z.files if k.startswith("feature_")}
            opt = {k: z[k] if k in z.files else None for k in ("top1_candidates", "also", "hidden", "samples",
                                                               "sample_rows")}
            return cls(feats, z["top1"], int(z["meta"][0]), z["prompt_tokens"], float(z["meta"][1]), **opt)
        except (OSError, ValueError, KeyError):
            return None

    def select(self, idx) -> Traces:
        """The traces of prompts `idx` (an index array), their samples renumbered."""
        idx = np.asarray(idx)
        cand = None if self.top1_candidates is None else self.top1_candidates[idx]
        hidden = None if self.hidden is None else self.hidden[idx]
        samples = rows = None
        if self.samples is not None:
            new = np.full(len(self.top1), -1)
            new[idx] = np.arange(len(idx))
            keep = new[self.sample_rows] >= 0
            samples, rows = self.samples[keep], new[self.sample_rows[keep]]
        return Traces({k: v[idx] for k, v in self.features.items()}, self.top1[idx], self.n_layers,
                      self.prompt_tokens[idx], self.seconds, cand, self.also, hidden, samples, rows)


def collect(model: Decoder, ids: list[list[int]], features=("gap", "top_prob"), candidates: torch.Tensor | None = None,
            batch_size: int = 8, progress: bool = True, desc: str = "prompts",
            also: torch.Tensor | None = None, hidden: int | None = None, seed: int = 0) -> Traces:
    """Dense runs of every prompt, recording the features after every block but the last. With `also` (token ids,
    features staying over the full vocabulary), each layer's argmax over those tokens is kept too. With `hidden`
    (a count), the last token's states after every block are kept, and those of up to `hidden` other positions
    per prompt drawn with `seed` (not its first two tokens, where some models keep outsized states)."""
    from tqdm import tqdm

    L = model.config.n_layers
    clf = ExitClassifier("never", list(features), [0.0] * len(features), -1.0, 1, 1)
    plan = Plan(exit=ExitRule(clf, model.device), candidates=candidates, record_features=True,
                record_logits=also is not None, hidden_states=hidden is not None)
    states = np.zeros((len(ids), L, model.config.dim), dtype=np.float32) if hidden is not None else None
    samples, sample_rows = [], []
    feats = {f: np.zeros((len(ids), L - 1), dtype=np.float32) for f in features}
    top1 = np.zeros((len(ids), L), dtype=np.int64)
    top1_also = np.zeros((len(ids), L), dtype=np.int64) if also is not None else None
    batches = length_batches(ids, batch_size)
    pad = model.config.pad_id if model.config.pad_id is not None else 0
    world = current_world()
    t0 = time.perf_counter()

    def run(b: int) -> dict:
        """One batch's readings (batch b, whichever process runs it)."""
        rows = batches[b]
        tokens, mask = left_pad([ids[i] for i in rows], pad, model.device, prefill_pad(model))
        out = model(tokens, pad_mask=mask, plan=plan)
        got = {"top1": np.zeros((len(rows), L), dtype=np.int64),
               "feats": {f: np.zeros((len(rows), L - 1), dtype=np.float32) for f in features}}
        if also is not None:
            got["also"] = np.zeros((len(rows), L), dtype=np.int64)
        for rec in out.features:
            n = rec["layer"]
            t = rec["top1"] if candidates is None else candidates[rec["top1"]]
            got["top1"][:, n - 1] = t.cpu().numpy()
            for f in features:
                got["feats"][f][:, n - 1] = rec[f].float().cpu().numpy()
            if also is not None:
                got["also"][:, n - 1] = also[rec["logits"][:, also].argmax(-1).cpu()].numpy()
        got["top1"][:, L - 1] = out.token.cpu().numpy()
        if also is not None:
            got["also"][:, L - 1] = also[out.logits[:, also].argmax(-1).cpu()].numpy()
        if hidden is not None:
            hs = torch.stack(out.hidden_states[1:], 1)  # (B, L, T, dim): after blocks 1 .. L
            # copied out (contiguous): a view would keep the whole batch's states alive until the batches are assembled
            got["states"] = hs[:, :, -1].float().contiguous().cpu().numpy()
            got["samples"], got["sample_rows"] = [], []
            T = tokens.shape[1]
            for j, i in enumerate(rows):
                n = len(ids[i])  # left-padded: the prompt holds the last n positions
                pick = np.random.default_rng([seed, i]).permutation(np.arange(2, n - 1))[:hidden]
                if len(pick):
                    got["samples"].append(hs[j, :, T - n + np.sort(pick)].transpose(0, 1).half().cpu().numpy())
                    got["sample_rows"] += [i] * len(pick)
        bar.update(len(rows))
        return got

    # Across data-parallel ranks each runs its share of the batches (adainfer.distributed); assembled in batch order.
    with tqdm(total=len(ids), desc=desc, unit="prompt", disable=not progress or not world.main) as bar:
        parts = world.map_batches(run, batches, ids)
    for rows, got in zip(batches, parts):
        top1[rows] = got["top1"]
        for f in features:
            feats[f][rows] = got["feats"][f]
        if also is not None:
            top1_also[rows] = got["also"]
        if hidden is not None:
            states[rows] = got["states"]
            samples += got["samples"]
            sample_rows += got["sample_rows"]
    if hidden is not None:
        samples = np.concatenate(samples) if samples else np.zeros((0, L, model.config.dim), np.float16)
    return Traces(feats, top1, L, np.array([len(p) for p in ids]), time.perf_counter() - t0, top1_also,
                  None if also is None else also.cpu().numpy(), states, samples if hidden is not None else None,
                  None if hidden is None else np.array(sample_rows, dtype=np.int64))


def traces_key(model: Decoder, ids: list[list[int]], features, candidates, dtype, hidden=None, seed=0) -> str:
    """What identifies a collection: the model, its dtype, the exact prompts, the features and candidate set, the
    sampled positions."""
    h = hashlib.sha256()
    for part in (model.fingerprint, str(dtype), list(features), None if candidates is None else candidates.tolist(),
                 *([] if hidden is None else [hidden, seed])):
        h.update(repr(part).encode())
    for p in ids:
        h.update(np.asarray(p, dtype=np.int64).tobytes() + b"|")
    return h.hexdigest()


def collect_cached(model: Decoder, ids: list[list[int]], path: Path | None, features=("gap", "top_prob"),
                   candidates=None, batch_size: int = 8, progress: bool = True, desc: str = "prompts",
                   also=None, hidden: int | None = None, seed: int = 0) -> Traces:
    """collect(), reusing the traces saved at `path` when they came from the same model, prompts and settings."""
    key = traces_key(model, ids, features, candidates, model.dtype, hidden, seed)
    world = current_world()
    cached = None
    if path is not None and Path(path).is_file() and world.main:
        cached = Traces.load(path, key, None if also is None else also.cpu().numpy(), hidden is not None)
    cached = world.broadcast(cached)  # rank 0 reads the cache: every rank takes it, or every rank collects
    if cached is not None:
        return cached
    traces = collect(model, ids, features, candidates, batch_size, progress, desc, also, hidden, seed)
    if path is not None and world.main:
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


@torch.inference_mode()
def translated(traces: Traces, model: Decoder, translator, candidates: torch.Tensor | None = None,
               batch_size: int = 512) -> Traces:
    """The traces as the exit check reads them through `translator` (adainfer.translator): after each block n < L
    that has a map, gap, top_prob, top-1 (and the argmax over `also`) of translator.read(n, state) through the
    final norm and head, the loop's own exit.probe on the saved last-token states. The last layer's answers and the
    cosine features (which compare untranslated states) stay as they were."""
    from adainfer.exit import probe

    if traces.hidden is None:
        raise ValueError("translated() needs traces collected with hidden=...")
    out = copy_readings(traces)
    feats, top1, cand = out.features, out.top1, out.top1_candidates
    weight = model.head_rows(candidates)
    also = None if traces.also is None else torch.from_numpy(traces.also).to(model.device)
    for n in translator.layers:
        if n >= traces.n_layers:
            continue
        for s in range(0, len(top1), batch_size):
            h = torch.from_numpy(traces.hidden[s:s + batch_size, n - 1]).to(model.device, model.dtype)
            read = translator.read(n, h)
            top2, logits = probe(model, read, weight)
            t = top2.top1 if candidates is None else candidates[top2.top1]
            top1[s:s + batch_size, n - 1] = t.cpu().numpy()
            if "gap" in feats:
                feats["gap"][s:s + batch_size, n - 1] = (top2.p1 - top2.p2).float().cpu().numpy()
            if "top_prob" in feats:
                feats["top_prob"][s:s + batch_size, n - 1] = top2.p1.float().cpu().numpy()
            if cand is not None:
                if logits is None:  # the CUDA check writes no logits
                    logits = model.head(read)  # as the loop's answers
                cand[s:s + batch_size, n - 1] = also[logits[:, also].argmax(-1)].cpu().numpy()
    return out


def copy_readings(traces: Traces) -> Traces:
    """The traces with their own copies of what a reading changes (features, top-1s); the states are shared."""
    return Traces({k: v.copy() for k, v in traces.features.items()}, traces.top1.copy(), traces.n_layers,
                  traces.prompt_tokens, traces.seconds,
                  None if traces.top1_candidates is None else traces.top1_candidates.copy(), traces.also,
                  traces.hidden, traces.samples, traces.sample_rows)


def fit_translator_on(traces: Traces, kind: str, rank: int | None = None, layers=None, progress: bool = False,
                      folds: int = 5, seed: int = 0, penalties: dict[int, float] | None = None):
    """A translator (adainfer.translator) fitted on every sampled state of `traces`, last tokens included: for each
    block n in `layers` (default 1 .. L-1), the final block's output regressed on the state after block n."""
    from adainfer.translator import fit_translator

    if traces.hidden is None:
        raise ValueError("fit_translator_on() needs traces collected with hidden=...")
    states = traces.hidden if traces.samples is None or not len(traces.samples) else \
        np.concatenate([traces.hidden, traces.samples.astype(np.float32)])
    layers = range(1, traces.n_layers) if layers is None else layers
    return fit_translator(states, states[:, -1], layers, kind, rank, folds, seed, progress, penalties)


def translated_out_of_fold(traces: Traces, model: Decoder, fitted, candidates: torch.Tensor | None = None,
                           folds: int = 5, seed: int = 0) -> Traces:
    """`traces` read through translators that never saw their prompt: the prompts fall in `folds` groups, and each
    group is read through maps fitted on the other groups' states (with the penalties `fitted`, the translator fitted
    on all of them, chose). Reading the prompts a translator was fitted on flatters it (a dim x dim map fitted on a
    few thousand states partly memorises them); a classifier tuned on these readings expects what unseen prompts
    will show."""
    N = len(traces.top1)
    groups = np.array_split(np.random.default_rng(seed).permutation(N), min(folds, N))
    penalties = {int(n): f["penalty"] for n, f in fitted.fit["layers"].items()}
    out = copy_readings(traces)
    for group in groups:
        idx = np.sort(group)
        rest = np.setdiff1d(np.arange(N), idx)
        reader = fit_translator_on(traces.select(rest), fitted.kind, fitted.rank, fitted.layers, penalties=penalties)
        part = translated(traces.select(idx), model, reader, candidates)
        for k in out.features:
            out.features[k][idx] = part.features[k]
        out.top1[idx] = part.top1
        if out.top1_candidates is not None:
            out.top1_candidates[idx] = part.top1_candidates
    return out
