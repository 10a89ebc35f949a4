"""The Python API under `python -m adainfer.run`: a loaded model with its tokenizer, answering prompts with early exit.

    engine = adainfer.load()                      # the embedded default model (converted on first use)
    [r] = engine.generate(["Q: a charming, funny film\\nA:"])
    r.text, r.layers_run, r.seconds

`Engine.generate` takes text, batches it (sorted by length, answers in input order), chooses the exit rule (the
classifier shipped for the model by default), runs prefill and decoding (adainfer.generate), and times each batch.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from adainfer.distributed import current_world
from adainfer.errors import AdainferError
from adainfer.exit import ExitClassifier, ExitRule, Plan, check_capture_checks, shipped_classifier
from adainfer.fast_decode import decode_graph, prepare_check_head
from adainfer.fast_prefill import prefill_mode
from adainfer.generate import MODES, Sampling, check_prompts, generate, length_batches, prefill_pad
from adainfer.loading import load_model
from adainfer.model import Decoder
from adainfer.speculative import Draft, speculative_generate
from adainfer.tokenizer import TextTokenizer

SHIPPED = "shipped"  # exit=SHIPPED: the classifier shipped for this model and candidate set, if there is one


@dataclass
class Result:
    """One prompt's answer."""

    prompt: str
    text: str
    token_ids: list[int]
    layers_run: list[int]  # blocks run for each generated token
    num_layers: int
    seconds: float  # this prompt's share of its batch's wall-clock
    batch_seconds: float
    batch_size: int
    truncated_tokens: int = 0  # prompt tokens cut to fit the context (truncate=True)
    dense_text: str | None = None  # with compare_dense: the dense run's answer and time, beside
    dense_seconds: float | None = None
    accepted: list[int] | None = None  # speculative decoding: drafts accepted in each verify round

    def to_dict(self) -> dict:
        """As `python -m adainfer.run --json` prints it (the optional fields only when set)."""
        d = asdict(self)
        if not self.truncated_tokens:
            del d["truncated_tokens"]
        if self.dense_text is None:
            del d["dense_text"], d["dense_seconds"]
        if self.accepted is None:
            del d["accepted"]
        else:
            d["tokens_per_verify"] = round(len(self.token_ids) / max(1, len(self.accepted)), 4)
        return d


@dataclass
class ExitChoice:
    """The exit rule a run uses, the candidates its answers are restricted to, and a line saying which and why."""

    rule: ExitRule | None
    candidates: list[str] | None
    description: str


class Engine:
    """A converted model and its tokenizer, ready to answer prompts. Make one with `adainfer.load`."""

    def __init__(self, model: Decoder, tokenizer: TextTokenizer, path: Path):
        self.model, self.tokenizer, self.path = model, tokenizer, Path(path)
        self._warm: set = set()  # (batch size, decode mode, cached) shapes already run once, off the clock

    @property
    def num_layers(self) -> int:
        return self.model.config.n_layers

    def resolve_exit(self, exit: str | Path | ExitClassifier | None = SHIPPED, candidates: list[str] | None = None,
                     min_layers: int | None = None, check_head: str = "full") -> ExitChoice:
        """exit: SHIPPED (the classifier shipped for this model whose features are over `candidates`; dense if
        there is none), a classifier file or object, or None (dense). A classifier fitted on candidate features
        brings its candidates."""
        model = self.model
        if min_layers is not None and not 1 <= min_layers <= model.config.n_layers:
            raise AdainferError("--min-layers", f"must be between 1 and {model.config.n_layers}")
        if exit is None:
            return ExitChoice(None, candidates, "none (dense)")
        where = exit
        if exit == SHIPPED:
            where = shipped_classifier(model.fingerprint, candidates)
            if where is None:
                over = f"features over {candidates}" if candidates else "this model"
                why = (f"no exit classifier is shipped for {over}; calibrate one with python -m adainfer.calibrate and "
                       "pass --exit FILE")
                return ExitChoice(None, candidates, f"none, dense ({why})")
        clf = exit if isinstance(exit, ExitClassifier) else ExitClassifier.load(where)
        where = "exit classifier" if isinstance(exit, ExitClassifier) else where
        clf.check_model(model, where)
        if clf.candidates is not None and candidates is None:
            candidates = clf.candidates  # the classifier's features are over these tokens; its answers are too
        if (clf.candidates or None) != (candidates or None):
            space = f"candidates {clf.candidates}" if clf.candidates else "the full vocabulary"
            raise AdainferError(where, f"this classifier was calibrated on features over {space}, not over "
                                       f"{candidates}; calibrate one with the same --candidates")
        rule = ExitRule(clf, model.device, min_layers)
        over = f"the candidates {clf.candidates}" if clf.candidates else "the full vocabulary"
        fitted = clf.calibration.get("tasks") or clf.calibration.get("prompts")
        fitted = f", fitted on {'+'.join(fitted) if isinstance(fitted, list) else fitted}" if fitted else ""
        head = ", int8 check head" if check_head != "full" else ""
        if clf.translator is not None:
            head += f", layers read through its {clf.translator.describe()}"
        return ExitChoice(rule, candidates, f"{clf.kind} on {'+'.join(clf.features)} over {over}{fitted}, checks from "
                                            f"layer {rule.first} every {clf.stride}{head}")

    def generate(self, prompts: str | list[str], max_new_tokens: int = 1, *,
                 exit: str | Path | ExitClassifier | ExitChoice | None = SHIPPED, mode: str = "sequence",
                 sampling: Sampling | None = None, batch_size: int = 1, candidates: list[str] | None = None,
                 min_layers: int | None = None, check_head: str = "full", decode: str = "eager",
                 truncate: bool = False, compare_dense: bool = False, sources: list[str] | None = None,
                 speculate: Draft | None = None, prefill: str = "eager", sync_every: int = 1,
                 capture_checks: bool = False) -> list[Result]:
        """Answer each prompt with up to `max_new_tokens` tokens (greedy unless `sampling`; prompt i samples with
        seed sampling.seed + i), early exit by `exit` (see resolve_exit) beyond the first token in `mode`
        (none | sequence | token, adainfer.generate), `batch_size` prompts per forward. `decode`: eager |
        compiled | int4 (adainfer.fast_decode); `prefill`: eager | compiled | captured, how the prompt's blocks
        run (fast_prefill.prefill_mode; the model keeps it; captured: on a GPU, each new prompt shape captured on its
        first call). `sync_every`: exit decisions read from the device every
        N checks (one host synchronisation for N layers; a row that fired answers from its layer); `capture_checks`:
        each check replayed as a CUDA graph (GPU; adainfer.exit.CheckGraphs). `truncate`: cut prompts longer than
        the context to their last tokens instead of refusing them. `compare_dense`: time a dense run of each batch
        beside it. `speculate`: self-speculative decoding with this draft (adainfer.speculative; the exit rule is not
        used: greedy answers are the dense model's tokens, sampled ones follow its distribution). Every prompt is
        checked before anything runs, so a bad one costs the others nothing; `sources` name them in errors (default
        "prompt N")."""
        model, tok = self.model, self.tokenizer
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        check_counts(max_new_tokens=max_new_tokens, batch_size=batch_size, sync_every=sync_every)
        check_capture_checks(capture_checks, model.device)
        if not prompts:
            raise AdainferError("prompts", "no prompts given")
        if mode not in MODES:
            raise AdainferError("--exit-mode", f"unknown mode {mode!r} (choose {', '.join(MODES)})")
        if speculate is not None:  # the answers are the dense model's: no exit rule, no candidates
            if candidates:
                raise AdainferError("--speculate", "answers over the full vocabulary (not with --candidates)")
            exit = None
        choice = exit if isinstance(exit, ExitChoice) else self.resolve_exit(exit, candidates, min_layers, check_head)
        if choice.rule is not None and mode == "token" and choice.rule.clf.candidates and max_new_tokens > 1:
            raise AdainferError("--exit-mode", "token mode checks every generated token over the full vocabulary; this "
                                               "classifier was calibrated on candidate features (use sequence mode)")
        graph = decode_graph(model, decode)
        prefill_mode(model, prefill)
        ids = [tok.encode(text) for text in prompts]
        dropped = [0] * len(ids)
        if truncate:
            ids, dropped = _truncate(ids, model.config.max_seq_len - max_new_tokens + 1, tok)
        check_prompts(ids, model, max_new_tokens, sources or "prompt")
        cand_ids = None
        if choice.candidates:
            cand_ids = torch.tensor(tok.candidate_ids(choice.candidates), device=model.device)
        prepare_check_head(model, check_head, cand_ids, "--check-head")
        plan = Plan(exit=choice.rule, candidates=cand_ids, check_head=check_head, sync_every=sync_every,
                    capture_checks=capture_checks)
        dense_plan = Plan(candidates=cand_ids)
        sampling = sampling or Sampling()

        # Sorted by length so batches carry little padding; answers come back in input order.
        batches = length_batches(ids, batch_size)
        self._warm_up(ids[batches[0][0]][-8:], {len(b) for b in batches}, graph, decode, max_new_tokens > 1,
                      dense_plan, speculate, prefill, plan)
        eos = model.config.eos_id

        def run(b: int) -> list[Result]:
            """Batch b's answers (whichever process runs it)."""
            batch = batches[b]
            seeds = [sampling.seed + i for i in batch]
            t0 = time.perf_counter()
            if speculate is not None:
                gens = speculative_generate(model, [ids[i] for i in batch], max_new_tokens, speculate, eos, sampling,
                                            seeds, graph)
            else:
                gens = generate(model, [ids[i] for i in batch], max_new_tokens, plan, eos, mode, sampling,
                                row_seeds=seeds, graph=graph)
            seconds = time.perf_counter() - t0
            dense, dense_seconds = None, None
            if compare_dense:
                t0 = time.perf_counter()
                dense = generate(model, [ids[i] for i in batch], max_new_tokens, dense_plan, eos, "none", sampling,
                                 row_seeds=seeds, graph=graph)
                dense_seconds = time.perf_counter() - t0
            return [Result(prompts[i], tok.decode(gens[j].token_ids), gens[j].token_ids, gens[j].layers_run,
                           self.num_layers, round(seconds / len(batch), 6), round(seconds, 6), len(batch), dropped[i],
                           None if dense is None else tok.decode(dense[j].token_ids),
                           None if dense is None else round(dense_seconds / len(batch), 6),
                           getattr(gens[j], "accepted", None))
                    for j, i in enumerate(batch)]

        # Data-parallel ranks each run their share of the batches (adainfer.distributed); answers in input order.
        parts = current_world().map_batches(run, batches, ids)
        results: list[Result | None] = [None] * len(ids)
        for batch, got in zip(batches, parts):
            for i, r in zip(batch, got):
                results[i] = r
        return results

    def _warm_up(self, warm: list[int], sizes: set[int], graph, decode: str, cached: bool, plan: Plan,
                 draft: Draft | None = None, prefill: str = "eager", checked: Plan | None = None) -> None:
        """First-call allocations (and the decode graph's compilation, once per batch size, on a GPU per bucket, so
        some of these reuse another's; a draft's draft and verify steps too; compiled prefill's blocks at two prompt
        lengths, so that the length is symbolic; the exit checks of `checked` once per batch size: on a GPU the
        kernel's tuning and the check graphs) off the clock."""
        key = ("prefill", prefill, cached)  # with a cache (more than one token) the blocks write it: other variants
        if prefill != "eager" and len(warm) > 2 and key not in self._warm:
            # Two lengths: the prompt's length (and the cache's) symbolic. A captured prefill pads lengths to a
            # multiple (prefill_pad): there the second is one past it, in the next multiple.
            m = prefill_pad(self.model)
            second = m + 1 if 1 < m < self.model.config.max_seq_len - 2 else len(warm) - 1
            for n in (len(warm), second):
                generate(self.model, [(warm * (n // len(warm) + 1))[-n:]], 2 if cached else 1, plan)
            self._warm.add(key)
        for size in sizes:
            key = (size, decode if cached else "prefill", prefill)
            if key not in self._warm:
                generate(self.model, [warm] * size, 2 if cached else 1, plan, graph=graph)
                self._warm.add(key)
            rule = None if checked is None else checked.exit
            key = (size, "checks", id(rule), checked is not None and checked.capture_checks, prefill)
            if rule is not None and key not in self._warm:
                generate(self.model, [warm] * size, 1, checked)
                self._warm.add(key)
            key = (size, decode, id(draft))
            if draft is not None and cached and key not in self._warm:
                speculative_generate(self.model, [warm] * size, 2 * draft.length + 2, draft, graph=graph)
                self._warm.add(key)


def check_counts(**counts: int | None) -> None:
    """Refuse a count below 1 (None: not given), named as its command-line option."""
    for name, value in counts.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise AdainferError(f"--{name.replace('_', '-')}", f"must be at least 1, got {value!r}")


def load(path: str | Path | None = None, dtype: str = "auto", device: str = "cpu", threads: int | None = None,
         progress: bool = True) -> Engine:
    """A converted model folder (None: the embedded default, downloaded and converted on first use) in `dtype`
    (auto: the faster of bfloat16 and float32 on this machine, adainfer.loading.resolve_dtype) on `device`."""
    if device not in ("cpu", "cuda") or (device == "cuda" and not torch.cuda.is_available()):
        here = "cpu, cuda" if torch.cuda.is_available() else "cpu"
        raise AdainferError("--device", f"{device!r} is not available here ({here})")
    check_counts(threads=threads)
    if threads is not None:
        torch.set_num_threads(threads)
    if path is None:
        from adainfer.default_model import default_model_dir

        path = default_model_dir(progress=progress)
    model, tok = load_model(path, dtype, device, current_world())
    if tok is None:
        raise AdainferError(path, "the model folder has no tokenizer.json or tokenizer.model")
    return Engine(model, tok, path)


def _truncate(ids: list[list[int]], limit: int, tok) -> tuple[list[list[int]], list[int]]:
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
