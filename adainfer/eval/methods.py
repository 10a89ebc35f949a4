"""Evaluation methods: each is a layer plan or an exit policy for the same block loop, never a separate model.

    dense                 every block
    skip-last-N           the first L - N blocks (equal to an N-shorter model)
    shortgpt-N            without the N blocks of lowest Block Influence, BI_i = 1 - cos(input_i, output_i),
                          averaged over every token of a calibration set (ShortGPT, Men et al. 2024)
    skip-attn-latter-N    the attention sublayers of the last N blocks skipped (arXiv 2404.05741)
    gap-rule              exit when gap = p1 - p2 > 0.8, checking after every block (AdaInfer §5.3)
    svm / crf             a calibrated exit classifier (svm:FILE, crf:FILE; plain `svm` = the shipped default)
    oracle                exit at the earliest layer from which the top-1 never changes (an upper bound)

An exit method with the suffix `@int8` (svm@int8, gap-rule@int8, crf:FILE@int8) takes its full-vocabulary features
from an int8 copy of the LM head (Plan.check_head; CPU); its answers still come from the full-precision head.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from adainfer.errors import AdainferError
from adainfer.exit import ExitClassifier, ExitRule, Plan, gap_rule, shipped_classifier
from adainfer.generate import left_pad
from adainfer.model import Decoder

PATTERNS = {
    "dense": r"dense",
    "skip-last": r"skip-last-(\d+)",
    "shortgpt": r"shortgpt-(\d+)",
    "skip-attn-latter": r"skip-attn-latter-(\d+)",
    "gap-rule": r"gap-rule(?:-([0-9.]+))?",
    "svm": r"svm(?::(.+))?",
    "crf": r"crf(?::(.+))?",
    "oracle": r"oracle",
}


@dataclass
class Method:
    name: str  # as given, e.g. "shortgpt-4"
    kind: str  # a key of PATTERNS
    plan: Plan | None = None  # None for the oracle (it needs the traces)
    info: dict = field(default_factory=dict)  # e.g. the layers ShortGPT removed, the classifier's description


def parse_method(spec: str) -> tuple[str, str | None]:
    if spec.endswith("@int8"):
        kind, arg = parse_method(spec[:-len("@int8")])
        if kind not in ("gap-rule", "svm", "crf"):
            raise AdainferError("--method", f"{spec}: @int8 (an int8 check head) applies to exit methods only")
        return kind, arg
    for kind, pattern in PATTERNS.items():
        m = re.fullmatch(pattern, spec)
        if m:
            return kind, (m.group(1) if m.groups() else None)
    raise AdainferError("--method", f"unknown method {spec!r}; known: dense, skip-last-N, shortgpt-N, "
                                    "skip-attn-latter-N, gap-rule[-T], svm[:FILE], crf[:FILE], oracle "
                                    "(exit methods: optional @int8)")


def build_method(spec: str, model: Decoder, calibration_ids: list[list[int]] | None = None,
                 exit_file: Path | None = None, candidates: torch.Tensor | None = None) -> Method:
    if spec.endswith("@int8"):
        method = build_method(spec[:-len("@int8")], model, calibration_ids, exit_file, candidates)
        from adainfer.fast_decode import prepare_check_head

        prepare_check_head(model, "int8", method.plan.candidates, f"--method {spec}")
        return Method(spec, method.kind, replace(method.plan, check_head="int8"), {**method.info, "check_head": "int8"})
    kind, arg = parse_method(spec)
    L = model.config.n_layers
    if kind in ("skip-last", "shortgpt", "skip-attn-latter"):
        n = int(arg)
        if not 0 < n < L:
            raise AdainferError("--method", f"{spec}: N must be between 1 and {L - 1}")
    if kind == "dense":
        return Method(spec, kind, Plan())
    if kind == "skip-last":
        return Method(spec, kind, Plan(layers=list(range(L - n))), {"layers_removed": list(range(L - n, L))})
    if kind == "skip-attn-latter":
        return Method(spec, kind, Plan(skip_attn=frozenset(range(L - n, L))),
                      {"attention_skipped": list(range(L - n, L))})
    if kind == "shortgpt":
        if not calibration_ids:
            raise AdainferError("--method", f"{spec} needs calibration prompts for Block Influence")
        bi = block_influence(model, calibration_ids)
        removed = sorted(np.argsort(bi)[:n].tolist())
        return Method(spec, kind, Plan(layers=[i for i in range(L) if i not in removed]),
                      {"layers_removed": removed, "block_influence": [round(float(b), 6) for b in bi]})
    if kind == "gap-rule":
        threshold = float(arg) if arg else 0.8
        return Method(spec, kind, Plan(exit=ExitRule(gap_rule(threshold), model.device)),
                      {"rule": f"gap > {threshold}, every layer"})
    if kind in ("svm", "crf"):
        path = Path(arg) if arg else (exit_file or shipped_classifier(model.fingerprint))
        if path is None:
            raise AdainferError("--method", f"{spec}: give a classifier file ({kind}:FILE or --exit FILE)")
        clf = ExitClassifier.load(path)
        clf.check_model(model, path)
        if clf.kind != kind:
            raise AdainferError(path, f"is a {clf.kind} classifier, not {kind}")
        cands = candidates_of(clf, candidates, model.device, path)
        return Method(spec, kind, Plan(exit=ExitRule(clf, model.device), candidates=cands),
                      {"classifier": str(path), "first_layer": clf.first_layer, "stride": clf.stride,
                       "features_over": "candidates" if clf.candidates else "vocabulary",
                       "calibration": {k: v for k, v in clf.calibration.items() if k != "heldout"}})
    return Method(spec, kind, None)


def check_classifiers(specs: list[str], model_folder: Path, exit_file: Path | None) -> None:
    """Refuse, before any model loads, an svm/crf method that names no classifier when none is shipped for the
    model (read by fingerprint from its folder)."""
    from adainfer.loading import folder_fingerprint

    shipped = None
    for spec in specs:
        kind, arg = parse_method(spec)
        if kind not in ("svm", "crf") or arg or exit_file:
            continue
        if kind == "svm" and shipped is None:
            shipped = shipped_classifier(folder_fingerprint(model_folder)) or False
        if kind == "crf" or not shipped:
            what = "no CRF classifier is shipped" if kind == "crf" else f"no classifier is shipped for {model_folder}"
            raise AdainferError("--method", f"{spec}: {what}; give one as {kind}:FILE or --exit FILE (fit it with "
                                            "python -m adainfer.calibrate)")


def candidates_of(clf: ExitClassifier, candidates: torch.Tensor | None, device, path) -> torch.Tensor | None:
    """A classifier calibrated on candidate features runs in candidate mode (the task's candidates)."""
    if clf.candidates is None:
        return None
    if candidates is None:
        raise AdainferError(path, "was calibrated on candidate features, and this task has no candidate set")
    return candidates.to(device)


@torch.inference_mode()
def block_influence(model: Decoder, ids: list[list[int]], batch_size: int = 4) -> np.ndarray:
    """BI_i = 1 - cos(block i input, block i output), averaged over every real token of the prompts."""
    L = model.config.n_layers
    total, count = torch.zeros(L, dtype=torch.float64), 0
    pad = model.config.pad_id if model.config.pad_id is not None else 0
    for start in range(0, len(ids), batch_size):
        tokens, mask = left_pad(ids[start:start + batch_size], pad, model.device)
        hs = model(tokens, pad_mask=mask, plan=Plan(hidden_states=True)).hidden_states
        real = torch.ones(tokens.shape, dtype=torch.bool) if mask is None else mask.cpu()
        for i in range(L):
            cos = F.cosine_similarity(hs[i].float(), hs[i + 1].float(), dim=-1).cpu()  # (B, T)
            total[i] += (1 - cos)[real].double().sum()
        count += int(real.sum())
    return (total / count).numpy()
