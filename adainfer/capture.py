"""One fixed-shape step replayed as a CUDA graph (gpt-fast's lever against a host-bound loop): the captured decode
steps (adainfer.fast_decode), a prompt's captured blocks (adainfer.fast_prefill) and the captured exit checks
(adainfer.exit.CheckGraphs) all replay through it."""

from __future__ import annotations

import torch

from adainfer.errors import AdainferError


class Captured:
    """One function of fixed-shape tensors replayed as a CUDA graph: its inputs are copied into static buffers, the
    graph replays, the output is cloned out. `fn` must be a pure step of its inputs plus state it writes the same way
    every time (the KV cache at the input position), so the warm-up runs before capture may write it too.
    graph=False runs the same static-buffer path without capture (how the CPU tests exercise it). `fn` returns a
    tensor, a tuple of them, or None (it writes its results into buffers that outlive the replay)."""

    def __init__(self, fn, inputs: list[torch.Tensor], graph: bool = True, pool=None):
        self.fn, self.inputs, self.graph = fn, [t.clone() for t in inputs], None
        if not graph:
            return
        stream = torch.cuda.Stream()  # warm-up off the default stream, as torch.cuda.graphs asks
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        # `pool`: one memory pool for a set of captures (a DecodeGraph's) that never replay at once and whose outputs
        # are cloned out right after each replay, so one graph's intermediates may reuse another's memory.
        with torch.cuda.graph(self.graph, pool=pool):
            self.output = fn(*self.inputs)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        for static, t in zip(self.inputs, inputs):
            static.copy_(t)
        if self.graph is None:
            output = self.fn(*self.inputs)
        else:
            self.graph.replay()
            output = self.output
        if output is None:  # (a step that writes its results into buffers of its own)
            return None
        return tuple(t.clone() for t in output) if isinstance(output, tuple) else output.clone()


def require_cuda(option: str, what: str, device: torch.device | str, hint: str = "") -> None:
    """Refuse `option` (`what` it does: replay CUDA graphs) off a GPU, in one line."""
    if str(device).split(":")[0] != "cuda":
        raise AdainferError(option, f"{what}: it needs --device cuda{hint}")
