"""The codebook-format Triton kernels (kernels/triton_codebook.py) against the torch
reference `decode` of algorithms/codebook.py: random codes, codebooks and scales over the
AQLM schemes (1x16, 2x8, 1x8, 4x8; groups of 8 and 16, and one odd scheme), odd shapes,
the lookup-table and codeword GEMVs and dequantize + matmul, with and without bias, fp32,
fp16 and bf16 (the kernels use no tl.dot, so bf16 runs interpreted too). Triton runs on
the GPU when there is one, else under TRITON_INTERPRET=1; the flag is set here too, so the
file runs with --noconftest."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

from algorithms.codebook import CodebookWeight, decode, load_codes, store_codes

HAS_TRITON = importlib.util.find_spec("triton") is not None
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="Triton cannot be installed on this machine")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def codebook_weight(out: int, inp: int, M: int, nbits: int, g: int, seed: int) -> CodebookWeight:
    """Random codes in [0, 2**nbits) (stored signed), N(0, 0.1) codebooks, positive scales."""
    gen = torch.Generator().manual_seed(seed)
    K = 2**nbits
    codes = torch.randint(0, K, (out, inp // g, M), generator=gen)  # [out, G, M]
    return CodebookWeight(
        codes=store_codes(codes, nbits).to(DEVICE),
        codebooks=(torch.randn(M, K, 1, g, generator=gen) * 0.1).half().to(DEVICE),  # [M, K, 1, g]
        scales=(torch.rand(out, 1, 1, 1, generator=gen) + 0.5).half().to(DEVICE),  # [out, 1, 1, 1]
    )


def assert_matches(y: torch.Tensor, cw: CodebookWeight, x: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Within the rounding of x's dtype of F.linear(x, decode(cw, x.dtype), bias)."""
    want = torch.nn.functional.linear(x, decode(cw, x.dtype), None if bias is None else bias.to(x.dtype))
    tol = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}[x.dtype]
    err = (y.float() - want.float()).abs().max() / want.float().abs().max()
    assert y.dtype == x.dtype and y.shape == want.shape
    assert err <= tol, f"relative error {err:.2e} > {tol:.0e}"


# (M, nbits, g) and the (out, in) shapes each runs on: 1x16 (K = 65536) on small ones
SCHEMES = [
    ((1, 16, 8), [(37, 64), (64, 128)]),
    ((2, 8, 8), [(37, 256), (128, 576), (257, 64)]),
    ((1, 8, 8), [(128, 256), (257, 576)]),
    ((2, 8, 16), [(37, 256), (257, 576)]),
    ((4, 8, 8), [(128, 256), (37, 576)]),
    ((3, 4, 6), [(20, 48)]),  # a group that is not a power of two, 4-bit codes
]


@pytest.mark.parametrize(("scheme", "shapes"), SCHEMES, ids=[f"{m}x{b}g{g}" for (m, b, g), _ in SCHEMES])
def test_linear_equals_the_reference(scheme: tuple[int, int, int], shapes: list[tuple[int, int]]) -> None:
    from kernels import triton_codebook as tc

    M, nbits, g = scheme
    for seed, (out, inp) in enumerate(shapes):
        cw = codebook_weight(out, inp, M, nbits, g, seed)
        w = tc.layout(cw, torch.device(DEVICE))
        bias = torch.randn(out, device=DEVICE)
        lut = [tc._lut_config()] if nbits <= 8 else []
        for rows in (1, 3, 8, 33):  # codeword GEMV up to 8 rows, dequantize + matmul beyond
            for i, dtype in enumerate(DTYPES):
                b = bias if (rows + i) % 2 else None
                x = torch.randn(rows, inp, device=DEVICE).to(dtype)
                for config in (None, *lut) if rows < 8 else (None,):  # and the lookup table
                    assert_matches(tc.linear(x, w, b, config), cw, x, b)


def test_small_tiles_split_the_groups_and_the_rows() -> None:
    """Both GEMVs with 8 groups a tile and 4 group splits (the last of one group), the
    codeword one with activation rows in blocks of 2 (the last one partial), the lookup
    table on 5 rows; dequantize with ragged tiles at both edges."""
    from kernels import triton_codebook as tc

    cw = codebook_weight(70, 584, 2, 8, 8, 1)  # 73 groups
    w = tc.layout(cw, torch.device(DEVICE))
    bias = torch.randn(70, device=DEVICE)
    configs = (
        tc.LutConfig(32, 8, 3 * 4, table_block_g=16),
        tc.GemvConfig(32, 64, 3 * 4, rows=2),
        tc.DequantConfig(32, 96),
    )
    for config in configs:
        for dtype in DTYPES:
            x = torch.randn(5, 584, device=DEVICE).to(dtype)
            assert_matches(tc.linear(x, w, bias, config), cw, x, bias)


@pytest.mark.parametrize("path", ["lut", "gemv", "dequantize"])
def test_two_calls_give_identical_bits(path: str) -> None:
    from kernels import triton_codebook as tc

    cw = codebook_weight(96, 512, 2, 8, 8, 2)
    w = tc.layout(cw, torch.device(DEVICE))
    config = {  # the GEMVs with several group splits
        "lut": tc.LutConfig(32, 8, 12, table_block_g=16),
        "gemv": tc.GemvConfig(32, 64, 12),
        "dequantize": tc.DequantConfig(),
    }[path]
    x = torch.randn(3, 512, device=DEVICE, dtype=torch.float16)
    first = tc.linear(x, w, None, config)
    assert torch.equal(first, tc.linear(x, w, None, config))


def test_layout_keeps_the_codes_and_dequantize_equals_decode() -> None:
    """The laid-out codes are the stored integers, read back mod K; dequantize(w)^T is decode(cw)
    bit for bit in fp32 up to two codebooks (the same additions in the same order)."""
    from kernels import triton_codebook as tc

    for M, nbits, g in ((1, 16, 8), (2, 8, 8), (4, 8, 8), (3, 4, 6)):
        cw = codebook_weight(33, 96 if g != 6 else 48, M, nbits, g, M)
        w = tc.layout(cw, torch.device(DEVICE))
        K = 2**nbits
        assert w.codes.shape == (M, cw.codes.shape[1], 33) and w.codes.dtype == cw.codes.dtype
        assert torch.equal(w.codes.long() & (K - 1), load_codes(cw.codes, nbits).permute(2, 1, 0))
        assert w.codebooks.shape == (M, K, 1 << (g - 1).bit_length()) and not w.codebooks[:, :, g:].any()
        assert (w.out_features, w.in_features) == (cw.out_features, cw.in_features)
        W = tc.dequantize(w, torch.float32).t()  # [out, in]
        if M <= 2:
            assert torch.equal(W, decode(cw, torch.float32))
        torch.testing.assert_close(W, decode(cw, torch.float32), rtol=1e-6, atol=1e-6)


def test_any_leading_dims_and_the_layer() -> None:
    """x [2, 5, in] -> [2, 5, out]; CodebookLinear's triton backend runs these kernels."""
    from kernels import CodebookLinear
    from kernels import triton_codebook as tc

    cw = codebook_weight(40, 128, 2, 8, 8, 3)
    w = tc.layout(cw, torch.device(DEVICE))
    x3 = torch.randn(2, 5, 128, device=DEVICE)
    assert tc.linear(x3, w, None).shape == (2, 5, 40)
    assert tc.linear(x3[:, :0], w, None).shape == (2, 0, 40)
    with pytest.raises(ValueError, match="features"):
        tc.linear(torch.randn(3, 64, device=DEVICE), w, None)
    wide = tc.layout(codebook_weight(8, 16, 1, 16, 8, 4), torch.device(DEVICE))
    with pytest.raises(ValueError, match="lookup-table"):
        tc.linear(torch.randn(1, 16, device=DEVICE), wide, None, tc.LutConfig(8, 2, 1))
    bias = torch.randn(40, device=DEVICE)
    layer = CodebookLinear(cw, bias, backend="triton")
    for rows in (2, 12):
        x = torch.randn(rows, 128, device=DEVICE)
        assert_matches(layer(x), cw, x, bias)


def test_the_path_follows_rows_codebook_size_and_height() -> None:
    """One row of a tall weight with small codebooks: the lookup table; else the codeword
    GEMV up to GEMV_MAX_ROWS rows, then dequantize + matmul."""
    from kernels import triton_codebook as tc

    def laid(M: int, K: int, out: int) -> tc.CodebookTritonWeight:
        meta = torch.device("meta")
        codes = torch.empty(M, 1024, out, dtype=torch.int16, device=meta)
        return tc.CodebookTritonWeight(codes, torch.empty(M, K, 8, device=meta), torch.empty(out, device=meta), 8)

    assert isinstance(tc._config(laid(2, 256, tc.LUT_MIN_OUT), 1), tc.LutConfig)
    assert isinstance(tc._config(laid(2, 256, tc.LUT_MIN_OUT), 2), tc.GemvConfig)
    assert isinstance(tc._config(laid(2, 256, 8192), 1), tc.GemvConfig)
    assert isinstance(tc._config(laid(1, 65536, 28672), 1), tc.GemvConfig)
    assert isinstance(tc._config(laid(1, 65536, 28672), tc.GEMV_MAX_ROWS), tc.GemvConfig)
    assert isinstance(tc._config(laid(2, 256, 8192), tc.GEMV_MAX_ROWS + 1), tc.DequantConfig)
