"""VPTQ: the vector format's storage against its definition, each part of the fit checked
against what it must compute, and the whole pipeline on the 4-block model (the same
bytes for any worker count, evaluated on the kernels)."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from algorithms.hessian import proxy_error
from algorithms.vector import VectorScheme, VectorWeight, as_uint16, decode, pack_indices, to_int16, unpack_indices
from algorithms.vptq import LocalPieces, VPTQConfig, column_order, fit, fit_pieces, nearest
from kernels import VectorLinear
from kernels.reference import dequantize
from pipeline.recipe import parse
from tests.conftest import small_recipe_doc
from tests.test_aqlm import problem


@pytest.mark.parametrize(("index_bits", "res_bits", "n"), [(8, 0, 40), (9, 4, 37), (16, 8, 5), (12, 0, 3)])
def test_indices_pack_into_the_little_endian_bit_stream_and_back(index_bits: int, res_bits: int, n: int) -> None:
    g = torch.Generator().manual_seed(index_bits)
    main = torch.randint(0, 2**index_bits, (2, 6, n), generator=g)
    res = torch.randint(0, 2**res_bits, (2, 6, n), generator=g) if res_bits else None
    packed = pack_indices(main, res, index_bits, res_bits)
    b = index_bits + res_bits
    assert packed.dtype == torch.int32 and packed.shape == (2, 6, -(-n * b // 32))
    # element e's bits sit at stream positions e*b .. e*b+b-1, stream bit p in word p // 32, bit p % 32
    words = packed.to(torch.int64) & 0xFFFFFFFF
    e, bit = 3 % n, 5
    merged = main[1, 4, e] | (0 if res is None else res[1, 4, e] << index_bits)
    p = e * b + bit
    assert (int(words[1, 4, p // 32]) >> (p % 32)) & 1 == (int(merged) >> bit) & 1
    got_main, got_res = unpack_indices(packed, n, index_bits, res_bits)
    assert torch.equal(got_main, main) and (res is None or torch.equal(got_res, res))


def random_weight(out: int, inp: int, scheme: VectorScheme, seed: int) -> VectorWeight:
    g = torch.Generator().manual_seed(seed)
    n_out, gs = scheme.layout(out, inp)
    G, v, R = scheme.group_num, scheme.vector_len, out // scheme.vector_len
    main = torch.randint(0, scheme.num_centroids, (G, R, gs), generator=g)
    res = torch.randint(0, scheme.num_res_centroids, (G, R, gs), generator=g) if scheme.num_res_centroids else None
    vo = scheme.outlier_vector_len
    return VectorWeight(
        scheme=scheme,
        indices=pack_indices(main, res, scheme.index_bits, scheme.res_bits),
        centroids=torch.randn(G, scheme.num_centroids * v, generator=g).half(),
        perm=to_int16(torch.randperm(inp, generator=g)),
        res_centroids=None if res is None else torch.randn(G, scheme.num_res_centroids * v, generator=g).half(),
        outlier_indices=to_int16(torch.randint(0, scheme.outlier_centroids, (1, out // vo, n_out), generator=g))
        if n_out
        else None,
        outlier_centroids=torch.randn(1, scheme.outlier_centroids * vo, generator=g).half() if n_out else None,
        weight_scale=(torch.rand(inp, generator=g) + 0.5).half() if scheme.normalize else None,
        weight_bias=(torch.randn(inp, generator=g) * 0.1).half() if scheme.normalize else None,
    )


@pytest.mark.parametrize(
    "scheme",
    [
        VectorScheme(vector_len=4, num_centroids=64, normalize=False),
        VectorScheme(vector_len=2, num_centroids=16, num_res_centroids=8, group_num=2),
        VectorScheme(vector_len=4, num_centroids=32, outlier_percent=10, outlier_vector_len=2, outlier_centroids=8),
    ],
    ids=["plain", "residual-groups", "outliers"],
)
def test_decode_follows_the_format_entry_by_entry(scheme: VectorScheme) -> None:
    """Every weight from its definition (algorithms/vector.py's docstring), one at a time."""
    out, inp = 8, 30
    vw = random_weight(out, inp, scheme, seed=1)
    W = decode(vw)
    n_out, gs = scheme.layout(out, inp)
    v, vo = scheme.vector_len, scheme.outlier_vector_len
    main, res = unpack_indices(vw.indices, gs, scheme.index_bits, scheme.res_bits)
    perm = as_uint16(vw.perm)
    for o in range(out):
        for k in range(inp):
            if k < n_out:
                idx = int(as_uint16(vw.outlier_indices)[0, o // vo, k])
                q = vw.outlier_centroids[0, idx * vo + o % vo].float()
            else:
                c, kk = divmod(k - n_out, gs)
                q = vw.centroids[c, int(main[c, o // v, kk]) * v + o % v].float()
                if vw.res_centroids is not None:
                    q = q + vw.res_centroids[c, int(res[c, o // v, kk]) * v + o % v].float()
            j = int(perm[k])
            if vw.weight_scale is not None:
                q = q * vw.weight_scale[j].float() + vw.weight_bias[j].float()
            assert W[o, j] == q, (o, j)


def test_column_order_puts_the_outliers_first_then_act_order() -> None:
    H = torch.diag(torch.tensor([3.0, 9.0, 1.0, 7.0, 5.0]))
    assert column_order(H, 2, act_order=True).tolist() == [1, 3, 4, 0, 2]
    assert column_order(H, 2, act_order=False).tolist() == [1, 3, 0, 2, 4]


def test_without_feedback_every_vector_is_its_nearest_centroid() -> None:
    """With a diagonal H no error is pushed to other columns: the assignment is the plain
    nearest centroid of each (normalised) vector."""
    W, _ = problem(32, 24, seed=2)
    H = torch.diag(torch.rand(24, generator=torch.Generator().manual_seed(3)) + 0.5)
    scheme = VectorScheme(vector_len=4, num_centroids=16, normalize=False)
    vw, _ = fit(W, H, scheme, VPTQConfig(act_order=False))
    books = vw.centroids.float().reshape(16, 4)
    vectors = W.reshape(8, 4, 24).permute(0, 2, 1).reshape(-1, 4)  # [vector row * in, v]
    expected = books[nearest(vectors, books)].reshape(8, 24, 4).permute(0, 2, 1).reshape(32, 24)
    assert torch.equal(decode(vw), expected)


def test_error_feedback_beats_nearest_assignment_and_the_fit_accounts_its_error() -> None:
    """On a correlated H, GPTQ-style feedback lowers tr(dW H dW^T) below rounding each
    vector to its nearest centroid with the same codebooks; the fit's own account of
    its error is the error of the decoded weight."""
    W, H = problem(64, 48, seed=4)
    scheme = VectorScheme(vector_len=4, num_centroids=32)
    vw, error = fit(W, H, scheme)
    fitted = proxy_error(W, decode(vw), H)
    assert fitted == pytest.approx(error, rel=1e-4)
    s, b = vw.weight_scale.float(), vw.weight_bias.float()
    books = vw.centroids.float().reshape(32, 4)
    normal = (W - b) / s
    vectors = normal.reshape(16, 4, 48).permute(0, 2, 1).reshape(-1, 4)
    rounded = books[nearest(vectors, books)].reshape(16, 48, 4).permute(0, 2, 1).reshape(64, 48) * s + b
    assert fitted < 0.8 * proxy_error(W, rounded, H)


def test_the_fit_is_the_same_over_row_pieces_held_apart() -> None:
    """Two LocalPieces holding alternate pieces (as two workers would), driven as one,
    give the pieces of a fit held together: the same bytes."""
    W, H = problem(48, 32, seed=5)
    scheme, config = VectorScheme(vector_len=4, num_centroids=16, num_res_centroids=4), VPTQConfig()
    ranges = [(0, 16), (16, 32), (32, 48)]
    together = LocalPieces.of(W, ranges, H, scheme, config)
    books, error = fit_pieces(together, scheme, config, *W.shape)

    class Apart:
        """Pieces 0 and 2 in one place, 1 in another: results merged in row order."""

        def __init__(self) -> None:
            self.parts = [LocalPieces.of(W, [r], H, scheme, config) for r in ranges]

        def __getattr__(self, op: str):
            def each(*args):
                results = [getattr(p, op)(*args) for p in self.parts]
                return None if results[0] is None else [r for rs in results for r in rs]

            return each

        def initial_books(self, *args):
            return self.parts[1].initial_books(*args)

    apart = Apart()
    books_apart, error_apart = fit_pieces(apart, scheme, config, *W.shape)
    assert torch.equal(books.centroids, books_apart.centroids) and error == pytest.approx(error_apart, rel=1e-6)
    for p, (w1,) in zip(together.weights(books), (p.weights(books_apart) for p in apart.parts), strict=True):
        for name, t in p.tensors().items():
            assert torch.equal(t, w1.tensors()[name]), name


def test_bits_per_weight_count_indices_codebooks_and_normalisation() -> None:
    s = VectorScheme(vector_len=4, num_centroids=256, num_res_centroids=16)
    # 12-bit indices of 576 columns: 216 words per vector row; two fp16 codebooks; perm, scale, bias
    expected = (144 * 216 * 32 + (256 + 16) * 4 * 16 + 576 * 16 * 3) / (576 * 576)
    assert s.bits_per_weight(576, 576) == pytest.approx(expected)
    assert 3.0 < expected < 3.2


def test_vector_linear_runs_the_decoded_weight() -> None:
    scheme = VectorScheme(vector_len=4, num_centroids=32, num_res_centroids=8)
    vw = random_weight(16, 24, scheme, seed=6)
    x = torch.randn(3, 24)
    bias = torch.randn(16)
    expected = x @ decode(vw).T + bias
    for backend in ("reference", "cpu"):
        y = VectorLinear(vw, bias, backend)(x)
        assert torch.allclose(y, expected, rtol=1e-5, atol=1e-5), backend
    assert torch.equal(dequantize(vw), decode(vw))


# ---- the pipeline -----------------------------------------------------------------------
TINY_VPTQ = {"algorithm": "vptq", "vptq": {"vector_len": 4, "num_centroids": 64, "kmeans_iters": 3}}


def test_a_vptq_recipe_is_checked_before_work(tmp_path, small_model) -> None:
    from pipeline.errors import LaminaError
    from pipeline.plan import make_plan

    with pytest.raises(LaminaError, match="vptq options are set but algorithm is gptq"):
        parse(small_recipe_doc(tmp_path, small_model, scheme={"vptq": {"vector_len": 4}}))
    with pytest.raises(LaminaError, match="num_centroids must be a power of two"):
        parse(small_recipe_doc(tmp_path, small_model, scheme={"algorithm": "vptq", "vptq": {"num_centroids": 100}}))
    doc = small_recipe_doc(tmp_path, small_model, scheme={"algorithm": "vptq", "vptq": {"vector_len": 5}})
    with pytest.raises(LaminaError, match=r"vector_len 5 does not divide output size 576 .* 28 linears"):
        make_plan(parse(doc))
    doc = small_recipe_doc(tmp_path, small_model, scheme=TINY_VPTQ, export=[{"format": "aqlm", "output": "x"}])
    with pytest.raises(LaminaError, match=r"format aqlm cannot hold scheme\.algorithm vptq"):
        make_plan(parse(doc))
    assert (
        parse(small_recipe_doc(tmp_path, small_model, scheme={**TINY_VPTQ, "solve_rows": 510})).scheme.piece_rows == 508
    )


def test_vptq_runs_distributed_to_the_same_bytes_and_evaluates_on_its_kernels(
    tmp_path, ray_cluster, small_model, docs_dir
) -> None:
    """One and two workers give the same shards (the 1536-row linears cut into 3 pieces
    that share codebooks and normalisation, fit across the workers); eval runs the
    vector linears through the CPU kernel."""
    from pipeline.driver import quantize
    from pipeline.evaluate import evaluate
    from pipeline.recipe import EvalData, Resources
    from tests.test_distributed import shard_hashes

    reports = {}
    for workers in (1, 2):
        doc = small_recipe_doc(tmp_path / f"w{workers}", small_model, scheme=TINY_VPTQ, resources={"workers": workers})
        reports[workers] = quantize(parse(doc), progress=False)
    assert shard_hashes(reports[1].output) == shard_hashes(reports[2].output)
    with safe_open(f"{reports[2].output}/model-00001-of-00005.safetensors", "pt") as f:
        indices = f.get_tensor("model.layers.0.mlp.gate_proj.indices")
        books = f.get_tensor("model.layers.0.mlp.gate_proj.centroids")
    assert indices.shape == (1, 1536 // 4, 576 * 6 // 32) and books.shape == (1, 64 * 4)
    main, _ = unpack_indices(indices, 576, 6)
    assert all(len(main[0, a : a + 128].unique()) > 32 for a in (0, 128, 256))  # every piece uses the shared book
    data = EvalData(source=str(docs_dir / "tutorial"), glob="*.rst.txt", tokens=1024, window=512, long_window=512)
    result = evaluate(reports[2].output, data, Resources(workers=2), against=str(small_model), progress=False)
    assert result.kernel == "cpu"
    (short,) = result.contexts
    # the 4-block copy's perplexity is in the tens of millions either way, and which side is
    # higher moved with this machine's package set (a6a91f0 failed here too): KL is what counts
    assert 0 < short.kl < 5 and short.perplexity != short.reference["perplexity"]
