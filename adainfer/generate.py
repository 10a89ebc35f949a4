"""Batching and greedy generation on top of Decoder.forward: left-pad, prefill, decode one token at a time."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from adainfer.errors import AdainferError
from adainfer.model import Decoder, KVCache, Output, Plan


@dataclass
class Generation:
    token_ids: list[int] = field(default_factory=list)  # generated ids (up to and including EOS)
    layers_run: list[int] = field(default_factory=list)  # blocks run for each generated token
    logits: torch.Tensor | None = None  # the first generated token's logits (float32), when asked for


def check_prompts(ids: list[list[int]], model: Decoder, max_new_tokens: int, where: str = "prompt") -> None:
    """Refuse empty prompts and prompts that do not fit the model's context with the tokens to generate."""
    limit = model.config.max_seq_len
    for i, p in enumerate(ids):
        if not p:
            raise AdainferError(f"{where} {i + 1}", "empty prompt (it encodes to no tokens)")
        if len(p) + max_new_tokens - 1 > limit:
            raise AdainferError(f"{where} {i + 1}", f"{len(p)} tokens + {max_new_tokens} new exceed the model's "
                                                    f"context of {limit} tokens")


def left_pad(ids: list[list[int]], pad_id: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor | None]:
    """(tokens (B, T), pad_mask (B, T) or None when no row is padded)."""
    T = max(len(p) for p in ids)
    tokens = torch.full((len(ids), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), T), dtype=torch.bool)
    for b, p in enumerate(ids):
        tokens[b, T - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[b, T - len(p):] = True
    return tokens.to(device), (None if bool(mask.all()) else mask.to(device))


def generate(model: Decoder, ids: list[list[int]], max_new_tokens: int = 1, plan: Plan | None = None,
             eos_id: int | None = None, keep_logits: bool = False) -> list[Generation]:
    """Greedy generation for one batch of prompts (lists of token ids).

    The plan (exit rule, layer plan, candidates) decides the first token. Each later token runs the blocks its row
    ran at prefill (per-sequence depth), so the KV cache only ever holds layers that were computed."""
    if max_new_tokens < 1:
        raise AdainferError("--max-new-tokens", f"must be at least 1, got {max_new_tokens}")
    check_prompts(ids, model, max_new_tokens)
    plan = plan or Plan()
    pad = model.config.pad_id if model.config.pad_id is not None else 0
    tokens, pad_mask = left_pad(ids, pad, model.device)
    B, T = tokens.shape
    cache = KVCache(model.config, B, T + max_new_tokens - 1, model.dtype, model.device) if max_new_tokens > 1 else None
    out = model(tokens, pad_mask=pad_mask, cache=cache, plan=plan)
    results = [Generation(logits=out.logits[b] if keep_logits else None) for b in range(B)]
    depth = out.layers_run
    done = torch.zeros(B, dtype=torch.bool)
    for step in range(max_new_tokens):
        for b in range(B):
            if not done[b]:
                results[b].token_ids.append(int(out.token[b]))
                results[b].layers_run.append(int(out.layers_run[b]))
        if eos_id is not None:
            done |= out.token.cpu() == eos_id
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        cache.length += tokens.shape[1]
        tokens = out.token[:, None].to(model.device)
        out = decode_step(model, tokens, cache, depth, plan)
    return results


def decode_step(model: Decoder, tokens: torch.Tensor, cache: KVCache, depth: torch.Tensor, plan: Plan) -> Output:
    """One new token per row; row b runs its first depth[b] blocks of the plan (rows grouped by depth)."""
    B = tokens.shape[0]
    groups = sorted(set(depth.tolist()))
    if len(groups) == 1:
        sub = Plan(layers=plan.layers, skip_attn=plan.skip_attn, exit_at=groups[0])
        return model(tokens, cache=cache, plan=sub)
    logits, token = [None] * B, torch.zeros(B, dtype=torch.long, device=tokens.device)
    for d in groups:
        rows = (depth == d).nonzero()[:, 0]
        sub = Plan(layers=plan.layers, skip_attn=plan.skip_attn, exit_at=d)
        o = model(tokens[rows.to(tokens.device)], cache=cache, plan=sub, rows=rows.to(tokens.device))
        for j, r in enumerate(rows.tolist()):
            logits[r], token[r] = o.logits[j], o.token[j]
    return Output(torch.stack(logits), depth.clone(), token)
