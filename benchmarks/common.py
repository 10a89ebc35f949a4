"""Shared pieces of the benchmarks: machine description, timing, the transformers peer on our weights, output."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from adainfer.eval.harness import machine  # noqa: F401 (the benchmarks' import of it)
from adainfer.loading import load_model
from adainfer.timing import device_sync  # noqa: F401 (the benchmarks' import of it)


def median_time(fn, repeats: int = 5, warmup: int = 1, sync=None) -> float:
    """Median wall-clock seconds of fn() over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if sync:
            sync()
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved(fns: dict, repeats: int = 5, warmup: int = 1, sync=None) -> dict:
    """Median seconds of each fn, run in alternation (a, b, a, b, ...) so that machine noise hits all alike.
    `sync` (device_sync): called around each timed call, so that a GPU's queued work is counted."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            if sync:
                sync()
            t0 = time.perf_counter()
            fn()
            if sync:
                sync()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def add_device(p: argparse.ArgumentParser, cpu_only: str | None = None) -> None:
    """The benchmarks' --device (cpu or cuda; both sides of a comparison run there). `cpu_only`: what of this
    benchmark is the CPU's, said in its help."""
    extra = f"; CPU only, so not with cuda: {cpu_only}" if cpu_only else ""
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help=f"where the models run (default cpu; cuda: the current GPU, transformers too{extra})")


def check_device(device: str) -> None:
    """Stop with one line and exit status 2 when CUDA is asked for and absent (before anything is loaded)."""
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --device: CUDA is not available here (torch sees no GPU)", file=sys.stderr)
        sys.exit(2)


def hf_from_ours(folder: Path, dtype: torch.dtype, device: str = "cpu"):
    """A transformers model holding exactly the weights of our converted folder (Llama family)."""
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from adainfer.config import ModelConfig
    from weights_convert.hf import LLAMA_WEIGHT_MAP

    c = ModelConfig.load(Path(folder) / "config.json")
    assert c.arch == "llama", "the benchmark peer is built for Llama-family models"
    hf_config = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.hidden_dim,
                            num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
                            num_key_value_heads=c.n_kv_heads, max_position_embeddings=c.max_seq_len,
                            rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta, tie_word_embeddings=c.tie_embeddings,
                            head_dim=c.head_dim, attn_implementation="sdpa")
    ours_to_hf = {v: k for k, v in LLAMA_WEIGHT_MAP.items() if v is not None}
    state = {}
    for name, t in load_file(Path(folder) / "model.safetensors").items():
        parts = name.split(".")
        layer = parts[1] if parts[0] == "layers" else None
        key = name if layer is None else name.replace(f"layers.{layer}.", "layers.{}.", 1)
        hf_name = ours_to_hf[key]
        state[hf_name if layer is None else hf_name.format(layer)] = t
    with torch.device("meta"):
        model = LlamaForCausalLM(hf_config)
    model.load_state_dict(state, strict=False, assign=True)
    if c.tie_embeddings:
        model.tie_weights()
    model.model.rotary_emb.__init__(hf_config)  # buffers built on meta: rebuild on CPU
    return model.to(device=device, dtype=dtype).eval()


def load_ours(folder, dtype, device: str = "cpu"):
    model, tok = load_model(folder, dtype, device)
    return model, tok


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    print("  ".join("-" * widths[c] for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
    return "" if v is None else str(v)


def write_json(path: Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {path}")
