"""The vector-format Triton kernels (kernels/triton_vector.py) against the torch reference
`decode` of algorithms/vector.py: random indices, codebooks, perm and normalisation over
VPTQ's schemes (v4 k256, v8 k65536, v3 k512, a residual codebook, outliers of their own
vector length with two groups), normalisation on and off, odd shapes, the GEMV and
dequantize + matmul, with and without bias, fp32, fp16 and bf16 (the kernels use no
tl.dot, so bf16 runs interpreted too). Triton runs on the GPU when there is one, else
under TRITON_INTERPRET=1; the flag is set here too, so the file runs with --noconftest."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

from algorithms.vector import VectorScheme, VectorWeight, decode, pack_indices, to_int16

HAS_TRITON = importlib.util.find_spec("triton") is not None
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="Triton cannot be installed on this machine")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def vector_weight(out: int, inp: int, scheme: VectorScheme, seed: int) -> VectorWeight:
    """Uniform random indices, N(0, 0.1) codebooks (residual N(0, 0.02), outliers
    N(0, 0.3)), a random perm, scales in [0.5, 1.5) and N(0, 0.05) biases."""
    gen = torch.Generator().manual_seed(seed)
    n, gs = scheme.layout(out, inp)
    G, v, K, Kr = scheme.group_num, scheme.vector_len, scheme.num_centroids, scheme.num_res_centroids
    main = torch.randint(0, K, (G, out // v, gs), generator=gen)  # [G, out/v, gs]
    res = torch.randint(0, Kr, (G, out // v, gs), generator=gen) if Kr else None
    t = {
        "indices": pack_indices(main, res, scheme.index_bits, scheme.res_bits),  # [G, out/v, words]
        "centroids": (torch.randn(G, K * v, generator=gen) * 0.1).half(),
        "perm": to_int16(torch.randperm(inp, generator=gen)),
    }
    if Kr:
        t["res_centroids"] = (torch.randn(G, Kr * v, generator=gen) * 0.02).half()
    if n:
        vo, Ko = scheme.outlier_vector_len, scheme.outlier_centroids
        t["outlier_indices"] = to_int16(torch.randint(0, Ko, (1, out // vo, n), generator=gen))  # [1, out/vo, n]
        t["outlier_centroids"] = (torch.randn(1, Ko * vo, generator=gen) * 0.3).half()
    if scheme.normalize:
        t["weight_scale"] = (torch.rand(inp, generator=gen) + 0.5).half()
        t["weight_bias"] = (torch.randn(inp, generator=gen) * 0.05).half()
    return VectorWeight(scheme, **{k: x.to(DEVICE) for k, x in t.items()})


def assert_matches(y: torch.Tensor, vw: VectorWeight, x: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Within the rounding of x's dtype of F.linear(x, decode(vw), bias) in fp32."""
    want = torch.nn.functional.linear(x.float(), decode(vw), None if bias is None else bias.to(x.dtype).float())
    tol = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}[x.dtype]
    err = (y.float() - want).abs().max() / want.abs().max()
    assert y.dtype == x.dtype and y.shape == want.shape
    assert err <= tol, f"relative error {err:.2e} > {tol:.0e}"


OUTLIERS = {"outlier_percent": 5, "outlier_vector_len": 4, "outlier_centroids": 64, "group_num": 2}
# (scheme fields, (out, in)): 201 inputs with 5% outliers and two groups is 9 outliers
# (an odd count) and groups of 96
SCHEMES = [
    ({"vector_len": 4, "num_centroids": 256}, (96, 200)),
    ({"vector_len": 8, "num_centroids": 65536}, (64, 72)),
    ({"vector_len": 3, "num_centroids": 512}, (96, 200)),  # odd v, 9-bit indices straddle words
    ({"vector_len": 4, "num_centroids": 256, "num_res_centroids": 16}, (96, 200)),  # 12-bit indices
    ({"vector_len": 8, "num_centroids": 256, **OUTLIERS}, (96, 201)),
]
IDS = [VectorScheme(**f).name + ("-outliers" if "group_num" in f else "") for f, _ in SCHEMES]


@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "plain"])
@pytest.mark.parametrize(("fields", "shape"), SCHEMES, ids=IDS)
def test_linear_equals_the_reference(fields: dict, shape: tuple[int, int], normalize: bool) -> None:
    from kernels import triton_vector as tv

    out, inp = shape
    vw = vector_weight(out, inp, VectorScheme(**fields, normalize=normalize), len(fields) + normalize)
    w = tv.layout(vw, DEVICE)
    bias = torch.randn(out, device=DEVICE)
    for rows in (1, 3, 40):  # the GEMV up to 4 rows, dequantize + matmul beyond
        for i, dtype in enumerate(DTYPES):
            b = bias if (rows + i) % 2 else None
            x = torch.randn(rows, inp, device=DEVICE).to(dtype)
            assert_matches(tv.linear(x, w, b), vw, x, b)


def test_small_tiles_split_the_columns_and_the_rows() -> None:
    """The GEMV with 64-output tiles (ragged at the bottom: 12 vector rows of 8 in tiles of
    8, 24 of 4 in tiles of 16), 32-column tiles, two splits per group (64 and 32 columns),
    the outliers' 9 columns one partial tile, and activation rows in blocks of 2 (the last
    one partial); dequantize with ragged tiles at both edges."""
    from kernels import triton_vector as tv

    fields = {"vector_len": 8, "num_centroids": 256, "num_res_centroids": 4, **OUTLIERS}
    vw = vector_weight(96, 201, VectorScheme(**fields), 5)
    w = tv.layout(vw, DEVICE)
    bias = torch.randn(96, device=DEVICE)
    for config in (tv.GemvConfig(64, 32, 8, rows=2), tv.DequantConfig(64, 64)):
        for dtype in DTYPES:
            x = torch.randn(5, 201, device=DEVICE).to(dtype)
            assert_matches(tv.linear(x, w, bias, config), vw, x, bias)


@pytest.mark.parametrize("path", ["gemv", "dequantize"])
def test_two_calls_give_identical_bits(path: str) -> None:
    from kernels import triton_vector as tv

    vw = vector_weight(96, 201, VectorScheme(vector_len=8, num_centroids=256, **OUTLIERS), 6)
    w = tv.layout(vw, DEVICE)
    config = tv.GemvConfig(32, 32, 12) if path == "gemv" else tv.DequantConfig()  # several splits
    x = torch.randn(3, 201, device=DEVICE, dtype=torch.float16)
    first = tv.linear(x, w, None, config)
    assert torch.equal(first, tv.linear(x, w, None, config))


def test_dequantize_equals_decode() -> None:
    """dequantize(w)^T is decode(vw) in fp32 (the same sum of a main and a residual
    centroid, scale and shift); the outliers' int16 indices are laid out as a 16-bit
    stream of whole words."""
    from kernels import triton_vector as tv

    for fields in ({"vector_len": 4, "num_centroids": 256, "num_res_centroids": 16, **OUTLIERS}, SCHEMES[2][0]):
        vw = vector_weight(96, 201, VectorScheme(**fields), 7)
        w = tv.layout(vw, DEVICE)
        assert [s.first for s in w.segments] == ([0, 9] if vw.outlier_size else [0])
        assert w.segments[0].indices.shape[2] == (5 if vw.outlier_size else vw.indices.shape[2])
        torch.testing.assert_close(tv.dequantize(w, torch.float32).t(), decode(vw), rtol=1e-6, atol=1e-6)


def test_a_fitted_weight() -> None:
    """A weight VPTQ fitted (act-order perm, normalisation, outliers, residual) runs the same."""
    from algorithms.vptq import fit
    from kernels import triton_vector as tv

    gen = torch.Generator().manual_seed(0)
    W, X = torch.randn(64, 128, generator=gen), torch.randn(512, 128, generator=gen)  # [out, in], [tokens, in]
    scheme = VectorScheme(4, 64, 16, group_num=2, outlier_percent=5, outlier_vector_len=4, outlier_centroids=16)
    vw, _ = fit(W, X.T @ X, scheme)
    vw = vw.to(DEVICE)
    w = tv.layout(vw, DEVICE)
    for rows in (2, 7):
        x = torch.randn(rows, 128, device=DEVICE)
        assert_matches(tv.linear(x, w, None), vw, x, None)


def test_the_layer_backends_agree() -> None:
    """VectorLinear's reference, cpu and triton backends give the same outputs (any
    leading dims; none with no rows); a wrong input size raises."""
    from kernels import VectorLinear
    from kernels import triton_vector as tv

    vw = vector_weight(96, 201, VectorScheme(vector_len=8, num_centroids=256, **OUTLIERS), 8)
    bias = torch.randn(96, device=DEVICE)
    layer = VectorLinear(vw, bias, backend="reference")
    backends = ("reference", "triton") if DEVICE == "cuda" else ("reference", "cpu", "triton")
    for shape in ((1, 201), (2, 2, 201), (3, 7, 201)):
        x = torch.randn(*shape, device=DEVICE)
        ys = [layer.use(b)(x) for b in backends]
        for y in ys[1:]:
            torch.testing.assert_close(y, ys[0], rtol=1e-5, atol=1e-5)
    assert layer.use("triton")(torch.randn(2, 0, 201, device=DEVICE)).shape == (2, 0, 96)
    with pytest.raises(ValueError, match="features"):
        tv.linear(torch.randn(3, 200, device=DEVICE), tv.layout(vw, DEVICE), None)


def test_the_path_follows_the_rows() -> None:
    from kernels import triton_vector as tv

    assert isinstance(tv._config(1), tv.GemvConfig)
    assert isinstance(tv._config(tv.GEMV_MAX_ROWS), tv.GemvConfig)
    assert isinstance(tv._config(tv.GEMV_MAX_ROWS + 1), tv.DequantConfig)
