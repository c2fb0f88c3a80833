"""QuIP / QuIP#: the Hadamard transforms and the E8P codebook against their definitions,
the rotation's exact inverse, LDLQ's feedback, row pieces, the kernels, the recipe's
refusals, and the pipeline on the 4-block model (the same bytes for any worker count,
evaluated on the kernels)."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from algorithms import e8p, hadamard
from algorithms.gptq import prepare as gptq_prepare
from algorithms.hessian import proxy_error
from algorithms.quip import (
    QuipConfig,
    QuipScheme,
    decode,
    ldlq_e8p,
    quip,
    quip_rows,
    restore,
    rotate_hessian,
    rotate_weight,
    rotated,
    signs,
)
from algorithms.quip import prepare as quip_prepare
from kernels import IncoherentLinear
from pipeline.errors import LaminaError
from pipeline.recipe import parse
from tests.conftest import small_recipe_doc
from tests.test_aqlm import problem

# ---- Hadamard transforms ---------------------------------------------------------------


@pytest.mark.parametrize(("n", "h"), [(64, 1), (12, 12), (192, 12), (576, 36), (1536, 12), (112, 28), (4864, 76)])
def test_hadamard_of_model_sizes_is_orthogonal_with_equal_magnitudes(n: int, h: int) -> None:
    """Paley I (12 = 11 + 1), Paley II (36 = 2 (17 + 1), 28, 76) times Sylvester powers of two:
    Had Had^T = I and every entry +-1/sqrt(n), applied fast equal to the dense product."""
    assert hadamard.factor(n) == (h, n // h)
    M = hadamard.matrix(n)
    assert torch.allclose(M @ M.T, torch.eye(n, dtype=M.dtype), atol=1e-12)
    assert torch.allclose(M.abs(), torch.full_like(M, n**-0.5), atol=1e-12)
    x = torch.randn(3, n, dtype=torch.float64)
    assert torch.allclose(hadamard.apply(x), x @ M.T, atol=1e-12)
    assert torch.allclose(hadamard.apply(x, transpose=True), x @ M, atol=1e-12)


def test_hadamard_factors_of_large_model_sizes_and_a_refusal() -> None:
    """Llama-3 8B/70B (14336, 28672), 405B (53248 = 104 x 512), Qwen2.5-72B (29568 = 924 x 32)."""
    assert hadamard.factor(14336) == (28, 512) and hadamard.factor(28672) == (28, 1024)
    assert hadamard.factor(53248) == (104, 512) and hadamard.factor(29568) == (924, 32)
    for h in (28, 104, 924):
        P = hadamard.paley(h)
        assert torch.equal(P @ P.T, h * torch.eye(h, dtype=P.dtype))
    with pytest.raises(ValueError, match=r"size 255255 .* no Hadamard transform"):
        hadamard.factor(255255)
    assert QuipScheme().misfit(255255, 64).startswith("output size 255255")


# ---- E8P ---------------------------------------------------------------------------------


def test_e8p_codebook_is_65536_distinct_points_of_e8_plus_a_quarter() -> None:
    g = e8p.grid()  # [65536, 8]
    assert g.shape == (65536, 8) and len(torch.unique(g, dim=0)) == 65536
    assert len(e8p.absolute()) == 256 and len(torch.unique(e8p.absolute(), dim=0)) == 256
    for t in (0.25, -0.25):
        half = g[(g - t - 0.5).remainder(1).eq(0).all(-1)] - t  # the points shifted by t: in D8 + 1/2
        assert len(half) == 32768
        assert ((half * 2).remainder(2) == 1).all() and (half.sum(-1).remainder(2) == 0).all()
    assert (g - g.mean(0)).square().sum(-1).max() <= 12 + 2 * 0.25 * 8**0.5 * 12**0.5 + 0.5


def test_e8p_nearest_equals_exhaustive_search_and_every_point_is_its_own_code() -> None:
    g = e8p.grid()
    x = torch.randn(3000, 8, generator=torch.Generator().manual_seed(0)) * 1.3
    codes = e8p.nearest(x).long()
    exhaustive = (2 * x @ g.T - g.square().sum(-1)).argmax(-1)
    assert torch.allclose((x - g[codes]).square().sum(-1), (x - g[exhaustive]).square().sum(-1), atol=1e-5)
    assert torch.equal(e8p.nearest(g).long(), torch.arange(65536))


# ---- the rotation and LDLQ ---------------------------------------------------------------


def test_rotation_is_exactly_invertible_and_keeps_the_proxy_loss() -> None:
    W, H = problem(192, 576, 0)
    su, sv = signs(192, 576, 7)
    Wt, Ht = rotate_weight(W, su, sv), rotate_hessian(H, sv)
    assert (restore(Wt, su, sv) - W).abs().max() < 1e-5
    Q = torch.randn_like(W)
    a = proxy_error(W, Q, H)
    b = proxy_error(Wt, rotate_weight(Q, su, sv), Ht)
    assert b == pytest.approx(a, rel=1e-4)


def test_ldlq_with_identity_hessian_is_nearest_rounding_and_feedback_helps_on_correlated_h() -> None:
    W, H = problem(64, 128, 1)
    eye = quip_prepare(torch.eye(128), QuipConfig(damp=1e-6)).solve  # the rotation of I is I
    codes, _ = ldlq_e8p(W, eye)
    assert torch.equal(codes, e8p.nearest(W.reshape(-1, 8)).reshape(64, 16))
    _, with_feedback = ldlq_e8p(W, gptq_prepare(H))
    fed = proxy_error(W, with_feedback, H)
    plain = proxy_error(W, e8p.decode(e8p.nearest(W.reshape(-1, 8))).reshape(64, 128), H)
    assert fed < 0.7 * plain, (fed, plain)  # measured 0.53


def test_row_pieces_rotated_apart_give_the_same_bytes_as_the_whole() -> None:
    W, H = problem(96, 128, 2)
    for scheme in (QuipScheme(), QuipScheme("scalar", 2, 32, False)):
        whole = quip(W, H, scheme)
        pieces = [quip_rows(W, a, b, H, scheme)[0] for a, b in ((0, 40), (40, 96))]
        for name, t in whole.tensors().items():
            if name == "sv":
                assert all(torch.equal(p.sv, t) for p in pieces)
            else:
                assert torch.equal(torch.cat([p.tensors()[name] for p in pieces]), t), name


def test_e8p_error_is_the_fits_own_account_and_beats_scalar_2bit() -> None:
    W, H = problem(128, 256, 3)
    qw, Wt, Ht = quip_rows(W, 0, 128, H, QuipScheme())
    err = proxy_error(W, decode(qw), H)
    assert err == pytest.approx(proxy_error(Wt, rotated(qw), Ht), rel=1e-3)
    scalar = proxy_error(W, decode(quip(W, H, QuipScheme("scalar", 2, 0, False))), H)
    assert err < 0.7 * scalar, (err, scalar)
    assert QuipScheme().bits_per_weight(128, 256) == pytest.approx(2 + 16 / 256 + 8 * 384 / (128 * 256))


# ---- kernels -----------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", [QuipScheme(), QuipScheme("scalar", 3, 64, True)], ids=lambda s: s.name)
def test_incoherent_linear_reference_and_cpu_equal_the_decoded_weight(scheme: QuipScheme) -> None:
    W, H = problem(192, 576, 4)
    qw = quip(W, H, scheme)
    bias = torch.randn(192)
    x = torch.randn(2, 5, 576)
    want = x @ decode(qw).T + bias
    for backend in ("reference", "cpu"):
        got = IncoherentLinear(qw, bias, backend)(x)
        assert got.shape == (2, 5, 192) and torch.allclose(got, want, atol=2e-4), backend
    layer = IncoherentLinear(qw, bias)
    assert set(dict(layer.named_buffers())) == {*qw.tensors(), "bias"}
    assert torch.equal(layer.dense().weight, decode(qw))


# ---- recipes and the pipeline --------------------------------------------------------------


def test_a_quip_recipe_is_checked_before_work(tmp_path, small_model) -> None:
    from pipeline.plan import make_plan

    with pytest.raises(LaminaError, match="quip options are set but algorithm is gptq"):
        parse(small_recipe_doc(tmp_path, small_model, scheme={"quip": {"codebook": "e8p"}}))
    with pytest.raises(LaminaError, match=r"scheme\.quip\.codebook"):
        parse(small_recipe_doc(tmp_path, small_model, scheme={"algorithm": "quip", "quip": {"codebook": "d4"}}))
    doc = small_recipe_doc(
        tmp_path, small_model, scheme={"algorithm": "quip"}, export=[{"format": "gptq", "output": str(tmp_path / "x")}]
    )
    with pytest.raises(LaminaError, match="quip has no export format"):
        make_plan(parse(doc))
    scalar = {"algorithm": "quip", "quip": {"codebook": "scalar"}, "group_size": 256}
    scalar = parse(small_recipe_doc(tmp_path, small_model, scheme=scalar))
    with pytest.raises(LaminaError, match=r"scheme\.quip: group size 256 does not divide input size 576"):
        make_plan(scalar)
    assert not (tmp_path / "artifact").exists()


def test_quip_pipeline_gives_the_same_bytes_on_one_and_two_workers_and_evaluates_on_the_kernels(
    tmp_path, ray_cluster, small_model, docs_dir
) -> None:
    """The 1536-row gate/up projections are solved as 3 row pieces, each rotating the whole
    weight; the artifact is evaluated through the incoherent linears on the CPU kernel."""
    from pipeline.cli import main
    from pipeline.driver import quantize
    from pipeline.evaluate import evaluate
    from pipeline.recipe import EvalData, Resources
    from tests.test_distributed import shard_hashes

    reports = {}
    for workers in (1, 2):
        doc = small_recipe_doc(
            tmp_path / f"w{workers}", small_model, scheme={"algorithm": "quip"}, resources={"workers": workers}
        )
        reports[workers] = quantize(parse(doc), progress=False)
    assert shard_hashes(reports[1].output) == shard_hashes(reports[2].output)
    with safe_open(f"{reports[2].output}/model-00001-of-00005.safetensors", "pt") as f:
        qidxs = f.get_tensor("model.layers.0.mlp.gate_proj.qidxs")
        su = f.get_tensor("model.layers.0.mlp.gate_proj.su")
        assert f.get_tensor("model.layers.0.mlp.gate_proj.scales").shape == (1536, 1)
    assert qidxs.shape == (1536, 72) and qidxs.dtype == torch.int16
    assert torch.equal(su, signs(1536, 576, 0)[0])  # the three pieces' signs joined in row order
    data = EvalData(source=str(docs_dir / "tutorial"), glob="*.rst.txt", tokens=1024, window=512, long_window=512)
    result = evaluate(reports[2].output, data, Resources(workers=2), against=str(small_model), progress=False)
    assert result.kernel == "cpu"
    (short,) = result.contexts
    assert 0 < short.kl < 5 and short.perplexity > short.reference["perplexity"]
    assert main(["export", reports[2].output, "--format", "gptq", str(tmp_path / "exported")]) != 0
    assert not (tmp_path / "exported").exists()
