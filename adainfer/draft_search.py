"""Which blocks should draft (issue 18): greedy block removal scored by predicted speed on this machine.

A draft's worth is its acceptance against its cost. Acceptance is measured without running speculation: after a
verified context, the first draft of a round is the draft's blocks run on the newest token, attending to the whole
model's keys and values of every earlier position (they share the cache) and to their own at the new one.
`Positions.acceptance` runs that for every position of the model's own greedy continuations at once: one query a
position, each seeing the whole model's K/V before it and its own slot.

`search_blocks` removes blocks one at a time, each time the one whose removal keeps the acceptance highest (lazy
greedy: the first round scores every block, later rounds re-score the few that scored best before), and
`predict` turns each step's acceptance into tokens per second against dense from measured step costs
(`cost_model`: a dense step, draft steps at two depths, verify steps of each length) and
speculative.tokens_per_round.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from adainfer.errors import AdainferError
from adainfer.fast_decode import DecodeGraph, decode_step
from adainfer.kv_cache import KVCache
from adainfer.model import Decoder
from adainfer.speculative import Draft, predicted_speed, step_costs, tokens_per_round


class Positions:
    """The positions a draft is scored on: for each sequence (ids, n), with the last n ids the model's greedy
    continuation of the ones before, the whole model's keys and values of the sequence (computed once) and a query
    per continuation token, made from the token before it: query j at cache slot P + j sees slots 0 .. at[j] - 1
    (the whole model's) and its own."""

    @torch.inference_mode()
    def __init__(self, model: Decoder, seqs: list[tuple[list[int], int]]):
        if model.config.sliding_window is not None:
            raise AdainferError("--draft", "sliding-window models are not supported yet (speculation leaves holes in "
                                           "the cache, and the window counts cache slots)")
        self.model, self.items = model, []
        for ids, n in seqs:
            P = len(ids)
            cache = KVCache(model.local, 1, P + n, model.dtype, model.device)
            tokens = torch.tensor([ids], device=model.device)
            model(tokens, cache=cache)  # every block's K/V of the whole sequence at slots 0 .. P - 1
            at = torch.arange(P - n - 1, P - 1, device=model.device)  # (n,) query j drafts from position at[j]
            slots = torch.arange(P + n, device=model.device)
            own = P + torch.arange(n, device=model.device)  # (n,) query j's slot
            attend = (slots[None, :] < at[:, None]) | (slots[None, :] == own[:, None])  # (n, P + n)
            positions = at[None, :]  # (1, n)
            self.items.append((cache, tokens[:, at], tokens[0, at + 1], positions, *model.rotary_tables(positions),
                               attend[None, None], own))

    @torch.inference_mode()
    def acceptance(self, draft: Draft) -> float:
        """The share of positions whose token the draft's first step predicts."""
        model = self.model
        layers, reader = tuple(draft.blocks(model)), draft.reader(model)
        head = draft.head_rows(model)
        vocab = None if draft.vocab is None else draft.vocab.to(model.device)
        hits = total = 0
        for cache, queries, targets, positions, cos, sin, attend, write_pos in self.items:
            logits = decode_step(model, queries, positions, cos, sin, cache.valid, write_pos, cache, False, layers,
                                 reader, head, attend)[0]  # (n, K)
            guess = logits.argmax(-1) if vocab is None else vocab[logits.argmax(-1)]
            hits += int((guess == targets).sum())
            total += len(targets)
        return hits / max(1, total)


def search_blocks(where: Positions, draft: Draft, min_blocks: int, width: int = 3,
                  progress=None) -> list[tuple[list[int], float]]:
    """Greedy removal from all blocks down to `min_blocks`: [(blocks, first-draft acceptance)] per step, the whole
    model first. `draft` gives the head (rows, int8). Lazy: after the first round only the `width` blocks whose
    removal scored best last time are scored again."""
    current = draft.blocks(where.model)
    path = [(list(current), where.acceptance(replace(draft, layers=current)))]
    scores: dict[int, float] = {}
    while len(current) > min_blocks:
        ranked = sorted(current, key=lambda j: -scores.get(j, 2.0))  # never scored first
        tried = ranked if not scores else ranked[:width]
        for j in tried:
            scores[j] = where.acceptance(replace(draft, layers=[i for i in current if i != j]))
        best = max(tried, key=lambda j: scores[j])  # scored against this very set: the new set's acceptance
        current = [i for i in current if i != best]
        path.append((list(current), scores.pop(best)))
        if progress:
            progress(path[-1])
    return path


def cost_model(model: Decoder, ids: list[int], draft: Draft, max_length: int, repeats: int = 10,
               graph: DecodeGraph | None = None) -> dict:
    """Measured milliseconds on this machine (step_costs at batch 1 after `ids`): the dense step, the draft step of
    all blocks and of half of them (with the draft's head; a step of n blocks costs in between, linearly), and the
    verify step for each draft length 1..max_length."""
    L = model.config.n_layers
    half = list(range(0, L, 2))
    verify, dense, full_draft, half_draft = {}, [], [], []
    for g in range(1, max_length + 1):  # each cost the least of its medians: one noisy median must not skew the
        c = step_costs(model, ids, replace(draft, layers=None, length=g), repeats, graph)  # line through them
        verify[g] = c["verify_ms"]
        dense.append(c["dense_step_ms"])
        full_draft.append(c["draft_step_ms"])
        c = step_costs(model, ids, replace(draft, layers=half, length=g), repeats, graph)
        verify[g] = min(verify[g], c["verify_ms"])
        dense.append(c["dense_step_ms"])
        half_draft.append(c["draft_step_ms"])
    dense_ms, top, low = min(dense), min(full_draft), min(half_draft)
    per_block = max(0.0, (top - low) / (L - len(half)))
    return {"dense_step_ms": dense_ms, "draft_fixed_ms": top - L * per_block, "draft_block_ms": per_block,
            "verify_ms": verify}


def draft_ms(costs: dict, n_blocks: int) -> float:
    return costs["draft_fixed_ms"] + n_blocks * costs["draft_block_ms"]


def predict(alpha: float, g: int, n_blocks: int, costs: dict) -> tuple[float, float]:
    """(tokens per verify, speed against dense) of a draft of n_blocks with first-draft acceptance alpha drafting g a
    round, under the costs of cost_model."""
    tau = tokens_per_round(alpha, g)
    steps = {"dense_step_ms": costs["dense_step_ms"], "draft_step_ms": draft_ms(costs, n_blocks),
             "verify_ms": costs["verify_ms"][g]}
    return tau, predicted_speed(tau, g, steps)


def best_draft(path: list[tuple[list[int], float]], costs: dict) -> tuple[list[int], int, float, float]:
    """The (blocks, length, tokens per verify, predicted speed) of the path's fastest draft."""
    options = [(blocks, g, *predict(alpha, g, len(blocks), costs)) for blocks, alpha in path
               for g in costs["verify_ms"]]
    return max(options, key=lambda o: o[3])


def choose_head(where: Positions, ids: list[int], draft: Draft, heads: list[str], repeats: int = 10,
                graph: DecodeGraph | None = None) -> tuple[str, dict[str, float]]:
    """The head (of `heads`: full, int8) under which `draft` is predicted fastest: its first-draft acceptance
    (where.acceptance) and its measured step costs after `ids`. -> (head, predicted speed by head)."""
    speeds = {}
    for head in heads:
        option = replace(draft, head=head)
        costs = step_costs(where.model, ids, option, repeats, graph)
        speeds[head] = predicted_speed(tokens_per_round(where.acceptance(option), option.length), option.length,
                                       costs)
    return max(speeds, key=speeds.get), speeds
