"""Exit features, the exit-classifier file, the inline decision the block loop calls after a block, and the loop's
bookkeeping: the Plan of a run, the Exits of its rows and its Output.

Features of the last token after block n (AdaInfer §4.1): gap = p1 - p2 and top_prob = p1 of the softmax over the
LM head (or over the candidate tokens only); optionally the cosine similarity of the block's attention output, MLP
output and hidden state with the previous block's (the paper's factor study), computed only when asked for.

A classifier file is JSON: its kind, feature names, weights and bias (any scaler folded in), where checking starts
and its stride, the model it was fitted for and how it was calibrated. At run time the decision is one dot
product in torch, `w . x + b > 0`; for the CRF, one step of prefix Viterbi over the checked layers. A classifier
calibrated with a translator (adainfer.translator) names its file, saved beside it; its features, and the answer of
a row that exits, come from the translated reading of the exit layer.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F

from adainfer.capture import Captured, require_cuda
from adainfer.errors import AdainferError
from adainfer.kernels.top2 import Top2, lm_head_top2, top2_from_logits
from adainfer.quant import INT4_GROUP
from adainfer.translator import Translator, sha256

FEATURES = ("gap", "top_prob", "cos_attn", "cos_mlp", "cos_hidden")
KINDS = ("svm", "gap", "crf", "never")
FORMAT = "adainfer-exit-classifier"
VERSION = 1
MAX_FILE = 1 << 20


@dataclass
class ExitClassifier:
    kind: str  # "svm" (linear), "gap" (the paper's rule gap > threshold), "crf", "never"
    features: list[str]
    weight: list[float]  # one per feature, in raw feature units (scaler folded in)
    bias: float
    first_layer: int = 1  # the first check is after this many blocks
    stride: int = 1  # then every `stride` blocks
    candidates: list[str] | None = None  # features over these tokens' logits only (candidate mode)
    model: dict = field(default_factory=dict)  # {"fingerprint", "name", "n_layers"}
    calibration: dict = field(default_factory=dict)  # task, shots, label mode, sizes, held-out report
    crf: dict | None = None  # {"state_weight": [[w per feature] per label], "state_bias": [b0, b1], "transitions"}
    translator: Translator | None = field(default=None, repr=False)  # in the file: {"file", "sha256", ...}

    def to_json(self, translator_ref: dict | None = None) -> str:
        body = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "translator"}
        return json.dumps({"format": FORMAT, "version": VERSION, **body, "translator": translator_ref}, indent=1,
                          allow_nan=False) + "\n"

    def save(self, path: Path) -> None:
        """Write atomically (temp file + rename); a translator goes beside it as <stem>.translator.safetensors."""
        path = Path(path)
        ref = None
        if self.translator is not None:
            t_path = path.with_name(f"{path.stem}.translator.safetensors")
            ref = {"file": t_path.name, "sha256": self.translator.save(t_path), "kind": self.translator.kind,
                   "rank": self.translator.rank, "layers": self.translator.layers,
                   "bytes": t_path.stat().st_size}
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(self.to_json(ref))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> ExitClassifier:
        path = Path(path)
        if not path.is_file():
            raise AdainferError(path, "exit classifier file not found")
        raw = path.read_bytes()
        if len(raw) > MAX_FILE:
            raise AdainferError(path, f"exit classifier file is {len(raw)} bytes (limit {MAX_FILE})")
        try:
            data = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as e:
            raise AdainferError(path, f"malformed classifier JSON: {e}") from None
        ref = data.pop("translator", None) if isinstance(data, dict) else None
        clf = cls.from_dict(data, path)
        if ref is not None:
            if not isinstance(ref, dict) or not isinstance(ref.get("file"), str) or "/" in ref["file"]:
                raise AdainferError(path, 'translator must be null or {"file": a name beside the classifier, ...}')
            t_path = path.with_name(ref["file"])
            if not t_path.is_file():
                raise AdainferError(path, f"its translator {t_path} is missing (it is saved beside the classifier)")
            if ref.get("sha256") and sha256(t_path) != ref["sha256"]:
                raise AdainferError(t_path, f"is not the translator {path.name} was calibrated with (sha256 differs)")
            clf.translator = Translator.load(t_path)
        return clf

    @classmethod
    def from_dict(cls, data: object, where: object) -> ExitClassifier:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise AdainferError(where, f"not an adainfer exit classifier (format must be {FORMAT!r})")
        if data.get("version") != VERSION:
            raise AdainferError(where, f"classifier version {data.get('version')!r} is not {VERSION}")
        body = {k: v for k, v in data.items() if k not in ("format", "version", "translator")}
        try:
            clf = cls(**body)
        except TypeError as e:
            raise AdainferError(where, f"bad classifier fields: {e}") from None
        clf.validate(where)
        return clf

    def validate(self, where: object) -> ExitClassifier:
        if self.kind not in KINDS:
            raise AdainferError(where, f"unknown classifier kind {self.kind!r} (known: {', '.join(KINDS)})")
        if not isinstance(self.features, list) or not self.features or any(f not in FEATURES for f in self.features):
            raise AdainferError(where, f"features must be a non-empty list from {FEATURES}, got {self.features!r}")
        if len(set(self.features)) != len(self.features):
            raise AdainferError(where, "features repeat")
        if not isinstance(self.weight, list) or len(self.weight) != len(self.features):
            raise AdainferError(where, f"weight needs {len(self.features)} numbers, one per feature")
        _finite(where, "weight", self.weight)
        _finite(where, "bias", [self.bias])
        for name in ("first_layer", "stride"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise AdainferError(where, f"{name} must be a positive integer, got {v!r}")
        if self.candidates is not None and (not isinstance(self.candidates, list) or len(self.candidates) < 2
                                            or not all(isinstance(c, str) and c for c in self.candidates)):
            raise AdainferError(where, "candidates must be null or a list of at least two non-empty strings")
        if not isinstance(self.model, dict) or not isinstance(self.calibration, dict):
            raise AdainferError(where, "model and calibration must be objects")
        if self.kind == "crf":
            crf = self.crf
            ok = (isinstance(crf, dict) and _matrix(crf.get("state_weight"), 2, len(self.features))
                  and _matrix(crf.get("transitions"), 2, 2) and _matrix([crf.get("state_bias")], 1, 2))
            if not ok:
                raise AdainferError(where, "crf needs state_weight (2 x features), state_bias (2) and transitions "
                                           "(2 x 2)")
            _finite(where, "crf", [x for row in crf["state_weight"] + crf["transitions"] for x in row]
                    + list(crf["state_bias"]))
        return self

    def check_model(self, model, where: object) -> None:
        """Refuse a classifier fitted for another model (by fingerprint) or a deeper one."""
        want = self.model.get("fingerprint")
        have = getattr(model, "fingerprint", None)
        if want and have and want != have:
            raise AdainferError(where, f"classifier was fitted for model {self.model.get('name') or want} "
                                       f"(fingerprint {want}), not this one ({have}); calibrate it for this model "
                                       "with python -m adainfer.calibrate")
        if self.first_layer > model.config.n_layers:
            raise AdainferError(where, f"first_layer={self.first_layer} is beyond the model's "
                                       f"{model.config.n_layers} layers")
        if self.translator is not None:
            self.translator.check_model(model, where)
            missing = [n for n in range(self.first_layer, model.config.n_layers, self.stride)
                       if n not in self.translator.maps]
            if missing:
                raise AdainferError(where, f"its translator has no map for the checked layers {missing}")


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a number")


def _finite(where, what, values) -> None:
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise AdainferError(where, f"{what} holds a non-finite or non-numeric value {v!r}")


def _matrix(m, rows: int, cols: int) -> bool:
    return isinstance(m, list) and len(m) == rows and all(isinstance(r, list) and len(r) == cols for r in m)


def gap_rule(threshold: float = 0.8, first_layer: int = 1, stride: int = 1) -> ExitClassifier:
    """The paper's rule: exit when gap = p1 - p2 exceeds `threshold`."""
    return ExitClassifier("gap", ["gap"], [1.0], -float(threshold), first_layer, stride,
                          calibration={"rule": f"gap > {threshold}"})


def never_rule(first_layer: int = 1, stride: int = 1) -> ExitClassifier:
    """Checks at every scheduled layer and never fires: the cost of checking with nothing saved (and a test)."""
    return ExitClassifier("never", ["gap"], [0.0], -1.0, first_layer, stride)


# ---------------------------------------------------------------- features


def compute_features(names, top2, h_last: torch.Tensor | None, record: dict | None, prev: dict | None) -> dict:
    """name -> (b,) float32 tensor, for the features asked for only."""
    out = {}
    for name in names:
        if name == "gap":
            out[name] = top2.p1 - top2.p2
        elif name == "top_prob":
            out[name] = top2.p1
        else:
            key = name[len("cos_"):]
            now = h_last if key == "hidden" else (record or {}).get(key)
            before = (prev or {}).get(key)
            if now is None or before is None:
                out[name] = torch.zeros_like(top2.p1)
            else:
                out[name] = F.cosine_similarity(now.float(), before.float(), dim=-1)
    return out


def probe(model, h_last: torch.Tensor, weight: torch.Tensor | None, check_head: str = "full"
          ) -> tuple[Top2, torch.Tensor | None]:
    """The exit check on last-token states (b, dim) against head rows `weight` of `model` (an adainfer Decoder; None:
    the whole head, read in shards under tensor parallelism):
    Top2, and on the CPU path the float32 logits it computed (so that an exiting row need not run the head again).
    check_head "int8": the features come from the model's int8 head (a quarter of float32's bytes, 56% of a 16-bit
    head's with its scales) and no logits are returned, so a row that exits takes its answer from the head at full
    precision. On the CPU its products run in integers (activations rounded to int8 too), on a GPU in the Triton
    kernel (activations kept: its features are the dequantized head's)."""
    c = model.config
    if weight is None and model.shard is not None:  # tensor parallel: four numbers per row and rank, no logits
        return model.shard.top2(model.head(h_last, model.head_weight)), None
    scale = None
    if check_head == "int8":
        q8 = model.int8_head()
        if not h_last.is_cuda:
            return top2_from_logits(model.softcap(q8(model.head_input(h_last)))), None
        check_int8_head(model, "--check-head")
        weight, scale = q8.q, q8.scale
    weight = model.head_weight if weight is None else weight
    if h_last.is_cuda and c.final_softcap is None:  # fused kernel, logits never written
        if c.rotary and not c.norm_unit_offset and model.norm is not None:  # Llama's final RMSNorm folded in
            return lm_head_top2(h_last, weight, model.norm.weight, c.norm_eps, scale), None
        return lm_head_top2(model.head_input(h_last), weight, scale=scale), None
    logits = model.head(h_last, weight)  # (soft-capped logits change the probabilities: the kernel cannot fold it)
    return top2_from_logits(logits), logits


def check_cost_in_blocks(model, check_head: str = "full", candidates: int | None = None) -> float:
    """The weights one exit check reads (the LM head's rows: all of them, their int8 copy at 1.125 bytes a weight, or
    `candidates` rows) over one block's. In a decode step a block reads its weights for one token, so a check after
    block n can pay for itself only while the n_layers - n blocks it may save weigh more than it does."""
    w = model.head_weight
    rows = w.shape[0] if candidates is None else candidates
    # (the int8 head: a byte a weight and a float32 scale per group of columns, quant.quantize_int8's format)
    per_weight = 1 + 4 / INT4_GROUP if check_head == "int8" and candidates is None else w.element_size()
    block = sum(p.numel() * p.element_size() for p in model.layers[-1].parameters())
    return rows * w.shape[1] * per_weight / block


def check_int8_head(model, where: str) -> None:
    """Refuse the int8 check head where it cannot run: on a GPU it is read only by the Triton kernel, which does not
    soft-cap (a family with final_logit_softcapping would need the dequantized head in float32 at every check)."""
    if model.device.type == "cuda" and model.config.final_softcap is not None:
        raise AdainferError(where, "the int8 check head runs on a GPU in the Triton top-2 kernel, which does not "
                                   "soft-cap this model's logits (final_logit_softcapping): use the full head")


class ExitRule:
    """A classifier compiled for the loop: when to check, and the decision as tensors."""

    def __init__(self, clf: ExitClassifier, device="cpu", min_layers: int | None = None):
        self.clf = clf
        self.translator = None if clf.translator is None else clf.translator.to(device)
        self.features = list(clf.features)
        self.first, self.stride = clf.first_layer, clf.stride
        if min_layers is not None and min_layers > self.first:  # a floor: the first check moves up, on the stride
            self.first += -(-(min_layers - self.first) // self.stride) * self.stride
        self.w = torch.tensor(clf.weight, dtype=torch.float32, device=device)
        self.b = float(clf.bias)
        self.needs_record = any(f.startswith("cos_") for f in self.features)
        self.never = clf.kind == "never"
        self.check_graphs = CheckGraphs(self)  # its checks replayed (Plan.capture_checks)
        if clf.kind == "crf":
            self.crf_w = torch.tensor(clf.crf["state_weight"], dtype=torch.float32, device=device).T  # (F, 2)
            self.crf_b = torch.tensor(clf.crf["state_bias"], dtype=torch.float32, device=device)
            self.crf_t = torch.tensor(clf.crf["transitions"], dtype=torch.float32, device=device)  # [from, to]

    def should_check(self, n: int) -> bool:
        return n >= self.first and (n - self.first) % self.stride == 0

    def decide(self, top2, h_last, record, state: dict) -> tuple[dict, torch.Tensor, dict]:
        """Features and the exit decision for the rows of this check; `state` carries per-row memory."""
        feats = compute_features(self.features, top2, h_last, record, state)
        fire, state = self.fire(feats, state)
        return feats, fire, state

    def fire(self, feats: dict, state: dict) -> tuple[torch.Tensor, dict]:
        """The decision from features (name -> (b,) float32): one dot product, or one prefix-Viterbi step."""
        x = torch.stack([feats[f] for f in self.features], dim=-1)  # (b, F)
        if self.clf.kind == "crf":
            scores = x @ self.crf_w + self.crf_b  # (b, 2) per-label state scores
            delta = state.get("crf")
            # Prefix Viterbi: the best score of a path over the checks so far ending in each label.
            delta = scores if delta is None else (delta[:, :, None] + self.crf_t).amax(1) + scores
            return delta[:, 1] > delta[:, 0], {**state, "crf": delta}
        fire = x @ self.w + self.b > 0
        if self.never:
            fire = torch.zeros_like(fire)
        return fire, state

    def remember(self, h_last: torch.Tensor, record: dict | None, state: dict) -> dict:
        """After every block: keep what the cosine features compare with at the next check."""
        if not self.needs_record:
            return state
        return {**state, "hidden": h_last, **(record or {})}


def check_capture_checks(capture_checks: bool, device: torch.device | str) -> None:
    """Refuse Plan.capture_checks (--capture-checks) off a GPU: the checks replay as CUDA graphs."""
    if capture_checks:
        require_cuda("--capture-checks", "replays exit checks as CUDA graphs", device)


MAX_CHECK_GRAPHS = 256  # captured checks kept per rule (checked layers x row counts as rows leave x heads)


class CheckGraphs:
    """The exit check of a rule without memory (an SVM, gap or never rule on gap and top_prob) as one replayed step per
    checked layer and row count: the translator's reading, the top-2 probe (on a GPU the fused kernel), the features
    and the decision, captured as a CUDA graph. An eager check is ~20 small launches from Python on a host-bound
    loop; a replay is one, plus the copies in and out. Same kernels, same bits as the eager check. On the CPU (tests)
    the same static buffers run without a graph.

    With decisions read every few checks (Plan.sync_every > 1) the replay also notes them into the window's buffers
    (`window`: which rows fired, at which layer, what the check read there), so a check inside a window is one copy in
    and one replay: no outputs, no bookkeeping launches from Python. The first check of a window sets the buffers,
    the others add to them (either is the same when replayed twice, as a capture's warm-up does)."""

    def __init__(self, rule: ExitRule):
        self.rule = rule
        self.graphs: dict[tuple, Captured] = {}  # in order of last use
        self.windows: dict[tuple, Window] = {}  # (states' shape, dtype, device) -> the buffers graphs write

    @staticmethod
    def covers(rule: ExitRule, model, plan: Plan) -> bool:
        """Whether this run's checks can be replayed: no memory between checks (CRF, cosine features), nothing kept
        per check (record_features), no soft-capping (the GPU kernel's case), one process's whole head; the full or
        the int8 check head (on a GPU the kernel reads either)."""
        return (rule.clf.kind != "crf" and not rule.needs_record and not plan.record_features
                and model.config.final_softcap is None and model.shard is None)

    def window(self, x: torch.Tensor) -> Window:
        """The window buffers for checks of last-token states x (b, dim) (a translator's reading keeps their shape
        and dtype): made once per shape, then kept (the graphs that note into them hold their addresses)."""
        key = (tuple(x.shape), x.dtype, x.device)
        if key not in self.windows:
            b = x.shape[0]
            self.windows[key] = Window(torch.zeros(b, dtype=torch.bool, device=x.device),
                                       torch.zeros(b, dtype=torch.int64, device=x.device), torch.zeros_like(x), False)
        return self.windows[key]

    def __call__(self, model, n: int, x: torch.Tensor, reader, weight: torch.Tensor | None, check_head: str = "full",
                 window: Window | None = None, opens: bool = False) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Last-token states x (b, dim) after n blocks -> (what the check read (b, dim), fire (b,) bool); with
        `window`, nothing: the decisions noted into its buffers instead (`opens`: the window's first check)."""
        # (the int8 head built first, so that its object is in the key: rebuilt for new weights, it is other memory)
        q8 = model.int8_head() if check_head == "int8" else None
        role = None if window is None else ("opens" if opens else "notes", id(window))
        key = (id(model), n, tuple(x.shape), id(reader), None if weight is None else id(weight), role, check_head,
               id(q8))
        graph = self.graphs.pop(key, None)
        if graph is None:
            while len(self.graphs) >= MAX_CHECK_GRAPHS:  # least recently used first
                self.graphs.pop(next(iter(self.graphs)))
            rule = self.rule

            def check(x):
                read = x if reader is None else reader.read(n, x)
                top2, _ = probe(model, read, weight, check_head)
                fire, _ = rule.fire(compute_features(rule.features, top2, None, None, None), {})
                if window is None:
                    return read, fire
                if opens:
                    window.fired.copy_(fire)
                    window.at.fill_(n)
                    window.value.copy_(read)
                else:  # rows that fire first here take this layer and reading
                    new = fire & ~window.fired
                    window.at.copy_(torch.where(new, n, window.at))
                    window.value.copy_(torch.where(new[:, None], read, window.value))
                    window.fired.logical_or_(fire)
                return None

            graph = Captured(check, [x], graph=x.is_cuda)
        self.graphs[key] = graph  # (re)inserted last
        return graph(x)


# ---------------------------------------------------------------- what a run asks of the loop, and its answers


@dataclass
class Plan:
    """Which blocks run, which sublayers are skipped, and where the loop may stop.

    layers: block indices in the order they run (None = all). skip_attn: blocks whose attention is skipped.
    exit: an exit rule (adainfer.exit) or None. exit_at: force every row to stop after this many blocks.
    candidates: token ids the answer and the exit features are restricted to. record_features: keep every
    checked layer's features (for calibration and analysis). hidden_states: keep every block's output.
    """

    layers: list[int] | None = None
    skip_attn: frozenset[int] = frozenset()
    exit: object | None = None
    exit_at: int | None = None
    candidates: torch.Tensor | None = None
    record_features: bool = False
    record_logits: bool = False  # with record_features: also keep each check's float32 logits
    hidden_states: bool = False
    sync_every: int = 1  # read exit decisions every N checks (one host sync for N layers; for GPUs)
    capture_checks: bool = False  # replay each check as a CUDA graph where CheckGraphs covers the rule (GPUs; not
    #                               yet the default: measured beside the eager check by benchmarks/gpu_check.py)
    fill_skipped_kv: bool = False  # rows that exit get K/V for the blocks they skip, from their exit state (CALM)
    check_head: str = "full"  # "int8": exit features from an int8 copy of the head; answers at full precision
    translator: object | None = None  # adainfer.translator.Translator: checks, and rows that stop before the last
    #                                   block (exits, exit_at), read the layer through its map
    answer: bool = True  # False (with hidden_states, no exit rule): no final head, Output.logits / token None (a
    #                      caller that reads the head over every position itself: the speculative verify pass)

    def __post_init__(self):
        if self.translator is None and self.exit is not None:
            self.translator = getattr(self.exit, "translator", None)


@dataclass
class Output:
    logits: torch.Tensor | None  # (B, V) or (B, n_candidates), float32: the last token at each row's exit layer
    layers_run: torch.Tensor  # (B,) int64: blocks each row ran
    token: torch.Tensor  # (B,) int64: argmax of logits, mapped back to vocabulary ids in candidate mode
    features: list = field(default_factory=list)  # with record_features: one dict per checked layer
    hidden_states: list | None = None  # with hidden_states: embeddings, then each block's output (B, T, dim)


@dataclass
class Window:
    """Decisions kept on the device until they are read together (Plan.sync_every > 1)."""

    fired: torch.Tensor  # (b,) bool: the rows whose rule fired inside the window
    at: torch.Tensor  # (b,) int64: the layer where each fired first
    value: torch.Tensor  # (b, V) logits at that layer, or (b, dim) last-token states when the head has not run
    is_logits: bool
    checks: int = 1


class Exits:
    """The answers of one forward, row by row: logits at each row's exit layer and the blocks it ran.

    A row whose rule fires leaves the batch (the others are compacted). With `window` > 1 the decisions stay on the
    device and are read once every `window` checks, one host synchronisation for several layers: a row that fired
    inside a window runs on to its end, but answers with the logits of the layer where it fired."""

    def __init__(self, head, B: int, n_run: int, window: int = 1):
        self.head = head  # (b, dim) last-token states -> (b, V) float32 logits
        self.logits: list = [None] * B
        self.layers = torch.full((B,), n_run, dtype=torch.int64)
        self.live = torch.arange(B)  # input rows the (compacted) batch still holds
        self.window = max(1, window)
        self.open: Window | None = None

    def check(self, fire: torch.Tensor, n: int, logits: torch.Tensor | None, h_last: torch.Tensor):
        """Note one check's decisions; return the keep-mask once rows have left the batch, else None."""
        value, is_logits = (logits, True) if logits is not None else (h_last, False)  # GPU: the head later
        if self.window == 1:
            return self._leave(fire, None, value, is_logits, n)
        w = self._note(fire, n, value, is_logits)
        return self._close(w, n) if w.checks >= self.window else None

    def noted(self, window: Window, n: int):
        """A check whose replay noted its decisions into `window`'s buffers (CheckGraphs); as check."""
        self.open = Window(window.fired, window.at, window.value, False, 1 if self.open is None else
                           self.open.checks + 1)
        return self._close(self.open, n) if self.open.checks >= self.window else None

    def _close(self, w: Window, n: int):
        self.open = None
        return self._leave(w.fired, w.at, w.value, w.is_logits, n)

    def _leave(self, fire: torch.Tensor, at: torch.Tensor | None, value: torch.Tensor, is_logits: bool, n: int):
        """The rows that fired leave with their answers (the head run now where value holds states)."""
        if not bool(fire.any()):  # the one host synchronisation of a check (or of a window)
            return None
        out = value[fire] if is_logits else self.head(value[fire])
        layers = [n] * int(fire.sum()) if at is None else at[fire].tolist()
        fired = fire.cpu()
        for j, r in enumerate(self.live[fired].tolist()):
            self.logits[r], self.layers[r] = out[j], layers[j]
        self.live = self.live[~fired]
        return ~fire

    def _note(self, fire, n, value, is_logits) -> Window:
        w = self.open
        if w is None:
            self.open = Window(fire, torch.full(fire.shape, n, dtype=torch.int64, device=fire.device), value, is_logits)
        else:
            new = fire & ~w.fired
            self.open = Window(w.fired | fire, torch.where(new, n, w.at), torch.where(new[:, None], value, w.value),
                               is_logits, w.checks + 1)
        return self.open

    def finish(self, h_last: torch.Tensor) -> None:
        """After the last block: rows that fired in an open window keep that answer, the rest take this one."""
        final = self.head(h_last)
        w = self.open
        if w is not None:
            final = torch.where(w.fired[:, None], w.value if w.is_logits else self.head(w.value), final)
        for j, r in enumerate(self.live.tolist()):
            self.logits[r] = final[j]
            if w is not None and bool(w.fired[j]):
                self.layers[r] = int(w.at[j])

    def answers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, V) float32 logits at each row's exit layer, (B,) blocks each ran."""
        return torch.stack(self.logits), self.layers


CLASSIFIER_DIR = Path(__file__).parent / "classifiers"


def shipped_classifier(fingerprint: str | None, candidates: list[str] | None = None,
                       translator: bool | None = None) -> Path | None:
    """The classifier shipped with the package for the model of this fingerprint whose features are over
    `candidates` (None: the full vocabulary), if there is one. translator: True / False: only one that reads the
    layers through a translator / the plain reading; None: either, the translated one first."""
    found = []
    for path in sorted(CLASSIFIER_DIR.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
            continue
        has = data.get("translator") is not None
        if (fingerprint and data["model"].get("fingerprint") == fingerprint
                and (data.get("calibration") or {}).get("default") and (data.get("candidates") or None) == (
                    candidates or None) and translator in (None, has)):
            found.append((not has, path))
    return min(found)[1] if found else None
