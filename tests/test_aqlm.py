"""AQLM: the codebook format's storage, each step of the fit checked against brute force
on problems small enough to enumerate, the CPU lookup kernel against the reference, and
the whole pipeline on the 4-block model (deterministic for any worker count, evaluated
on the kernels, exported)."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open

from algorithms.aqlm import AQLMConfig, LocalPieces, Shard, fit, fit_scales, loss, search_codes, update_codebooks
from algorithms.codebook import CodebookScheme, CodebookWeight, decode, load_codes, store_codes
from kernels import CodebookLinear, codebook_cpu, quant_linear
from pipeline.recipe import parse
from tests.conftest import small_recipe_doc


def problem(rows: int, inp: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """W [rows, in] and a correlated positive definite H [in, in]."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(4 * inp, inp, generator=g) @ (torch.eye(inp) + 0.3 * torch.randn(inp, inp, generator=g))
    return torch.randn(rows, inp, generator=g), X.T @ X / len(X)


def random_weight(out: int, inp: int, scheme: CodebookScheme, seed: int) -> CodebookWeight:
    g = torch.Generator().manual_seed(seed)
    M, K, gs = scheme.num_codebooks, scheme.codebook_size, scheme.in_group_size
    codes = torch.randint(0, K, (out, inp // gs, M), generator=g)
    return CodebookWeight(
        codes=store_codes(codes, scheme.nbits_per_codebook),
        codebooks=(torch.randn(M, K, 1, gs, generator=g) * 0.1).half(),
        scales=(torch.rand(out, 1, 1, 1, generator=g) + 0.5).half(),
    )


@pytest.mark.parametrize("nbits", [4, 8, 12, 16])
def test_codes_are_stored_signed_and_read_back_exactly(nbits: int) -> None:
    codes = torch.arange(2**nbits)
    stored = store_codes(codes, nbits)
    assert stored.dtype == (torch.int8 if nbits <= 8 else torch.int16)
    assert torch.equal(load_codes(stored, nbits), codes)
    assert int(stored.min()) == -(2 ** (nbits - 1))  # as aqlm's pack_int_data stores them


def test_decode_is_the_scaled_sum_of_codewords() -> None:
    cw = random_weight(5, 16, CodebookScheme(num_codebooks=2, nbits_per_codebook=3, in_group_size=4), seed=0)
    W = decode(cw)
    codes = load_codes(cw.codes, 3)
    for o, j in itertools.product(range(5), range(4)):
        group = sum(cw.codebooks[m, codes[o, j, m], 0].float() for m in range(2)) * cw.scales[o].float()
        assert torch.equal(W[o, 4 * j : 4 * j + 4], group.reshape(-1))


def test_code_search_leaves_no_single_group_change_that_helps() -> None:
    """With one codebook the search is exact per group: once a sweep changes nothing, no
    group's code can be swapped for another to lower the error (all of them tried)."""
    W, H = problem(6, 12, seed=1)
    books = torch.randn(1, 8, 3)  # [M, K, g]
    shard = Shard(W=W, codes=torch.zeros(6, 4, 1, dtype=torch.int64), scales=torch.ones(6))
    found = search_codes(shard, books, H, beam=1)
    for _ in range(50):  # sweep until no code changes (the error falls strictly at every change)
        again = search_codes(found, books, H, beam=1)
        if torch.equal(again.codes, found.codes):
            break
        found = again
    assert torch.equal(again.codes, found.codes)
    best = loss(found, books, H)
    assert best < loss(shard, books, H)
    for i, j, k in itertools.product(range(6), range(4), range(8)):
        codes = found.codes.clone()
        codes[i, j, 0] = k
        assert loss(replace(found, codes=codes), books, H) >= best - 1e-4 * abs(best)


def test_beam_search_over_two_codebooks_finds_the_best_pair_with_a_full_beam() -> None:
    """With a beam as wide as one codebook, the search over two codebooks of one group is
    exhaustive: it matches the best of all K^2 pairs."""
    W, H = problem(3, 4, seed=2)
    books = torch.randn(2, 6, 4)  # one group of 4, two codebooks of 6
    shard = Shard(W=W, codes=torch.zeros(3, 1, 2, dtype=torch.int64), scales=torch.ones(3))
    found = search_codes(shard, books, H, beam=6)
    for i in range(3):
        row = replace(shard, W=W[i : i + 1], codes=found.codes[i : i + 1], scales=torch.ones(1))
        pairs = [torch.tensor([[[a, b]]]) for a in range(6) for b in range(6)]
        brute = min(loss(replace(row, codes=c), books, H) for c in pairs)
        assert loss(row, books, H) == pytest.approx(brute, rel=1e-5)


def test_codebook_update_reaches_the_least_squares_optimum() -> None:
    """With codes and scales fixed the error is quadratic in the codebooks: CG from any
    start reaches the solution of the normal equations built column by column."""
    W, H = problem(7, 8, seed=3)
    g = torch.Generator().manual_seed(3)
    shard = Shard(W=W, codes=torch.randint(0, 3, (7, 4, 2), generator=g), scales=torch.rand(7, generator=g) + 0.5)
    books = torch.randn(2, 3, 2, generator=g)  # 12 unknowns
    fitted = update_codebooks(LocalPieces([shard], [0], H, 2), books, iters=40)
    n = books.numel()

    def err(flat: torch.Tensor) -> float:
        return loss(shard, flat.reshape(books.shape), H)

    # err(c) = c^T A c - 2 b^T c + const: A and b from evaluations of L (exact for a quadratic)
    base = err(torch.zeros(n, dtype=torch.float64).float())
    eye = torch.eye(n)
    A = torch.zeros(n, n, dtype=torch.float64)
    for a in range(n):
        for b in range(n):
            A[a, b] = (err(eye[a] + eye[b]) - err(eye[a]) - err(eye[b]) + base) / 2
    b_vec = torch.tensor([(err(-eye[a]) - err(eye[a])) / 4 for a in range(n)], dtype=torch.float64)
    optimum = torch.linalg.lstsq(A, b_vec).solution
    assert err(fitted.reshape(-1)) == pytest.approx(err(optimum.float()), rel=1e-3)
    assert err(fitted.reshape(-1)) < err(books.reshape(-1))


def test_scales_are_the_best_float16_scales() -> None:
    W, H = problem(5, 16, seed=4)
    books = torch.randn(1, 4, 4)
    shard = Shard(W=W, codes=torch.randint(0, 4, (5, 4, 1)), scales=torch.ones(5))
    fitted = fit_scales(shard, books, H)
    assert torch.equal(fitted.scales, fitted.scales.half().float())
    for i in range(5):
        for step in (-1, 1):  # the neighbouring float16 values
            s = fitted.scales.clone()
            s[i] = torch.nextafter(s[i].half(), torch.tensor(step * 1e4).half()).float()
            assert loss(replace(fitted, scales=s), books, H) >= loss(fitted, books, H) * (1 - 1e-6)


@pytest.mark.parametrize("scheme", [CodebookScheme(2, 4, 4), CodebookScheme(1, 8, 8)], ids=lambda s: s.name)
def test_the_fit_never_raises_the_error_and_is_deterministic(scheme: CodebookScheme) -> None:
    W, H = problem(48, 64, seed=5)
    cw, history = fit(W, H, scheme, AQLMConfig(max_iters=5, rel_tol=0))
    assert all(b <= a * (1 + 1e-6) for a, b in itertools.pairwise(history)), history
    assert history[-1] < 0.8 * history[0]
    again, _ = fit(W, H, scheme, AQLMConfig(max_iters=5, rel_tol=0))
    assert all(torch.equal(a, b) for a, b in zip(cw.tensors().values(), again.tensors().values(), strict=True))
    assert cw.codes.shape == (48, 64 // scheme.in_group_size, scheme.num_codebooks)
    assert cw.codebooks.dtype == cw.scales.dtype == torch.float16


def test_bits_per_weight_count_codes_scales_and_codebooks() -> None:
    assert CodebookScheme(2, 8, 8).bits_per_weight(8192, 8192) == pytest.approx(
        2 + 16 / 8192 + 2 * 256 * 8 * 16 / 8192**2
    )
    assert CodebookScheme(1, 16, 8).bits_per_weight(8192, 8192) > 2.12  # a 65536 x 8 codebook is 1/8 bit at 70B


@pytest.mark.parametrize("scheme", [CodebookScheme(2, 8, 8), CodebookScheme(1, 16, 8), CodebookScheme(2, 4, 16)])
@pytest.mark.parametrize("rows", [1, 3, 40])
def test_codebook_linear_kernels_match_the_reference(scheme: CodebookScheme, rows: int) -> None:
    cw = random_weight(300, 64, scheme, seed=rows)
    bias = torch.randn(300)
    x = torch.randn(2, rows, 64)
    expected = x @ decode(cw).T + bias
    ref = CodebookLinear(cw, bias)
    assert torch.allclose(ref(x), expected, atol=1e-5)
    assert torch.equal(ref.dense()(x), ref(x))
    cpu = quant_linear(cw, bias, backend="cpu")
    assert isinstance(cpu, CodebookLinear)
    assert torch.allclose(cpu(x), expected, rtol=1e-4, atol=1e-4)
    lookup = codebook_cpu.layout(cw, x.device)
    expected1 = x[0, :1] @ decode(cw).T
    assert torch.allclose(codebook_cpu.linear(x[0, :1], lookup, None), expected1, rtol=1e-4, atol=1e-4)


# ---- the pipeline -----------------------------------------------------------------------
TINY_AQLM = {"algorithm": "aqlm", "aqlm": {"nbits_per_codebook": 4, "max_iters": 1, "kmeans_iters": 2}}


def test_a_codebook_recipe_is_checked_before_work(tmp_path, small_model) -> None:
    from pipeline.errors import LaminaError
    from pipeline.plan import make_plan

    with pytest.raises(LaminaError, match="aqlm options are set but algorithm is gptq"):
        parse(small_recipe_doc(tmp_path, small_model, scheme={"aqlm": {"num_codebooks": 1}}))
    doc = small_recipe_doc(tmp_path, small_model, scheme={**TINY_AQLM, "aqlm": {"in_group_size": 7}})
    with pytest.raises(LaminaError, match=r"in_group_size 7 does not divide the input size of 28 linears"):
        make_plan(parse(doc))
    doc = small_recipe_doc(tmp_path, small_model, scheme=TINY_AQLM, export=[{"format": "gptq", "output": "x"}])
    with pytest.raises(LaminaError, match=r"format gptq cannot hold scheme\.algorithm aqlm"):
        make_plan(parse(doc))


def test_aqlm_runs_distributed_to_the_same_bytes_and_evaluates_on_its_kernels(
    tmp_path, ray_cluster, small_model, docs_dir
) -> None:
    """One and two workers give the same shards (the 1536-row linears cut into 3 pieces
    that share codebooks, fit across the workers); eval runs the codebook linears through
    the CPU kernel; the aqlm export is written."""
    from pipeline.driver import quantize
    from pipeline.evaluate import evaluate
    from pipeline.export import export
    from pipeline.recipe import EvalData, Resources
    from storage.manifest import read_manifest
    from tests.test_distributed import shard_hashes

    reports = {}
    for workers in (1, 2):
        doc = small_recipe_doc(tmp_path / f"w{workers}", small_model, scheme=TINY_AQLM, resources={"workers": workers})
        reports[workers] = quantize(parse(doc), progress=False)
    assert shard_hashes(reports[1].output) == shard_hashes(reports[2].output)
    # gate_proj's 1536 rows were fit as 3 pieces of 512 (solve_rows) on different workers: one codebook
    with safe_open(f"{reports[2].output}/model-00001-of-00005.safetensors", "pt") as f:
        codes, books = (
            f.get_tensor("model.layers.0.mlp.gate_proj.codes"),
            f.get_tensor("model.layers.0.mlp.gate_proj.codebooks"),
        )
    assert codes.shape == (1536, 576 // 8, 2) and books.shape == (2, 16, 1, 8)
    assert len(load_codes(codes, 4).unique()) > 8  # the pieces use the shared codewords
    config = read_manifest(reports[1].output)
    data = EvalData(source=str(docs_dir / "tutorial"), glob="*.rst.txt", tokens=1024, window=512, long_window=512)
    result = evaluate(reports[2].output, data, Resources(workers=2), against=str(small_model), progress=False)
    assert result.kernel == "cpu"
    (short,) = result.contexts
    assert 0 < short.kl < 5 and short.perplexity > short.reference["perplexity"]
    export(reports[2].output, "aqlm", str(tmp_path / "hf"), progress=False)
    assert read_manifest(str(tmp_path / "hf"))["recipe_hash"] == config["recipe_hash"]
