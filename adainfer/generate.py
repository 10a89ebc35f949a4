"""Batching and greedy generation on top of Decoder.forward: left-pad, prefill, decode one token at a time."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from adainfer.errors import AdainferError
from adainfer.exit import Output, Plan
from adainfer.kv_cache import KVCache
from adainfer.model import Decoder


@dataclass
class Generation:
    token_ids: list[int] = field(default_factory=list)  # generated ids (up to and including EOS)
    layers_run: list[int] = field(default_factory=list)  # blocks run for each generated token
    logits: torch.Tensor | None = None  # the first generated token's logits (float32), when asked for


def check_prompts(ids: list[list[int]], model: Decoder, max_new_tokens: int, where: str | list[str] = "prompt"
                  ) -> None:
    """Refuse empty prompts and prompts that do not fit the model's context with the tokens to generate. `where`:
    each prompt's name for the message (a list), or a word numbered per prompt."""
    limit = model.config.max_seq_len
    for i, p in enumerate(ids):
        name = where[i] if isinstance(where, list) else f"{where} {i + 1}"
        if not p:
            raise AdainferError(name, "empty prompt (it encodes to no tokens)")
        if len(p) + max_new_tokens - 1 > limit:
            raise AdainferError(name, f"{len(p)} tokens + {max_new_tokens} new exceed the model's context of {limit} "
                                      "tokens")


def left_pad(ids: list[list[int]], pad_id: int, device="cpu", multiple: int = 1
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(tokens (B, T), pad_mask (B, T) or None when no row is padded); T the longest prompt rounded up to `multiple`
    (prefill_pad)."""
    T = -(-max(len(p) for p in ids) // multiple) * multiple
    tokens = torch.full((len(ids), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), T), dtype=torch.bool)
    for b, p in enumerate(ids):
        tokens[b, T - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[b, T - len(p):] = True
    return tokens.to(device), (None if bool(mask.all()) else mask.to(device))


def prefill_pad(model) -> int:
    """The multiple a prompt batch's length is padded to for `model`: its captured prefill's
    (PrefillGraphs.pad_multiple: fewer shapes to capture), else 1."""
    return getattr(model.prefill_block, "pad_multiple", 1)


def length_batches(ids: list[list[int]], batch_size: int) -> list[list[int]]:
    """Prompt indices sorted by length and cut into batches of `batch_size` (similar lengths together: little
    padding)."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


MODES = ("none", "sequence", "token")


@dataclass
class Sampling:
    """Temperature / top-k / top-p sampling, seeded per row (so a row draws the same tokens in any batch)."""

    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not (self.temperature >= 0 and self.top_k >= 0 and 0 < self.top_p <= 1):
            raise AdainferError("--temperature/--top-k/--top-p", "need temperature >= 0, top-k >= 0, 0 < top-p <= 1")

    def pick(self, logits: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """(b, V) float32 logits -> (b,) indices into V."""
        if self.temperature == 0:
            return logits.argmax(-1)
        return draw(self.probs(logits), generators).to(logits.device)

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., V) logits -> the distribution a token is drawn from (temperature > 0), float32 on the CPU."""
        logits = logits.float() / self.temperature
        if self.top_k:
            kth = logits.topk(min(self.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            drop = cum - sorted_logits.softmax(-1) >= self.top_p  # keep the smallest set reaching top_p
            logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
        return logits.softmax(-1).cpu()


def draw(probs: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """One index per row of (b, V) CPU probabilities, row b from generators[b] (so a row's draws do not depend on its
    batch)."""
    return torch.cat([torch.multinomial(probs[b], 1, generator=g) for b, g in enumerate(generators)])


def generate(model: Decoder, ids: list[list[int]], max_new_tokens: int = 1, plan: Plan | None = None,
             eos_id: int | None = None, mode: str = "sequence", sampling: Sampling | None = None,
             keep_logits: bool = False, row_seeds: list[int] | None = None, graph=None) -> list[Generation]:
    """Generation for one batch of prompts (lists of token ids); greedy unless `sampling` says otherwise.

    The plan (exit rule, layer plan, candidates) decides the first token. Later tokens, by `mode`:
      none      no early exit at all (the plan's exit rule is ignored)
      sequence  each row runs, for every token, the blocks it ran at prefill: the KV cache only ever holds
                computed layers (the depth is chosen once, from the prompt's last token)
      token     each token may exit at its own layer; the blocks it skips still get K/V at its position,
                projected from its exit hidden state (CALM's state propagation). With plan.sync_every N > 1 the
                decisions are read every N checks: a row that fired answers from its layer, the blocks it ran past
                it until the read keep their own K/V, and the rest are projected from its state at the read
    With exit, sampling draws from the exit layer's logits. `graph` (adainfer.fast_decode.decode_graph) runs the decode
    steps in which every row runs the same first blocks (as far as graph.serves); the others take the block loop."""
    if mode not in MODES:
        raise AdainferError("--exit-mode", f"unknown mode {mode!r} (choose {', '.join(MODES)})")
    if max_new_tokens < 1:
        raise AdainferError("--max-new-tokens", f"must be at least 1, got {max_new_tokens}")
    check_prompts(ids, model, max_new_tokens)
    plan = plan or Plan()
    if mode == "none":
        plan = replace(plan, exit=None)
    elif mode == "token":
        plan = replace(plan, fill_skipped_kv=True)
    sampling = sampling or Sampling()
    seeds = row_seeds if row_seeds is not None else [sampling.seed + b for b in range(len(ids))]
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    pad = model.config.pad_id if model.config.pad_id is not None else 0
    tokens, pad_mask = left_pad(ids, pad, model.device, prefill_pad(model))
    B, T = tokens.shape
    cache = None
    if max_new_tokens > 1:  # a decode graph hands out its own (on a GPU its captured graphs hold the addresses),
        # else a captured prefill does (its graphs write the cache they were captured on: PrefillGraphs.cache)
        owner = graph if graph is not None else model.prefill_block if hasattr(model.prefill_block, "cache") else None
        cache = KVCache(model.local, B, T + max_new_tokens - 1, model.dtype, model.device) if owner is None else \
            owner.cache(B, T + max_new_tokens - 1)
    out = model(tokens, pad_mask=pad_mask, cache=cache, plan=plan)
    results = [Generation(logits=out.logits[b] if keep_logits else None) for b in range(B)]
    depth = out.layers_run
    next_plan = replace(plan, candidates=None)  # candidates restrict the first token only
    token = _pick(out, plan.candidates, sampling, gens)
    # The tokens stay where the model is until the end: reading one back each step would make a GPU wait, idle, for
    # the host's next launches. EOS is looked for every eos_check_every steps (every step on the CPU, where reading
    # costs nothing); the few steps a finished batch runs past it are dropped with the rest after each row's EOS.
    every = eos_check_every(model.device)
    picked, runs = [], []  # per step: (B,) token ids, (B,) blocks run
    done = torch.zeros(B, dtype=torch.bool, device=model.device)
    for step in range(max_new_tokens):
        picked.append(token)
        runs.append(out.layers_run)
        if step == max_new_tokens - 1:
            break
        if eos_id is not None:
            done |= token == eos_id
            if (step + 1) % every == 0 and bool(done.all()):
                break
        cache.length += tokens.shape[1]
        tokens = token[:, None].to(model.device)
        d = _uniform(depth, next_plan)
        if graph is not None and mode != "token" and d is not None and graph.serves(d):
            logits = graph(tokens, cache, d, next_plan.translator)
            out = Output(logits, depth.clone(), logits.argmax(-1))
        elif mode == "token":
            out = model(tokens, cache=cache, plan=next_plan)
        else:
            out = decode_step(model, tokens, cache, depth, next_plan)
        token = _pick(out, None, sampling, gens)
    ids_run = torch.stack([t.to(model.device) for t in picked], 1).cpu().tolist()  # (B, steps): one read back
    layers_run = torch.stack([r.cpu() for r in runs], 1).tolist()
    for b, (row, layers) in enumerate(zip(ids_run, layers_run)):
        n = row.index(eos_id) + 1 if eos_id in row else len(row)  # up to and including the row's first EOS
        results[b].token_ids, results[b].layers_run = row[:n], layers[:n]
    return results


def eos_check_every(device: torch.device) -> int:
    """How many decode steps pass between looks for EOS: each look is a read back from the device."""
    return 1 if device.type == "cpu" else 8


def _uniform(depth: torch.Tensor, plan: Plan) -> int | None:
    """The depth every row runs at, when they all run the same first blocks (what a decode graph can take)."""
    if plan.layers is not None or plan.skip_attn or not bool((depth == depth[0]).all()):
        return None
    return int(depth[0])


def _pick(out: Output, candidates: torch.Tensor | None, sampling: Sampling, gens) -> torch.Tensor:
    if sampling.temperature == 0:
        return out.token
    idx = sampling.pick(out.logits, gens)
    return idx if candidates is None else candidates[idx]


def decode_step(model: Decoder, tokens: torch.Tensor, cache: KVCache, depth: torch.Tensor, plan: Plan) -> Output:
    """One new token per row; row b runs its first depth[b] blocks of the plan (rows grouped by depth)."""
    B = tokens.shape[0]
    groups = sorted(set(depth.tolist()))
    if len(groups) == 1:
        sub = Plan(layers=plan.layers, skip_attn=plan.skip_attn, exit_at=groups[0], translator=plan.translator)
        return model(tokens, cache=cache, plan=sub)
    logits, token = [None] * B, torch.zeros(B, dtype=torch.long, device=tokens.device)
    for d in groups:
        rows = (depth == d).nonzero()[:, 0]
        sub = Plan(layers=plan.layers, skip_attn=plan.skip_attn, exit_at=d, translator=plan.translator)
        o = model(tokens[rows.to(tokens.device)], cache=cache, plan=sub, rows=rows.to(tokens.device))
        for j, r in enumerate(rows.tolist()):
            logits[r], token[r] = o.logits[j], o.token[j]
    return Output(torch.stack(logits), depth.clone(), token)
