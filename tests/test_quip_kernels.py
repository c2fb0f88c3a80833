"""The incoherent format's Triton kernels (kernels/triton_quip.py) against the torch
reference: E8P codes decoded in the kernel (GEMV up to 4 rows, dequantize + matmul
beyond), fp32, fp16 and bf16, with and without bias, odd output counts. Triton runs on
the GPU when there is one, else under TRITON_INTERPRET=1 (set here too, so the file runs
with --noconftest)."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

from algorithms import e8p
from algorithms.quip import QuipScheme, QuipWeight, decode, quip, rotated, signs

HAS_TRITON = importlib.util.find_spec("triton") is not None
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="Triton cannot be installed on this machine")


def problem(rows: int, inp: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """W [rows, in] and a correlated positive definite H (tests/test_aqlm.py's, which imports
    the pipeline: this file runs on machines with algorithms and kernels only)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(4 * inp, inp, generator=g) @ (torch.eye(inp) + 0.3 * torch.randn(inp, inp, generator=g))
    return torch.randn(rows, inp, generator=g), X.T @ X / len(X)


def random_e8p(out: int, inp: int, seed: int) -> QuipWeight:
    """Uniform random 16-bit codes (every absolute vector, sign pattern and shift), scales
    in [0.01, 0.03), random signs."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << 16, (out, inp // 8), generator=g)
    su, sv = signs(out, inp, seed)
    return QuipWeight(
        scheme=QuipScheme(),
        su=su,
        sv=sv,
        qidxs=torch.where(codes >= 2**15, codes - 2**16, codes).to(torch.int16),
        scales=(0.01 + 0.02 * torch.rand(out, 1, generator=g)).half(),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("out", "inp"), [(192, 576), (100, 64)])
def test_triton_dequantize_equals_the_e8p_decode(out: int, inp: int, dtype: torch.dtype) -> None:
    from kernels import triton_quip

    qw = random_e8p(out, inp, out)
    w = triton_quip.layout(qw, DEVICE)
    got = triton_quip.dequantize(w, dtype).cpu()
    want = rotated(qw)
    assert got.dtype == dtype
    if dtype == torch.bfloat16:  # the interpreter's float32 -> bfloat16 cast may round the other way: one ulp
        assert torch.allclose(got.float(), want, rtol=2**-7, atol=0)
    else:
        assert torch.equal(got, want.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows", [1, 3, 9])
def test_triton_linear_equals_the_decoded_weight(rows: int, dtype: torch.dtype) -> None:
    from kernels import IncoherentLinear

    qw = random_e8p(192, 576, rows)
    bias = torch.randn(192) * 0.1 if rows != 3 else None
    x = torch.randn(rows, 576)
    want = x.double() @ decode(qw).double().T + (0 if bias is None else bias.double())
    layer = IncoherentLinear(qw, bias, "triton").to(DEVICE)
    got = layer(x.to(DEVICE, dtype)).cpu()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert got.dtype == dtype and got.shape == (rows, 192)
    assert (got.double() - want).abs().max() < tol * want.abs().max(), (rows, dtype)


def test_triton_runs_a_fitted_weight_and_scalar_quip_takes_the_reference_path() -> None:
    from kernels import IncoherentLinear

    W, H = problem(64, 128, 5)
    x = torch.randn(2, 128)
    for scheme in (QuipScheme(), QuipScheme("scalar", 4, 32, True)):
        qw = quip(W, H, scheme)
        got = IncoherentLinear(qw, None, "triton").to(DEVICE)(x.to(DEVICE)).cpu()
        assert torch.allclose(got, x @ decode(qw).T, atol=1e-4), scheme.name
    assert tuple((i // 2) + 4 * (i % 2) for i in range(8)) == e8p.SIGN_BIT  # the kernels' formula
