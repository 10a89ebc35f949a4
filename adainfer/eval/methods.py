"""Evaluation methods: each is a layer plan or an exit policy for the same block loop, never a separate model.

    dense                 every block
    skip-last-N           the first L - N blocks (equal to an N-shorter model)
    shortgpt-N            without the N blocks of lowest Block Influence, BI_i = 1 - cos(input_i, output_i),
                          averaged over every token of a calibration set (ShortGPT, Men et al. 2024)
    skip-attn-latter-N    the attention sublayers of the last N blocks skipped (arXiv 2404.05741)
    gap-rule              exit when gap = p1 - p2 > 0.8, checking after every block (AdaInfer §5.3)
    svm / crf             a calibrated exit classifier (svm:FILE, crf:FILE; plain `svm` = the shipped default);
                          a classifier calibrated with a translator reads the layers through it
    svm+translator        a classifier calibrated with a translator (svm+translator:FILE; plain: the shipped one)
    oracle                exit at the earliest layer from which the top-1 never changes (an upper bound)
    translated-oracle     the same with each layer read through a translator (translated-oracle:FILE, FILE a
                          classifier with a translator or a .safetensors translator; plain: the first
                          svm+translator method's, else the shipped one)

An exit method with the suffix `@int8` (svm@int8, gap-rule@int8, crf:FILE@int8) takes its full-vocabulary features
from an int8 copy of the LM head (Plan.check_head; CPU or GPU); its answers still come from the full-precision head.
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
    "svm+translator": r"svm\+translator(?::(.+))?",
    "translated-oracle": r"translated-oracle(?::(.+))?",
    "crf": r"crf(?::(.+))?",
    "oracle": r"oracle",
}


@dataclass
class Method:
    name: str  # as given, e.g. "shortgpt-4"
    kind: str  # a key of PATTERNS
    plan: Plan | None = None  # None for the oracle (it needs the traces)
    info: dict = field(default_factory=dict)  # e.g. the layers ShortGPT removed, the classifier's description
    translator: object | None = None  # the translated oracle's (adainfer.translator.Translator)


def parse_method(spec: str) -> tuple[str, str | None]:
    if spec.endswith("@int8"):
        kind, arg = parse_method(spec[:-len("@int8")])
        if kind not in ("gap-rule", "svm", "crf", "svm+translator"):
            raise AdainferError("--method", f"{spec}: @int8 (an int8 check head) applies to exit methods only")
        return kind, arg
    for kind, pattern in PATTERNS.items():
        m = re.fullmatch(pattern, spec)
        if m:
            return kind, (m.group(1) if m.groups() else None)
    raise AdainferError("--method", f"unknown method {spec!r}; known: dense, skip-last-N, shortgpt-N, "
                                    "skip-attn-latter-N, gap-rule[-T], svm[:FILE], crf[:FILE], "
                                    "svm+translator[:FILE], oracle, translated-oracle[:FILE] "
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
    if kind in ("svm", "crf", "svm+translator"):
        translated = kind == "svm+translator"
        path = Path(arg) if arg else (exit_file or shipped_classifier(model.fingerprint, translator=translated))
        if path is None:
            raise AdainferError("--method", f"{spec}: give a classifier file ({kind}:FILE or --exit FILE)")
        clf = ExitClassifier.load(path)
        clf.check_model(model, path)
        if clf.kind != kind.split("+")[0]:
            raise AdainferError(path, f"is a {clf.kind} classifier, not {kind}")
        if translated and clf.translator is None:
            raise AdainferError(path, f"{spec}: this classifier was calibrated without a translator (calibrate one "
                                      "with --translator affine)")
        cands = candidates_of(clf, candidates, model.device, path)
        info = {"classifier": str(path), "first_layer": clf.first_layer, "stride": clf.stride,
                "features_over": "candidates" if clf.candidates else "vocabulary",
                "calibration": {k: v for k, v in clf.calibration.items() if k != "heldout"}}
        if clf.translator is not None:
            info["translator"] = clf.translator.describe()
        return Method(spec, kind, Plan(exit=ExitRule(clf, model.device), candidates=cands), info)
    if kind == "translated-oracle":
        reader = translator_of(Path(arg), model) if arg else None
        return Method(spec, kind, None, {} if reader is None else {"translator": reader.describe()}, reader)
    return Method(spec, kind, None)


def translator_of(path: Path, model: Decoder):
    """The translator in `path`: a .safetensors translator file, or a classifier calibrated with one."""
    from adainfer.translator import Translator

    if path.suffix == ".safetensors":
        reader = Translator.load(path, model.device)
    else:
        reader = ExitClassifier.load(path).translator
        if reader is None:
            raise AdainferError(path, "this classifier was calibrated without a translator")
    reader.check_model(model, path)
    return reader.to(model.device)


def oracle_translators(methods: list[Method], model: Decoder) -> None:
    """Give a translated-oracle without a file the translator of the first svm+translator method, else the shipped
    one's."""
    for m in methods:
        if m.kind != "translated-oracle" or m.translator is not None:
            continue
        other = next((o.plan.translator for o in methods if o.kind == "svm+translator"), None)
        if other is None:
            path = shipped_classifier(model.fingerprint, translator=True)
            if path is None:
                raise AdainferError("--method", f"{m.name}: give a translator (translated-oracle:FILE) or an "
                                                "svm+translator method")
            other = translator_of(path, model)
        m.translator = other
        m.info["translator"] = other.describe()


def check_classifiers(specs: list[str], model_folder: Path, exit_file: Path | None) -> None:
    """Refuse, before any model loads, an svm/crf method that names no classifier when none is shipped for the
    model (read by fingerprint from its folder)."""
    from adainfer.loading import folder_fingerprint

    shipped = None
    for spec in specs:
        kind, arg = parse_method(spec)
        if kind not in ("svm", "crf", "svm+translator") or arg or exit_file:
            continue
        if kind == "svm+translator":
            if shipped_classifier(folder_fingerprint(model_folder), translator=True) is None:
                raise AdainferError("--method", f"{spec}: no classifier with a translator is shipped for "
                                                f"{model_folder}; give one as {spec}:FILE (python -m "
                                                "adainfer.calibrate --translator affine)")
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
