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
