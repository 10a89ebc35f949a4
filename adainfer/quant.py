"""How a matrix product runs: float (upcast to float32 where a CPU has no bfloat16 units), int4 and int8 weights
through adainfer's C++ kernels, and the plain-torch references of those kernels. Imports nothing of the model.

int4 weights are rounded in groups of 32 input columns with a scale and an offset per group (GGUF's Q4_1), int8 ones
with a scale per group (Q8_0); the kernels (csrc/q4q8.cpp, compiled on first use) round each product's activations
to int8 per group of 32 and sum in integers (AVX2), what llama.cpp runs for those files.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from adainfer.errors import AdainferError
from adainfer.kernels.top2 import dequantize_head

# ---------------------------------------------------------------- float products on this CPU


def _cpuinfo() -> tuple[dict[str, str], set[str]]:
    """/proc/cpuinfo, read once: the first processor's fields and every processor's flags (empty where absent)."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return {}, set()
    fields = [(k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in text.splitlines()) if _]
    flags = {flag for k, v in fields if k == "flags" for flag in v.split()}
    first = text.split("\n\n")[0].splitlines()  # the first processor's block
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in first) if _}, flags


CPU_INFO, _FLAGS = _cpuinfo()
# On a CPU without bfloat16 units (AVX2 only), a bfloat16/float16 matmul of 8+ rows runs 4-6x slower than the
# same matmul in float32 (measured, benchmarks/README.md). There we compute it in float32 and round the output:
# a bfloat16 product is exact in float32, so this is a bfloat16 matmul with float32 accumulation, like the native one.
UPCAST_ROWS = 0 if _FLAGS & {"avx512_bf16", "amx_bf16"} else 8


def upcasts(x: torch.Tensor) -> bool:
    """Whether a product of x (..., d) runs in float32 and is rounded back (UPCAST_ROWS)."""
    return bool(UPCAST_ROWS) and x.dtype != torch.float32 and not x.is_cuda and x.numel() >= UPCAST_ROWS * x.shape[-1]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if upcasts(x):
        return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)
    return F.linear(x, weight, bias)


# Which row counts of the LM head's product go as weight @ x.T (a tall-skinny GEMM) on the CPU instead of x @ weight.T.
# Measured on the 49152 x 576 head, 2 threads (one row is a GEMV either way): on an AMD EPYC with AVX2 only the tall
# form ran ~1.8x faster for 2-16 rows; on an Intel Xeon with AVX512 it ran 2-3x slower for 2-5 rows (2.8-4.8 ms vs
# 8-9), level at 8 and faster at 12 (benchmarks/RESULTS.md).
TALL_HEAD_ROWS = range(9, 17) if "avx512f" in _FLAGS else range(2, 17)


def head_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Last-token LM head, x (b, d) against head rows weight (V, d) -> float32 logits (b, V); on the CPU as
    weight @ x.T for the row counts of TALL_HEAD_ROWS, the faster form on this CPU."""
    if x.is_cuda or x.shape[0] not in TALL_HEAD_ROWS:
        return linear(x, weight).float()
    if UPCAST_ROWS and x.dtype != torch.float32 and x.shape[0] >= UPCAST_ROWS:
        x, weight = x.float(), weight.float()
    return (weight @ x.T).T.float()


# ---------------------------------------------------------------- which dtype `--dtype auto` takes on this CPU
#
# With AMX tiles: bfloat16. With neither AMX nor AVX512-BF16 (AVX2): float32, whose matmuls run 4-6x faster. With
# AVX512-BF16 alone the flags do not say it. On an Intel Xeon (family 6 model 207, 2 threads, torch 2.13) every
# bfloat16 matmul we ran was slower than float32's (prefill 1.4-1.6x, eager decode 1.1x slower); on an AMD EPYC
# (family 25 model 17) bfloat16 was the faster (prefill 1.46-1.65x, eager decode 1.48x faster; benchmarks/RESULTS.md).
# There it is measured once (cpu_probe: ~0.5 s) and kept in the cache with the CPU, torch and thread count it holds for.

PROBE_DECODE = (16384, 2048)  # a GEMV's matrix (out, in): 128 MB in float32, past a CPU's caches, as a decode step's
PROBE_PREFILL = (64, 4096, 1024)  # rows, out, in: a prompt's product, bound by arithmetic
BF16_MARGIN = 0.8  # bfloat16 when its two times over float32's multiply to less (a geometric mean under ~0.89)


def cpu_probe(decode: tuple[int, int] = PROBE_DECODE, prefill: tuple[int, int, int] = PROBE_PREFILL,
              repeats: int = 3) -> dict:
    """Seconds of a GEMV over a matrix larger than the caches and of a 64-row product, in float32 and bfloat16, on
    the current thread count (the best of `repeats` each)."""
    import time

    out, k = decode
    rows, n, k2 = prefill
    mats = {"decode": (torch.ones(1, k), torch.full((out, k), 0.01)),  # written: no lazily mapped zero pages
            "prefill": (torch.ones(rows, k2), torch.full((n, k2), 0.01))}
    times = {}
    for dtype in (torch.float32, torch.bfloat16):
        for what, (x, w) in mats.items():
            x, w = x.to(dtype), w.to(dtype)
            best = float("inf")
            for _ in range(repeats + 1):  # (the first call warms up)
                t0 = time.perf_counter()
                linear(x, w)
                best = min(best, time.perf_counter() - t0)
            times[f"{what}_{str(dtype)[6:]}_s"] = best
    return times


def prefers_bf16(times: dict) -> bool:
    """From cpu_probe's times: bfloat16 where its decode and prefill times over float32's multiply below BF16_MARGIN."""
    ratio = (times["decode_bfloat16_s"] / times["decode_float32_s"]) * (times["prefill_bfloat16_s"] /
                                                                         times["prefill_float32_s"])
    return ratio < BF16_MARGIN


def cpu_name() -> str:
    """Vendor, model name, family and model numbers of this CPU (the first processor of /proc/cpuinfo)."""
    if not CPU_INFO:
        return "unknown"
    get = (lambda key: CPU_INFO.get(key, "?"))
    return f"{get('vendor_id')} {get('model name')} family {get('cpu family')} model {get('model')}"


def cpu_dtype(cache: Path | None) -> torch.dtype:
    """What `--dtype auto` takes on this CPU: by its flags, else measured (cpu_probe) and kept in `cache`/cpu_dtype.json
    (None: measured every time), keyed by the CPU, torch's version and the thread count."""
    if "amx_bf16" in _FLAGS:
        return torch.bfloat16
    if "avx512_bf16" not in _FLAGS:
        return torch.float32
    import json

    key = f"{cpu_name()} | torch {torch.__version__} | {torch.get_num_threads()} threads"
    path = None if cache is None else Path(cache) / "cpu_dtype.json"
    try:
        known = json.loads(path.read_text()) if path is not None and path.is_file() else {}
        record = known.get(key) if isinstance(known, dict) else None
        if isinstance(record, dict) and record.get("dtype") in ("float32", "bfloat16"):
            return getattr(torch, record["dtype"])
    except (OSError, ValueError):  # unreadable or not JSON: measure again, and write it anew
        known = {}
    times = cpu_probe()
    dtype = torch.bfloat16 if prefers_bf16(times) else torch.float32
    if path is not None:
        known = known if isinstance(known, dict) else {}
        known[key] = {"dtype": str(dtype)[6:], **times}
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        try:  # (a cache that cannot be written costs a measurement next time, nothing else)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(known, indent=1) + "\n")
            tmp.replace(path)
        except OSError:
            with contextlib.suppress(OSError):  # (nothing to remove where the folder could not be made)
                tmp.unlink()
    return dtype


# ---------------------------------------------------------------- int4 / int8 weights

INT4_GROUP = 32


# ---------------------------------------------------------------- int4 weights


def quantize_int4(w: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w (N, K) -> q (N, K) int32 in 0..15, scale and low (N, K // group) float32, with w ~ scale * q + low: the
    group's minimum maps to 0 and its maximum to 15 (as llama.cpp's Q4_1)."""
    N, K = w.shape
    g = w.float().view(N, K // group, group)
    low, high = g.amin(-1), g.amax(-1)
    scale = (high - low) / 15
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = ((g - low[..., None]) / safe[..., None]).round().clamp(0, 15)
    return q.to(torch.int32).view(N, K), scale, low


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """The plain-torch reference: (N, K) float32 weights from quantize_int4's output."""
    N, K = q.shape
    g = q.float().view(N, scale.shape[1], -1)
    return (g * scale[..., None] + low[..., None]).view(N, K)


def quantize_int8(w: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) -> q (N, K) int8 in -127..127 and scale (N, K // group) float32 = max|w| / 127 per group, with
    w ~ scale * q (llama.cpp's Q8_0, in which the default model's embedding table is distributed)."""
    N, K = w.shape
    g = w.float().view(N, K // group, group)
    scale = g.abs().amax(-1) / 127
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = (g / safe[..., None]).round().clamp(-127, 127)
    return q.to(torch.int8).view(N, K), scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The plain-torch reference: (N, K) float32 weights from quantize_int8's output (the exit kernel's int8 head
    reads the same format: adainfer.kernels.top2.dequantize_head, which this is)."""
    return dequantize_head(q, scale)


# ---------------------------------------------------------------- the int4 / int8 x int8 kernels

_KERNEL_SOURCE = Path(__file__).parent / "csrc" / "q4q8.cpp"
_kernel_loaded = False


def load_q4q8_kernel(portable: bool | None = None, what: str = "--decode int4") -> None:
    """Compile adainfer/csrc/q4q8.cpp (first use: ~15 s; torch keeps the build under ~/.cache/torch_extensions) and
    register torch.ops.adainfer.q4q8_linear and q8q8_linear. AVX2 integer dot products where torch reports an AVX2
    CPU, a portable C++ loop otherwise (or with portable=True / ADAINFER_Q4Q8_PORTABLE=1)."""
    global _kernel_loaded
    if _kernel_loaded:
        return
    from torch.utils import cpp_extension

    if portable is None:
        portable = os.environ.get("ADAINFER_Q4Q8_PORTABLE") == "1"
    avx2 = not portable and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    try:
        cpp_extension.load(name="adainfer_q4q8_" + ("avx2" if avx2 else "portable"), sources=[str(_KERNEL_SOURCE)],
                           extra_cflags=["-O3", "-fopenmp"] + (["-mavx2", "-mfma"] if avx2 else []),
                           extra_ldflags=["-fopenmp"], is_python_module=False)
    except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
        raise AdainferError(what, f"could not build the quantized kernels {_KERNEL_SOURCE} ({e})") from None

    @torch.library.register_fake("adainfer::q4q8_linear")
    def _(x, qs, d, m):  # shapes for torch.compile
        return x.new_empty(x.shape[0], qs.shape[0], dtype=torch.float32)

    @torch.library.register_fake("adainfer::q8q8_linear")
    def _(x, qs, d):
        return x.new_empty(x.shape[0], qs.shape[0], dtype=torch.float32)

    _kernel_loaded = True


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q (N, K) in 0..15 -> (N, K / 2) uint8, GGUF Q4_1's order: in each group of 32, byte j holds element j in its
    low nibble and element 16 + j in its high nibble."""
    N, K = q.shape
    g = q.to(torch.uint8).view(N, K // INT4_GROUP, 2, INT4_GROUP // 2)
    return (g[:, :, 0] | (g[:, :, 1] << 4)).reshape(N, K // 2).contiguous()


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """x (..., K) float32 or bfloat16 -> (..., N) float32 = x @ W.T with W = scale * q + low in groups of 32, through
    the C++ kernel: x is rounded to int8 per group of 32 (scale max|x| / 127, GGUF's Q8_1) and the products summed in
    integers, as llama.cpp does for Q4_1 weights. load_q4q8_kernel() first."""
    lead = x.shape[:-1]
    y = torch.ops.adainfer.q4q8_linear(x.reshape(-1, x.shape[-1]), packed, scale, low)
    return y.view(*lead, -1)


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (..., K) float32 or bfloat16 -> (..., N) float32 = x @ W.T with W = scale * q (quantize_int8), x rounded to
    int8 as in int4_linear. load_q4q8_kernel() first."""
    lead = x.shape[:-1]
    return torch.ops.adainfer.q8q8_linear(x.reshape(-1, x.shape[-1]), q, scale).view(*lead, -1)


def _round_inputs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' rounding of x (B, K) to int8 per group of 32, in float32 as they do it (ties fall the same way):
    qx (B, G, 32) and dx (B, G), float64."""
    B, K = x.shape
    xg = x.float().view(B, K // INT4_GROUP, INT4_GROUP)
    dx = xg.abs().amax(-1) / 127
    inv = torch.where(dx > 0, 1 / dx, 0.0)
    return (xg * inv[..., None]).round().double(), dx.double()


def _scaled_dots(qx: torch.Tensor, dx: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """sum over groups of scale * dx * (q . qx): qx (B, G, 32), dx (B, G), q (N, K) integers -> (B, N) float64."""
    dots = torch.einsum("bgj,ngj->bng", qx, q.double().view(q.shape[0], *qx.shape[1:]))  # (B, N, G)
    return (dots * scale.double() * dx[:, None]).sum(-1)


def int4_linear_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """int4_linear's arithmetic in plain torch, float64: x (B, K), q (N, K) in 0..15 -> (B, N)."""
    qx, dx = _round_inputs(x)
    return _scaled_dots(qx, dx, q, scale) + (low.double() * (dx * qx.sum(-1))[:, None]).sum(-1)


def int8_linear_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8_linear's arithmetic in plain torch, float64: x (B, K), q (N, K) int8 -> (B, N)."""
    return _scaled_dots(*_round_inputs(x), q, scale)


class QuantWeight(nn.Module):
    """A matrix for the kernels, as buffers: int4 (q: packed nibbles (N, K / 2) uint8; scale, low (N, K / 32)
    float32) or int8 (q (N, K) int8, scale (N, K / 32)). Calling it is the product x @ W.T, float32."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, low: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("q", q, persistent=False)
        self.register_buffer("scale", scale.float().contiguous(), persistent=False)
        self.register_buffer("low", None if low is None else low.float().contiguous(), persistent=False)

    @classmethod
    def int4(cls, q: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> QuantWeight:
        """From quantize_int4's output (q in 0..15, unpacked)."""
        return cls(pack_int4(q), scale, low)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.low is not None:
            return int4_linear(x, self.q, self.scale, self.low)
        if x.is_cuda:  # (the int8 check head on a GPU never comes here: the Triton top-2 kernel reads q and scale)
            raise AdainferError("--draft-head", "int8 weights run in the CPU's kernels (adainfer/csrc): on a GPU "
                                                "draft with the full head")
        return int8_linear(x, self.q, self.scale)
