"""Tensor parallelism inside one model replica (`--tp N` under torchrun; the ranks from adainfer.distributed).

Megatron's split, on torch.distributed: attention heads and the MLP's hidden units are divided among the ranks
(q/k/v and gate/up column-parallel, o and down row-parallel: one all-reduce after each), and the vocabulary too (the
embedding: each rank looks up its rows, one all-reduce; the LM head: each rank scores its rows). Each rank reads
only its slices of model.safetensors (SPLIT below), norms and the other small tensors whole.

The exit check never gathers logits: each rank reduces its vocabulary shard to four numbers per row (max logit,
second logit, the max's token id, sum of exp relative to the max), one all-gather of those gives every rank the
same merged softmax top-2 (the merge of adainfer/kernels/top2.py's Triton second stage), so every rank takes the same
decisions and the batch stays the same on every rank. Logits are gathered only where a whole distribution is
needed: a row's answer, sampling, candidate scores.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from adainfer.config import ModelConfig
from adainfer.errors import AdainferError
from adainfer.kernels.top2 import Top2

# Tensors split across the ranks of a replica, by the suffix of their name in model.safetensors: (dimension, unit).
# Units: "q" the query heads, "kv" the key/value heads, "hidden" the MLP's inner units, "vocab" the vocabulary.
# Row-parallel weights (o, down) split their input dimension; their biases are whole, added once after the reduce.
SPLIT = {
    "attention.wq.weight": (0, "q"),
    "attention.wq.bias": (0, "q"),
    "attention.wk.weight": (0, "kv"),
    "attention.wk.bias": (0, "kv"),
    "attention.wv.weight": (0, "kv"),
    "attention.wv.bias": (0, "kv"),
    "attention.wo.weight": (1, "q"),
    "feed_forward.w1.weight": (0, "hidden"),
    "feed_forward.w1.bias": (0, "hidden"),
    "feed_forward.w3.weight": (0, "hidden"),
    "feed_forward.w2.weight": (1, "hidden"),
    "tok_embeddings.weight": (0, "vocab"),
    "output.weight": (0, "vocab"),
}


@dataclass
class Shard:
    """One rank's part of a tensor-parallel replica."""

    rank: int
    size: int
    group: Any  # the replica's torch.distributed group
    vocab: int  # the whole vocabulary
    chunk: int  # vocabulary rows per rank (the last rank may hold fewer)

    @property
    def lo(self) -> int:
        return min(self.vocab, self.rank * self.chunk)

    @property
    def hi(self) -> int:
        return min(self.vocab, self.lo + self.chunk)

    def local(self, config: ModelConfig) -> ModelConfig:
        """The config of this rank's slice: its heads and MLP units (head_dim stays)."""
        return replace(config, n_heads=config.n_heads // self.size, n_kv_heads=config.n_kv_heads // self.size,
                       hidden_dim=config.hidden_dim // self.size)

    def span(self, config: ModelConfig, unit: str) -> tuple[int, int]:
        """This rank's [start, end) along a split dimension."""
        if unit == "vocab":
            return self.lo, self.hi
        per = {"q": config.n_heads * config.head_dim, "kv": config.n_kv_heads * config.head_dim,
               "hidden": config.hidden_dim}[unit] // self.size
        return self.rank * per, (self.rank + 1) * per

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        torch.distributed.all_reduce(x, group=self.group)
        return x

    def embed(self, weight: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) -> (B, T, dim), each rank looking up the ids in its rows (zeros for the others)."""
        mine = (tokens >= self.lo) & (tokens < self.hi)
        if weight.shape[0] == 0:  # a rank with no vocabulary rows (a tiny vocabulary over many ranks)
            h = torch.zeros(*tokens.shape, weight.shape[1], dtype=weight.dtype, device=weight.device)
        else:
            h = F.embedding((tokens - self.lo).clamp(0, weight.shape[0] - 1), weight) * mine[..., None].to(weight.dtype)
        return self.all_reduce(h)

    def rows(self, weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Whole head rows `ids` (k, dim) on every rank, from the shards that hold them (a candidate set)."""
        mine = (ids >= self.lo) & (ids < self.hi)
        if weight.shape[0] == 0:
            return self.all_reduce(torch.zeros(len(ids), weight.shape[1], dtype=weight.dtype, device=weight.device))
        out = weight[(ids - self.lo).clamp(0, weight.shape[0] - 1)] * mine[:, None].to(weight.dtype)
        return self.all_reduce(out.contiguous())

    def gather(self, logits: torch.Tensor) -> torch.Tensor:
        """This rank's logits (b, hi - lo) -> the whole vocabulary's (b, V), on every rank."""
        b = logits.shape[0]
        pad = torch.full((b, self.chunk), float("-inf"), dtype=logits.dtype, device=logits.device)
        pad[:, :logits.shape[1]] = logits
        parts = [torch.empty_like(pad) for _ in range(self.size)]
        torch.distributed.all_gather(parts, pad, group=self.group)
        return torch.cat(parts, dim=1)[:, :self.vocab]

    def top2(self, logits: torch.Tensor) -> Top2:
        """The softmax top-2 of the whole vocabulary from this rank's logits (b, hi - lo): four numbers per row
        (partial_top2), one all-gather, the same merge on every rank (merge_top2)."""
        mine = partial_top2(logits, self.lo)
        parts = [torch.empty_like(mine) for _ in range(self.size)]
        torch.distributed.all_gather(parts, mine, group=self.group)
        return merge_top2(torch.stack(parts))


def partial_top2(logits: torch.Tensor, offset: int) -> torch.Tensor:
    """A vocabulary shard's logits (b, n), its first row being token `offset` -> (b, 4): max, second, the max's
    token id, sum of exp(logit - max). An empty shard gives (-inf, -inf, offset, 0)."""
    x = logits.float()
    if x.shape[1] == 0:
        x = torch.full((x.shape[0], 1), float("-inf"), device=x.device)
    i1 = x.argmax(-1)
    m1 = x.gather(-1, i1[:, None])[:, 0]
    m2 = x.scatter(-1, i1[:, None], float("-inf")).amax(-1)
    s = torch.exp(x - m1[:, None]).nan_to_num(0.0).sum(-1)  # an empty shard: exp(-inf - -inf) = nan -> 0
    return torch.stack([m1, m2, (i1 + offset).float(), s], 1)  # ids < 2^24 are exact in float32


def merge_top2(parts: torch.Tensor) -> Top2:
    """Shards' partial_top2 (ranks, b, 4), in vocabulary order -> the whole vocabulary's Top2 (what the Triton
    kernel's second stage does with its programs' partials)."""
    m1s, m2s, ids, ss = parts.unbind(-1)
    best = m1s.argmax(0)  # the first shard holding the max: the smallest id among equal maxima, as argmax
    m = m1s.gather(0, best[None])[0]
    total = (ss * torch.exp(m1s - m)).nan_to_num(0.0).sum(0)
    others = m1s.scatter(0, best[None], float("-inf")).amax(0)  # the other shards' maxima
    second = torch.maximum(m2s.gather(0, best[None])[0], others)
    return Top2(ids.gather(0, best[None])[0].long(), 1.0 / total, torch.exp(second - m) / total)


def make_shard(world, config: ModelConfig) -> Shard | None:
    """The Shard of this rank when the world has tensor parallelism (None otherwise); refuses a model whose heads or
    MLP units the ranks cannot divide evenly."""
    if world.tp == 1:
        return None
    tp = world.tp
    for name, n in (("n_heads", config.n_heads), ("n_kv_heads", config.n_kv_heads),
                    ("hidden_dim", config.hidden_dim)):
        if n % tp:
            raise AdainferError("--tp", f"{tp} ranks cannot split this model: its {name} = {n} is not a multiple of "
                                        f"{tp}")
    return Shard(world.tp_rank, tp, world.tp_group, config.vocab_size, -(-config.vocab_size // tp))


def split_of(name: str) -> tuple[int, str] | None:
    """How tensor `name` of model.safetensors is split (SPLIT), or None: whole on every rank."""
    return next((v for suffix, v in SPLIT.items() if name == suffix or name.endswith("." + suffix)), None)
