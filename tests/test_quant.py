"""adainfer.quant: int4 / int8 rounding and the C++ kernels against their plain-torch references and the matmul on
the dequantized weights."""

import subprocess
import sys

import pytest
import torch

from adainfer.quant import (
    QuantWeight,
    dequantize_int4,
    dequantize_int8,
    int4_linear,
    int4_linear_reference,
    int8_linear,
    int8_linear_reference,
    load_q4q8_kernel,
    quantize_int4,
    quantize_int8,
)


def test_int4_rounding_recovers_a_4bit_grid_and_bounds_the_error():
    g = torch.Generator().manual_seed(0)
    # Weights that already sit on a Q4_1 grid (every group spans q = 0..15) come back exactly.
    q = torch.randint(0, 16, (64, 96), generator=g, dtype=torch.int32)
    q[:, 0::32], q[:, 1::32] = 0, 15
    scale, low = torch.rand(64, 3, generator=g) * 0.1 + 0.01, torch.randn(64, 3, generator=g) * 0.1
    w = dequantize_int4(q, scale, low)
    q2, scale2, low2 = quantize_int4(w)
    assert torch.equal(q2, q)
    torch.testing.assert_close(dequantize_int4(q2, scale2, low2), w, atol=1e-6, rtol=0)
    # Any other weights move by at most half a step of their group; a constant group is kept as is.
    w = torch.randn(64, 96, generator=g)
    w[0, :32] = 0.25
    q, scale, low = quantize_int4(w)
    err = (dequantize_int4(q, scale, low) - w).abs().view(64, 3, 32)
    assert bool((err <= scale[..., None] / 2 + 1e-6).all())
    assert float(err[0, 0].max()) == 0.0


@pytest.fixture(scope="module")
def kernel():
    load_q4q8_kernel()


@pytest.mark.parametrize("b, n, k", [(1, 16, 32), (1, 97, 64), (2, 65, 64), (3, 260, 64), (5, 40, 64), (6, 33, 96),
                                     (7, 50, 64), (1, 1536, 576)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_kernel_matches_its_reference_and_the_dequantized_matmul(kernel, b, n, k, dtype):
    # b = 1 takes the two-rows-at-a-time path (odd n: one row left over); b > 1 passes of up to 4 input rows (5: 4 + 1,
    # 6: 4 + 2, 7: 4 + 3), each row count its own compiled loop.
    g = torch.Generator().manual_seed(n)
    q, scale, low = quantize_int4(torch.randn(n, k, generator=g))
    w = QuantWeight.int4(q, scale, low)
    x = torch.randn(b, k, generator=g).to(dtype)
    y = int4_linear(x, w.q, w.scale, w.low)
    assert y.shape == (b, n) and y.dtype == torch.float32
    # Its own arithmetic (int8 activations, integer dot products) in float64: float32 summation order only.
    ref = int4_linear_reference(x, q, scale, low)
    assert float((y.double() - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    # Against the matmul on the dequantized weights, the error is the rounding of x to int8: measured <= 0.75%.
    exact = x.double() @ dequantize_int4(q, scale, low).double().T
    assert float((y.double() - exact).abs().max()) <= 1.5e-2 * float(exact.abs().max())
    # A row's output does not depend on the rows beside it, bit for bit (what keeps an int4 verify step of several
    # tokens equal to one-token decode steps).
    assert all(torch.equal(y[i], int4_linear(x[i:i + 1], w.q, w.scale, w.low)[0]) for i in range(b))


@pytest.mark.parametrize("b, n, k", [(1, 97, 64), (6, 33, 96), (1, 1536, 576)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_kernel_matches_its_reference_and_the_dequantized_matmul(kernel, b, n, k, dtype):
    g = torch.Generator().manual_seed(n)
    q, scale = quantize_int8(torch.randn(n, k, generator=g))
    assert int(q.abs().max()) == 127
    x = torch.randn(b, k, generator=g).to(dtype)
    y = int8_linear(x, q, scale)
    assert y.shape == (b, n) and y.dtype == torch.float32
    ref = int8_linear_reference(x, q, scale)
    assert float((y.double() - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    exact = x.double() @ dequantize_int8(q, scale).double().T
    assert float((y.double() - exact).abs().max()) <= 1.5e-2 * float(exact.abs().max())


def test_int8_rounding_recovers_a_q8_0_grid():
    g = torch.Generator().manual_seed(1)
    q = torch.randint(-127, 128, (8, 64), generator=g, dtype=torch.int8)
    q[:, 0], q[:, 32] = 127, -127
    scale = torch.rand(8, 2, generator=g) * 0.01 + 1e-3
    q2, scale2 = quantize_int8(dequantize_int8(q, scale))
    assert torch.equal(q2, q)
    torch.testing.assert_close(scale2, scale, atol=0, rtol=1e-6)


@pytest.mark.slow
def test_portable_kernel_build_matches_the_references():
    # The loop that runs where there is no AVX2 (built here on request, in a fresh process: one kernel per process).
    code = """
import torch
from adainfer.quant import *
load_q4q8_kernel(portable=True)
g = torch.Generator().manual_seed(0)
w = torch.randn(45, 96, generator=g)
q, scale, low = quantize_int4(w)
q8, scale8 = quantize_int8(w)
packed = QuantWeight.int4(q, scale, low)
for b in (1, 5):
    x = torch.randn(b, 96, generator=g)
    for y, ref in ((int4_linear(x, packed.q, packed.scale, packed.low), int4_linear_reference(x, q, scale, low)),
                   (int8_linear(x, q8, scale8), int8_linear_reference(x, q8, scale8))):
        err = float((y.double() - ref).abs().max()) / float(ref.abs().max())
        assert err <= 1e-5, err
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


# ---------------------------------------------------------------- which dtype --dtype auto takes on this CPU

FAST_BF16 = {"decode_float32_s": 7.2, "prefill_float32_s": 8.9, "decode_bfloat16_s": 3.3, "prefill_bfloat16_s": 1.6}
SLOW_BF16 = {"decode_float32_s": 2.0, "prefill_float32_s": 1.6, "decode_bfloat16_s": 2.0, "prefill_bfloat16_s": 2.5}


def test_prefers_bf16_on_measured_times():
    """The EPYC's probe (bfloat16 the faster product in both) and the Xeon's figures (a head GEMV level, a 256-row
    product 2.5 vs 1.6 ms) and the margin itself."""
    from adainfer.quant import BF16_MARGIN, prefers_bf16

    assert prefers_bf16(FAST_BF16) and not prefers_bf16(SLOW_BF16)
    level = dict(SLOW_BF16, prefill_bfloat16_s=1.6 * BF16_MARGIN)  # 1.0 x the margin: not below it
    assert not prefers_bf16(level) and prefers_bf16(dict(level, prefill_bfloat16_s=1.6 * BF16_MARGIN * 0.99))


def test_auto_dtype_by_the_cpu_flags_or_measured_once_and_kept(tmp_path, monkeypatch):
    import json

    import adainfer.quant as quant

    probes = []
    times = {"now": FAST_BF16}
    monkeypatch.setattr(quant, "cpu_probe", lambda: probes.append(1) or times["now"])
    monkeypatch.setattr(quant, "_FLAGS", {"avx2", "fma"})  # no bfloat16 units: float32, nothing measured
    assert quant.cpu_dtype(tmp_path) == torch.float32 and not probes
    monkeypatch.setattr(quant, "_FLAGS", {"avx512_bf16", "amx_bf16"})  # AMX: bfloat16
    assert quant.cpu_dtype(tmp_path) == torch.bfloat16 and not probes
    monkeypatch.setattr(quant, "_FLAGS", {"avx512f", "avx512_bf16"})  # the flags do not say: measured, then kept
    assert quant.cpu_dtype(tmp_path) == torch.bfloat16 and len(probes) == 1
    times["now"] = SLOW_BF16
    assert quant.cpu_dtype(tmp_path) == torch.bfloat16 and len(probes) == 1
    kept = json.loads((tmp_path / "cpu_dtype.json").read_text())
    [(key, record)] = kept.items()
    assert f"torch {torch.__version__}" in key and f"{torch.get_num_threads()} threads" in key
    assert record == {"dtype": "bfloat16", **FAST_BF16}
    threads = torch.get_num_threads()
    try:  # another thread count is measured anew, beside the first record
        torch.set_num_threads(threads + 1)
        assert quant.cpu_dtype(tmp_path) == torch.float32 and len(probes) == 2
    finally:
        torch.set_num_threads(threads)
    assert len(json.loads((tmp_path / "cpu_dtype.json").read_text())) == 2
    # a file that is not JSON, or holds no dtype: measured again and written anew; no cache: measured every time
    for text in ("{not json", '{"' + key + '": {"dtype": "int3"}}', "[]"):
        (tmp_path / "cpu_dtype.json").write_text(text)
        assert quant.cpu_dtype(tmp_path) == torch.float32
        assert json.loads((tmp_path / "cpu_dtype.json").read_text())[key]["dtype"] == "float32"
    n = len(probes)
    assert quant.cpu_dtype(None) == torch.float32 and quant.cpu_dtype(None) == torch.float32 and len(probes) == n + 2
    blocked = tmp_path / "a-file"
    blocked.write_text("")  # a cache that cannot be written: the measured dtype, nothing raised
    assert quant.cpu_dtype(blocked / "cache") == torch.float32 and not (blocked / "cache").exists()
    assert not list(tmp_path.glob("*.tmp"))


def test_cpu_probe_times_both_dtypes():
    from adainfer.quant import cpu_probe

    times = cpu_probe(decode=(64, 32), prefill=(4, 16, 32), repeats=1)
    assert sorted(times) == ["decode_bfloat16_s", "decode_float32_s", "prefill_bfloat16_s", "prefill_float32_s"]
    assert all(0 < t < 1 for t in times.values())


def test_auto_resolves_without_a_probe_where_it_need_not(monkeypatch):
    """On a GPU auto is bfloat16; a named dtype is itself; checking a name (calibrate's --check-dtype) measures
    nothing; an unknown name is one error naming --dtype."""
    import adainfer.quant as quant
    from adainfer.calibration import FitOptions, check_fit
    from adainfer.errors import AdainferError
    from adainfer.loading import resolve_dtype

    def boom():
        raise AssertionError("probed")

    monkeypatch.setattr(quant, "cpu_probe", boom)
    monkeypatch.setattr(quant, "_FLAGS", {"avx512_bf16"})
    assert resolve_dtype("auto", "cuda") == torch.bfloat16 and resolve_dtype("float16") == torch.float16
    check_fit(FitOptions(), check_dtypes=("auto", "bfloat16"))
    with pytest.raises(AdainferError, match="--dtype: unknown dtype 'float8'"):
        resolve_dtype("float8")
