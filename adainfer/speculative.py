"""Self-speculative decoding: the model's own blocks draft, the whole model verifies (issue 18).

A draft is a cheaper run of the same model: a subset of its blocks (`Draft.layers`), or its first k blocks read
through a translator where one maps block k. Each round, every row drafts g tokens one at a time, then the whole
model runs once over the row's last token and its g drafts (a short prefill) and keeps the longest prefix of drafts
it agrees with plus its own next token: 1 to g + 1 tokens a round, and with greedy decoding exactly the dense
model's tokens. With sampling, drafts are drawn from the draft's distribution and kept or replaced by the
speculative rejection rule (`accept`), so that every token has the dense model's distribution.

The draft shares the verifier's KV cache: its blocks write their keys and values at the drafted positions, which the
verify pass then overwrites for every block. When every row keeps as many drafts (always at batch 1) the next round
writes over the rejected slots, so the cache holds the dense run's keys and values at the dense run's slots (on
int4 weights, whose kernels round activations, that is what keeps the tokens the dense ones bit for bit). Rows that
keep different counts leave a rejected position as a hole (`KVCache.valid` false), which attention skips and the
positions of later tokens do not count (adainfer.model.default_positions), so a row's cache holds exactly what a
dense run's holds, at other slots. Rows are independent: a batch gives each row's tokens alone.

The draft and verify steps run through the decode graphs of --decode compiled / int4 (`Steps`, over
fast_decode.DecodeGraph: one graph for the draft's blocks and head, one per verify length) or the eager block loop.
A draft's head is its vocabulary's rows (`Draft.vocab`), float or int8 (`Draft.head`).

A draft file (`save_draft` / `load_draft`, written by `python -m adainfer.calibrate --draft`) holds a draft measured
on this machine (`measure_draft`: acceptance, step costs, predicted speed, per decode mode), bound to the model's
fingerprint; adainfer.draft_search chooses its blocks.

Sliding-window models are refused (their window counts cache slots, which holes would shift).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adainfer.errors import AdainferError
from adainfer.exit import Plan
from adainfer.fast_decode import DecodeGraph, read_head
from adainfer.generate import Generation, Sampling, check_prompts, draw, left_pad
from adainfer.kv_cache import KVCache
from adainfer.model import Decoder
from adainfer.quant import QuantWeight
from adainfer.timing import device_sync


@dataclass
class Draft:
    """What drafts: `layers` (block indices in order; None: all) with `length` tokens a round; `translator` reads
    the last block's state when the layers are the first k blocks and it maps block k."""

    layers: list[int] | None
    length: int = 3
    translator: object | None = None
    # The draft's head: these token ids' rows only (None: all). A frequent-token subset (frequent_tokens) reads a
    # fraction of the LM head's bytes; the verifier still scores the whole vocabulary, so the output is unchanged.
    vocab: torch.Tensor | None = None
    # Adaptive length: a row stops drafting in a round at the first position where the draft's most likely token
    # has less than this probability (SWIFT's and Kangaroo's rule: an unsure draft is likely refused, and costs a
    # draft step); the round ends when every row has stopped or drafted `length`. 0: always `length`.
    min_prob: float = 0.0
    # "int8": the draft's head rows rounded to 8 bits (quant.quantize_int8, run by the int8 kernel) for a quarter of
    # the float head's bytes. A model rounded for --decode int4 drafts with its int8 head either way.
    head: str = "full"

    def blocks(self, model: Decoder) -> list[int]:
        return list(range(model.config.n_layers)) if self.layers is None else list(self.layers)

    def reader(self, model: Decoder):
        """The translator, when the blocks are the model's first k (and k is not all of them)."""
        layers = self.blocks(model)
        return self.translator if layers == list(range(len(layers))) else None

    def head_rows(self, model: Decoder, quantized: bool = False):
        """What the draft's logits are read through (fast_decode.read_head's `head`): None (the whole float head),
        the rows of its vocabulary, or a QuantWeight of the int8 head or of its rows."""
        vocab = None if self.vocab is None else self.vocab.to(model.device)
        if self.head != "int8" and not quantized:
            return model.head_rows(vocab)
        q8 = model.int8_head()
        if vocab is None:
            return q8
        memo = getattr(model, "_int8_rows", None)  # kept for the next call (graphs are keyed by the head object)
        if memo is None or memo[1] is not q8 or not torch.equal(memo[0], vocab):
            memo = model._int8_rows = (vocab.clone(), q8, QuantWeight(q8.q[vocab], q8.scale[vocab]))
        return memo[2]


DRAFT_FORMAT = "adainfer-draft"
DRAFT_DIR = Path(__file__).parent / "drafts"
DRAFT_HEADS = ("full", "int8")


def save_draft(draft: Draft, path: Path, model: dict, reports: dict[str, dict], search: dict | None = None) -> None:
    """A draft file: JSON with the blocks, length, adaptive threshold, head and head rows, bound to `model`
    (fingerprint, name, layers) like an exit classifier, what it was measured to buy under each decode mode it
    was measured in (`reports`, eager / compiled / int4: acceptance, costs, predicted speed, verdict), and the
    block search that chose it, if one did (adainfer.draft_search)."""
    body = {"format": DRAFT_FORMAT, "version": 2, "model": model, "layers": draft.layers, "length": draft.length,
            "min_prob": draft.min_prob, "head": draft.head,
            "vocab": None if draft.vocab is None else draft.vocab.tolist(), "reports": reports, "search": search}
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(body, indent=1) + "\n")
    tmp.replace(path)


def load_draft(path: Path, model: Decoder) -> tuple[Draft, dict[str, dict]]:
    """(Draft, its reports by decode mode) from a draft file, refused for another model or when malformed. A
    version-1 file's single report was measured eagerly."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError:
        raise AdainferError(path, "draft file not found or unreadable") from None
    except ValueError as e:
        raise AdainferError(path, f"malformed draft JSON: {e}") from None
    if not isinstance(data, dict) or data.get("format") != DRAFT_FORMAT:
        raise AdainferError(path, f"not a draft file (format {DRAFT_FORMAT!r})")
    fp = (data.get("model") or {}).get("fingerprint")
    if fp != model.fingerprint:
        raise AdainferError(path, f"this draft was calibrated for another model (fingerprint {fp}, this model "
                                  f"{model.fingerprint})")
    L, V = model.config.n_layers, model.config.vocab_size
    layers, vocab = data.get("layers"), data.get("vocab")
    reports = data["reports"] if "reports" in data else {"eager": data.get("report") or {}}
    ok = (isinstance(layers, list) and layers and all(isinstance(i, int) and 0 <= i < L for i in layers) and
          layers == sorted(set(layers)))
    ok = ok and isinstance(data.get("length"), int) and data["length"] >= 1
    ok = ok and isinstance(data.get("min_prob"), (int, float)) and 0 <= data["min_prob"] < 1
    ok = ok and data.get("head", "full") in DRAFT_HEADS and isinstance(reports, dict)
    ok = ok and (vocab is None or isinstance(vocab, list) and vocab and
                 all(type(t) is int and 0 <= t < V for t in vocab) and vocab == sorted(set(vocab)))
    if not ok:
        raise AdainferError(path, "draft file has bad layers, length, min_prob, head, vocab or reports for this model")
    draft = Draft(layers, data["length"], min_prob=float(data["min_prob"]), head=data.get("head", "full"),
                  vocab=None if vocab is None else torch.tensor(vocab, dtype=torch.long))
    return draft, reports


def shipped_draft(fingerprint: str | None) -> Path | None:
    """The draft file shipped with the package for the model of this fingerprint, if there is one."""
    for path in sorted(DRAFT_DIR.glob("*.json")):
        try:
            if json.loads(path.read_text()).get("model", {}).get("fingerprint") == fingerprint:
                return path
        except (OSError, ValueError, AttributeError):
            continue
    return None


class Steps:
    """The three forwards of speculative decoding over `cache`, each writing its K/V at cache.length (the caller
    moves it): a dense decode step, a draft step, a verify step. Through `graph` (fast_decode.decode_graph) when
    given, else the eager block loop."""

    def __init__(self, model: Decoder, draft: Draft, cache: KVCache, graph: DecodeGraph | None = None):
        self.model, self.cache, self.graph = model, cache, graph
        self.layers, self.reader = draft.blocks(model), draft.reader(model)
        self.head = draft.head_rows(model, graph is not None and graph.quantized)

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        """tokens x (B,) -> logits (B, V) of the whole model."""
        if self.graph is not None:
            return self.graph(x[:, None], self.cache)
        return self.model(x[:, None], cache=self.cache).logits

    def draft(self, x: torch.Tensor) -> torch.Tensor:
        """tokens x (B,) -> the draft's logits (B, K) over its head rows; only its blocks write K/V."""
        model, cache = self.model, self.cache
        if self.graph is not None:
            return self.graph(x[:, None], cache, layers=self.layers, reader=self.reader, head=self.head)
        o = model(x[:, None], cache=cache, plan=Plan(layers=self.layers, hidden_states=True, answer=False))
        return read_head(model, o.hidden_states[-1][:, -1], len(self.layers), self.reader, self.head)

    def verify(self, seq: torch.Tensor) -> torch.Tensor:
        """tokens seq (B, k + 1) -> the whole model's logits (B, k + 1, V) at each of them."""
        model, (B, T) = self.model, seq.shape
        if self.graph is not None:
            logits = self.graph(seq, self.cache)
            return logits[:, None] if T == 1 else logits
        out = model(seq, cache=self.cache, plan=Plan(hidden_states=True, answer=False))  # the head once, below
        return model.head(out.hidden_states[-1].reshape(B * T, -1)).view(B, T, -1)


def step_costs(model: Decoder, ids: list[int], draft: Draft, repeats: int = 10,
               graph: DecodeGraph | None = None) -> dict:
    """Median milliseconds, after the prompt `ids` at batch 1, of the steps speculative decoding runs (Steps,
    through `graph` when given): a dense decode step, a draft step, a verify step of length + 1 tokens."""
    g = draft.length
    size = len(ids) + g + 2
    cache = KVCache(model.local, 1, size, model.dtype, model.device) if graph is None else graph.cache(1, size)
    model(torch.tensor([ids], device=model.device), cache=cache)
    cache.length = len(ids)
    steps = Steps(model, draft, cache, graph)
    one = torch.tensor([ids[-1]], device=model.device)
    seq = torch.tensor([ids[-1:] * (g + 1)], device=model.device)
    runs = {"dense_step_ms": lambda: steps.dense(one), "draft_step_ms": lambda: steps.draft(one),
            "verify_ms": lambda: steps.verify(seq)}
    times = {name: [] for name in runs}
    sync = device_sync(model.device)  # a GPU's queued work counts
    for _ in range(repeats + 1):  # in turn, so that a slow spell of the machine slows all three alike
        for name, run in runs.items():
            sync()
            t0 = time.perf_counter()
            run()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(t[1:]) for name, t in times.items()}  # the first run allocates (compiles)


def tokens_per_round(alpha: float, g: int) -> float:
    """Expected tokens a verify round yields when each of g drafts is kept with probability alpha while the ones
    before it were (the usual i.i.d. assumption): (1 - alpha^(g + 1)) / (1 - alpha)."""
    return g + 1.0 if alpha >= 1 else (1 - alpha ** (g + 1)) / (1 - alpha)


def predicted_speed(per_round: float, g: int, costs: dict) -> float:
    """Speed against dense of rounds yielding `per_round` tokens for g draft steps and one verify step, under
    step_costs' costs: per_round x dense step / (g x draft step + verify step)."""
    return per_round * costs["dense_step_ms"] / (g * costs["draft_step_ms"] + costs["verify_ms"])


# A draft is used when its predicted speed reaches this: the same blocks of the default model measured 0.98x, 1.09x
# and 1.03x eagerly in three calibrations on one machine on one day (benchmarks/RESULTS.md), so a prediction within
# 5% of dense says nothing about which is faster.
PAYS_AT = 1.05


def measure_draft(model: Decoder, ids: list[list[int]], draft: Draft, new_tokens: int = 32, repeats: int = 10,
                  eos_id: int | None = None, graph: DecodeGraph | None = None) -> dict:
    """What a draft buys on this machine: greedy continuations of `ids` (one at a time), drafts accepted per round,
    tokens per verify (every generated token, the prefill's first one included, over the verify rounds), the step
    costs (step_costs on the median prompt) and the speed they predict against dense, tokens per verify x dense
    step / (length x draft step + verify) (a draft with min_prob may draft fewer than `length`: then a bound). Through
    `graph` (--decode compiled / int4) when given: its steps are what is timed."""
    out = [speculative_generate(model, [p], new_tokens, draft, eos_id, graph=graph)[0] for p in ids]
    rounds = [n for r in out for n in r.accepted]
    per_verify = sum(len(r.token_ids) for r in out) / max(1, len(rounds))
    costs = step_costs(model, sorted(ids, key=len)[len(ids) // 2], draft, repeats, graph)
    predicted = predicted_speed(per_verify, draft.length, costs)
    return {"prompts": len(ids), "new_tokens": new_tokens, "accepted_per_round": sum(rounds) / max(1, len(rounds)),
            "tokens_per_verify": per_verify, **{k: round(v, 3) for k, v in costs.items()},
            "predicted_speed_vs_dense": round(predicted, 4), "pays": predicted >= PAYS_AT}


def frequent_tokens(tok, texts: list[str], k: int) -> torch.Tensor:
    """The `k` token ids most frequent in `texts` (ties: the lower id), sorted: a draft head's rows (FR-Spec's
    frequency-ranked subset), to be counted on text like what the model will write."""
    counts: dict[int, int] = {}
    for text in texts:
        for t in tok.encode(text):
            counts[t] = counts.get(t, 0) + 1
    top = sorted(counts, key=lambda t: (-counts[t], t))[:k]
    return torch.tensor(sorted(top), dtype=torch.long)


@dataclass
class Speculation(Generation):
    accepted: list[int] = field(default_factory=list)  # drafts accepted in each verify round


def default_layers(n_layers: int) -> str:
    """The draft's blocks when none are given: the first two thirds."""
    return f"0-{max(0, -(-2 * n_layers // 3) - 1)}"


def check_draft(length: int, min_prob: float, head: str = "full") -> None:
    """Refuse a draft length below 1, an adaptive threshold outside [0, 1) or an unknown head, named as their
    options."""
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise AdainferError("--draft-length", f"must be at least 1, got {length!r}")
    if not 0 <= min_prob < 1:
        raise AdainferError("--draft-min-prob", f"must be in [0, 1), got {min_prob}")
    if head not in DRAFT_HEADS:
        raise AdainferError("--draft-head", f"unknown head {head!r} (choose {', '.join(DRAFT_HEADS)})")


def parse_layers(spec: str, n_layers: int) -> list[int]:
    """"0-19" or "0,1,8-29" -> block indices, checked against the model (--draft-layers)."""
    layers: list[int] = []
    try:
        for part in spec.split(","):
            lo, _, hi = part.strip().partition("-")
            layers += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    except ValueError:
        raise AdainferError("--draft-layers", f"expected block indices like 0-19 or 0,1,8-29, got {spec!r}") from None
    if not layers or any(not 0 <= i < n_layers for i in layers) or layers != sorted(set(layers)):
        raise AdainferError("--draft-layers", f"{spec!r}: need increasing block indices in 0..{n_layers - 1}")
    return layers


def speculative_generate(model: Decoder, ids: list[list[int]], max_new_tokens: int, draft: Draft,
                         eos_id: int | None = None, sampling: Sampling | None = None,
                         row_seeds: list[int] | None = None, graph: DecodeGraph | None = None) -> list[Speculation]:
    """Generation for one batch of prompts, drafted by `draft` and verified by the whole model. Greedy (no
    `sampling`, or temperature 0): the same tokens as adainfer.generate.generate(..., mode="none") with the same
    `graph`. Sampling: the same distribution as dense sampling with `sampling` (row b seeded with row_seeds[b],
    default b), by the speculative rejection rule. `graph` (fast_decode.decode_graph: --decode compiled / int4) runs
    the draft steps and the verify steps, one graph each (and one per shorter verify an adaptive draft makes)."""
    return speculate(model, ids, max_new_tokens, draft, eos_id, sampling, row_seeds, graph)[0]


@torch.inference_mode()
def speculate(model: Decoder, ids: list[list[int]], max_new_tokens: int, draft: Draft, eos_id: int | None = None,
              sampling: Sampling | None = None, row_seeds: list[int] | None = None, graph: DecodeGraph | None = None
              ) -> tuple[list[Speculation], KVCache]:
    """speculative_generate, and the KV cache it leaves (holes and all: what the tests compare with a dense run's)."""
    if max_new_tokens < 1:
        raise AdainferError("--max-new-tokens", f"must be at least 1, got {max_new_tokens}")
    check_draft(draft.length, draft.min_prob, draft.head)
    if model.config.sliding_window is not None:
        raise AdainferError("--speculate", "sliding-window models are not supported yet (rejected drafts leave holes "
                                           "in the cache, and the window counts cache slots)")
    check_prompts(ids, model, max_new_tokens)
    g = draft.length
    pad = model.config.pad_id if model.config.pad_id is not None else 0
    tokens, pad_mask = left_pad(ids, pad, model.device)
    B, T = tokens.shape
    sample = sampling is not None and sampling.temperature > 0
    gens = [torch.Generator().manual_seed(s) for s in (row_seeds or range(B))] if sample else None
    # Each round writes g + 1 slots and emits at least one token: room for the worst case.
    size = T + max_new_tokens * (g + 1)
    cache = KVCache(model.local, B, size, model.dtype, model.device) if graph is None else graph.cache(B, size)
    out = model(tokens, pad_mask=pad_mask, cache=cache)
    cache.length = T
    results = [Speculation() for _ in range(B)]
    token = sampling.pick(out.logits, gens) if sample else out.token  # (B,) the newest token, not yet in the cache
    done = torch.zeros(B, dtype=torch.bool)
    L = model.config.n_layers
    steps = Steps(model, draft, cache, graph)
    vocab = None if draft.vocab is None else draft.vocab.to(model.device)

    def emit(b: int, t: int, layers: int) -> None:
        if done[b]:
            return
        results[b].token_ids.append(t)
        results[b].layers_run.append(layers)
        if (eos_id is not None and t == eos_id) or len(results[b].token_ids) == max_new_tokens:
            done[b] = True

    for b in range(B):
        emit(b, int(token[b]), L)
    rows = torch.arange(B, device=model.device)
    while not bool(done.all()):
        start = cache.length
        drafted, q, x = [], [], token
        offered = torch.zeros(B, dtype=torch.long)  # drafts each row puts to the verifier this round
        going = ~done  # rows still generating this round
        drafting = going.clone()
        while len(drafted) < g and bool(drafting.any()):  # one token at a time, its blocks' K/V at the drafted slots
            logits = steps.draft(x)
            cache.length += 1
            if sample:  # (B, V) what the draft draws from (zero off its head's rows)
                q.append(sampling.probs(logits) if draft.vocab is None else
                         torch.zeros(B, model.config.vocab_size).index_copy_(1, draft.vocab.cpu(),
                                                                             sampling.probs(logits)))
                # Only rows still drafting draw (a row's generator must not depend on how long the others draft).
                x = q[-1].argmax(-1)
                live = drafting.nonzero()[:, 0].tolist()
                if live:
                    x[live] = draw(q[-1][live], [gens[b] for b in live])
                x = x.to(model.device)
            else:
                x = logits.argmax(-1) if vocab is None else vocab[logits.argmax(-1)]
            if draft.min_prob > 0:
                sure = (q[-1] if sample else logits.softmax(-1)).amax(-1).cpu() >= draft.min_prob
                drafting &= sure
            offered += drafting.long()
            drafted.append(x)
        k = len(drafted)
        cache.length = start
        cache.valid[:, start:start + k + 1] = False  # the verify pass marks its own slots
        seq = torch.stack([token, *drafted], dim=1)  # (B, k + 1)
        logits = steps.verify(seq)  # (B, k + 1, V)
        cache.length = start + k + 1
        if sample:
            agree, nxt = accept(sampling.probs(logits), torch.stack(q, 1), seq[:, 1:].cpu(), gens, offered)
        else:
            picks = logits.argmax(-1)
            agree = (picks[:, :k] == seq[:, 1:]).long().cumprod(1).sum(1).cpu()  # (B,) leading drafts it agrees with
            agree = torch.minimum(agree, offered)
            nxt = picks[rows, agree.to(model.device)]
        for b in range(B):
            n = int(agree[b])
            if not done[b]:
                results[b].accepted.append(n)
            for j in range(n):
                emit(b, int(seq[b, j + 1]), L)  # greedy: every emitted token is the whole model's
            emit(b, int(nxt[b]), L)
        kept = agree[going].unique()
        if len(kept) == 1:  # every live row kept as many (always at batch 1): rewind, the next round writes over
            cache.length = start + int(kept[0]) + 1  # the rejected slots: the dense run's layout, slot for slot
            cache.valid[:, cache.length:start + k + 1] = False
        else:  # rejected drafts stay as holes: slots start + n + 1 .. start + k hold nothing a later token may see
            slots = start + torch.arange(k + 1, device=model.device)
            hole = slots[None, :] > (start + agree.to(model.device))[:, None]  # (B, k + 1)
            cache.valid[rows[:, None], slots[None, :].expand(B, -1)] &= ~hole
            cache.padded = cache.padded or bool(hole.any())
        token = nxt.to(model.device)
    return results, cache


def accept(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, gens: list[torch.Generator],
           offered: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The speculative rejection rule (Leviathan et al. 2023; Chen et al. 2023), row by row with each row's
    generator: draft j, drawn from q[:, j], is kept with probability min(1, p[:, j] / q[:, j]) of its token while
    every draft before it was; the first one refused is replaced by a draw from the residual max(0, p - q)
    (renormalised), and when all offered drafts are kept, one more token is drawn from p after them. So each emitted
    token has the whole model's distribution p. p (B, g + 1, V) the model's distributions at the g + 1 verified
    positions, q (B, g, V) the draft's, drafts (B, g), offered (B,) how many of its drafts each row puts forward
    (default g; the rest are not tested: the next token is drawn from p where the row stopped) -> (kept drafts (B,),
    the next token (B,))."""
    B, g = drafts.shape
    kept, nxt = torch.zeros(B, dtype=torch.long), torch.zeros(B, dtype=torch.long)
    for b in range(B):
        n, limit, refused = 0, g if offered is None else int(offered[b]), False
        while n < limit and not refused:
            t = int(drafts[b, n])
            u = torch.rand(1, generator=gens[b])[0]  # one draw per draft tested: the row's own count
            refused = not u * q[b, n, t] < p[b, n, t]  # u < p / q, written without dividing
            n += 0 if refused else 1
        if refused:
            residual = (p[b, n] - q[b, n]).clamp(min=0)
            # p == q on every token leaves no residual, but then no draft is refused (u < 1)
            dist = residual if float(residual.sum()) > 0 else p[b, n]
        else:  # every offered draft kept: the token after them, from the model
            dist = p[b, n]
        kept[b] = n
        nxt[b] = int(torch.multinomial(dist, 1, generator=gens[b]))
    return kept, nxt
