"""Wall-clock timing that counts a GPU's queued work (a forward returns before the GPU has run it)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def device_sync(device: torch.device | str) -> Callable[[], None]:
    """What a timer calls around the timed work: torch.cuda.synchronize on a GPU, nothing on a CPU."""
    return torch.cuda.synchronize if torch.device(device).type == "cuda" else _nothing


def _nothing() -> None:
    pass
