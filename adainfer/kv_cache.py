"""The KV cache of adainfer.model's decoders: preallocated keys and values a layer, written by the eager loop at its
length and by a decode graph at the slots its position tensor names; sliding-window layers keep a ring."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch

from adainfer.config import ModelConfig

if TYPE_CHECKING:
    from adainfer.model import Context


class KVCache:
    """Preallocated keys and values, one (B, Hkv, max_len, hd) tensor of each per layer (separate tensors: a compiled
    step that writes into views of one shared buffer makes inductor copy the whole buffer at every write).

    The eager loop writes at `length` (the same for every row); a compiled decode step writes at the position
    tensor `ctx.write_pos` and attends over the whole buffer under its mask, so one graph serves every length.
    Rows are left-padded: `valid[b, s]` says whether key position s of row b holds a real token."""

    def __init__(self, config: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, device="cpu"):
        # Sliding-window layers keep only their window once the cache is longer: a ring of `ring` positions, cache
        # slot s at index s % ring (the keys are stored rotated, and attention does not care about their order:
        # the mask says which entries are in a query's window). Memory for them is bounded by the window.
        W = config.sliding_window
        sliding = [config.sliding(i) for i in range(config.n_layers)]
        self.ring = W if W is not None and max_len > W and any(sliding) else None
        self.rings = [self.ring is not None and s for s in sliding]  # per layer: held as a ring
        shapes = [(batch, config.n_kv_heads, self.ring if r else max_len, config.head_dim) for r in self.rings]
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for shape in shapes]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for shape in shapes]
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.length = 0  # positions written so far
        self.padded = False  # whether any row holds padding (then attention needs an explicit mask)
        self.max_len = max_len
        self.parent: KVCache | None = None  # the cache this one is the first rows of (first_rows)

    def first_rows(self, n: int) -> KVCache:
        """A cache of this one's first n rows (views: what it writes, this one holds), `parent` this one: B rows of a
        decode graph captured for a larger batch (DecodeGraph.cache)."""
        rows = copy.copy(self)
        rows.k, rows.v = [t[:n] for t in self.k], [t[:n] for t in self.v]
        rows.valid, rows.parent = self.valid[:n], self
        return rows

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, ctx: Context):
        """Write k, v (b, Hkv, T, hd) for the rows in ctx.rows; return the keys and values to attend to."""
        ck, cv = self.k[layer], self.v[layer]
        if ctx.write_pos is not None:
            pos = ctx.write_pos if not self.rings[layer] else ctx.write_pos % self.ring
            ck.index_copy_(2, pos, k)
            cv.index_copy_(2, pos, v)
            return ck, cv
        end = self.length + k.shape[2]
        rows = slice(None) if ctx.rows is None else ctx.rows
        if self.rings[layer]:
            # Attend to the ring as it was (the window's earlier keys) and the new keys, then keep the newest.
            keys, values = torch.cat([ck[rows], k], dim=2), torch.cat([cv[rows], v], dim=2)
            n = min(k.shape[2], self.ring)
            idx = torch.arange(end - n, end, device=k.device) % self.ring
            for cached, new in ((ck, k), (cv, v)):
                if ctx.rows is None:
                    cached[:, :, idx] = new[:, :, -n:]
                else:
                    part = cached[rows]
                    part[:, :, idx] = new[:, :, -n:]
                    cached[rows] = part
            return keys, values
        ck[rows, :, self.length:end] = k
        cv[rows, :, self.length:end] = v
        return ck[rows, :, :end], cv[rows, :, :end]
