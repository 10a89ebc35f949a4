"""Runs over several processes with torch.distributed, launched by torchrun (gloo on CPUs, NCCL on GPUs).

    torchrun --nproc_per_node 2 -m adainfer.eval --task sst2 --limit 200 --out sst2.json        # data parallel
    torchrun --nproc_per_node 4 -m adainfer.run --tp 2 --prompts p.jsonl --max-new-tokens 64     # 2 replicas x TP 2

The ranks form `size // tp` model replicas of `tp` consecutive ranks each (tensor parallel inside a replica:
adainfer.parallel). Data parallel is over replicas: the work is cut into the same batches a single process would
run (sorted by length, `--batch-size` rows), whole batches are shared out by cost, each replica runs its own, and
every rank gathers everything back in input order. So a batch's numbers are the ones a single process computes for
it (with the same threads per process: a CPU matmul's rounding depends on the thread count), and result and
classifier files equal a single-process run's, timings aside. Only rank 0 prints and writes files.

A rank that fails exits non-zero; torchrun then stops the others (they may be waiting in a collective) and exits
non-zero itself. Files are written atomically by rank 0 after the last collective, so nothing is half-written.
Without torchrun (WORLD_SIZE unset or 1) and without --tp everything here is a no-op: one process, one replica.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from adainfer.errors import AdainferError

TIMEOUT = timedelta(minutes=30)  # a collective that waits longer than this fails (a rank that hangs, not one that dies)


@dataclass
class World:
    """This process's place among the ranks."""

    rank: int = 0
    size: int = 1
    tp: int = 1  # ranks per model replica
    tp_group: Any = None  # torch.distributed groups (None: a group of one)
    dp_group: Any = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def replicas(self) -> int:
        return self.size // self.tp

    @property
    def replica(self) -> int:
        return self.rank // self.tp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    def share(self, costs: Sequence[float]) -> list[int]:
        """The items (indices into `costs`) this replica runs: the costliest first, each to the replica with the
        least work so far (ties to the lower replica), the same on every rank."""
        load = [0.0] * self.replicas
        mine = []
        for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
            r = min(range(self.replicas), key=lambda r: (load[r], r))
            load[r] += costs[i]
            if r == self.replica:
                mine.append(i)
        return sorted(mine)

    def map(self, fn: Callable[[int], Any], n: int, costs: Sequence[float] | None = None) -> list:
        """[fn(0), ..., fn(n - 1)] on every rank, each replica running its share of the items (fn must not depend
        on which process runs it)."""
        if self.replicas == 1:
            return [fn(i) for i in range(n)]
        mine = self.share([1.0] * n if costs is None else costs)
        done = {i: fn(i) for i in mine}
        parts: list = [None] * self.replicas
        # Within a replica every rank computed the same items: gathering over the ranks that share this rank's place
        # in its replica (one per replica) collects each item once.
        torch.distributed.all_gather_object(parts, done, group=self.dp_group)
        out = {}
        for part in parts:
            out.update(part)
        return [out[i] for i in range(n)]

    def map_batches(self, fn: Callable[[int], Any], batches: list[list[int]], ids: list[list[int]]) -> list:
        """map over batches of prompt indices sorted by length (adainfer.generate.length_batches), each costing its
        rows x its longest prompt (its last)."""
        return self.map(fn, len(batches), [len(b) * len(ids[b[-1]]) for b in batches])

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj`, on every rank (e.g. a timing measured once, so that every rank decides alike)."""
        if self.size == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the body first (e.g. fetching and converting the default model into the shared cache),
        then the others, which find its result."""
        if self.size > 1 and not self.main:
            torch.distributed.barrier()
        yield
        if self.size > 1 and self.main:
            torch.distributed.barrier()


_world = World()


def current_world() -> World:
    """The World set up by `init` (one process, one replica until then)."""
    return _world


def leave() -> None:
    """Leave the process group before the interpreter exits (init registers it), so that its communication threads
    stop in order: left to the interpreter's teardown, a gloo rank once aborted there ("terminate called without an
    active exception", SIGABRT, after its answers were written)."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def init(device: str = "cpu", tp: int = 1) -> World:
    """Join the ranks torchrun started (WORLD_SIZE, RANK and MASTER_ADDR/PORT from the environment): gloo on the
    CPU, NCCL on CUDA (each rank on GPU LOCAL_RANK), groups of `tp` consecutive ranks per replica."""
    global _world
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise AdainferError("--tp", f"must be at least 1, got {tp!r}")
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1 and tp > 1:
        raise AdainferError("--tp", f"{tp} ranks hold the model between them: launch with torchrun --nproc_per_node "
                                    f"{tp} (or a multiple of {tp}); this process runs alone")
    if size % tp:
        raise AdainferError("--tp", f"{tp} does not divide the {size} ranks torchrun started (WORLD_SIZE)")
    if size == 1:
        _world = World()
        return _world
    dist = torch.distributed
    if not dist.is_initialized():
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=TIMEOUT)
        atexit.register(leave)
    rank = dist.get_rank()
    # Every rank creates every group, in the same order (torch.distributed's rule).
    tp_groups = [dist.new_group(list(range(r, r + tp))) for r in range(0, size, tp)]
    dp_groups = [dist.new_group(list(range(k, size, tp))) for k in range(tp)]
    _world = World(rank, size, tp, tp_groups[rank // tp], dp_groups[rank % tp])
    return _world
