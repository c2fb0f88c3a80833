"""Properties of the quantization math, on random weights and on a real layer."""

from __future__ import annotations

import pytest
import torch

from algorithms import GPTQConfig, QuantizedWeight, UniformScheme, gptq, rtn
from algorithms.hessian import input_gram, proxy_error
from algorithms.packing import pack, unpack
from kernels import QuantLinear
from kernels.reference import dequantize

SCHEMES = [
    UniformScheme(bits=b, group_size=g, sym=s) for b in (2, 3, 4, 8) for g in (0, 32, 64, 128) for s in (True, False)
]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_unpack_round_trip_is_exact(bits: int) -> None:
    codes = torch.randint(0, 2**bits, (7, 576), generator=torch.Generator().manual_seed(bits))
    packed = pack(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (7, 576 * bits // 32)
    assert torch.equal(unpack(packed, bits).long(), codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packing_is_the_little_endian_bit_stream(bits: int) -> None:
    """Independent of the vectorised code: each row as one Python integer, cut into words."""
    codes = torch.randint(0, 2**bits, (3, 96), generator=torch.Generator().manual_seed(10 + bits))
    packed = pack(codes, bits)
    for row in range(3):
        stream = sum(int(c) << (j * bits) for j, c in enumerate(codes[row]))
        words = [(stream >> (32 * w)) & 0xFFFFFFFF for w in range(96 * bits // 32)]
        assert [int(v) & 0xFFFFFFFF for v in packed[row]] == words


def test_three_bit_codes_need_whole_runs_of_32() -> None:
    with pytest.raises(ValueError, match="not a multiple of 32"):
        pack(torch.zeros(2, 48, dtype=torch.int64), 3)


def test_pack_refuses_codes_out_of_range() -> None:
    with pytest.raises(ValueError, match="out of range"):
        pack(torch.full((2, 8), 16), 4)


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
def test_rtn_error_is_within_half_a_step(scheme: UniformScheme) -> None:
    W = torch.randn(16, 256, generator=torch.Generator().manual_seed(0))
    qw = rtn(W, scheme)
    step = qw.scales.float().repeat_interleave(qw.group_size, dim=1)  # [out, in]
    err = (dequantize(qw) - W).abs()
    inside = err <= step / 2 + 1e-6
    # a symmetric grid clips the largest positive value by up to one step; nothing else may exceed half a step
    assert inside.float().mean() > 0.98
    assert (err <= step + 1e-6).all()


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("scheme", SCHEMES[::3], ids=str)
def test_gptq_with_identity_hessian_equals_rtn(scheme: UniformScheme, act_order: bool) -> None:
    W = torch.randn(32, 128, generator=torch.Generator().manual_seed(1))
    a, b = rtn(W, scheme), gptq(W, torch.eye(128), scheme, GPTQConfig(act_order=act_order))
    assert torch.equal(a.qweight, b.qweight)
    assert torch.equal(a.scales, b.scales) and torch.equal(a.zeros, b.zeros)


def test_gptq_is_deterministic() -> None:
    g = torch.Generator().manual_seed(2)
    W, X = torch.randn(64, 128, generator=g), torch.randn(500, 128, generator=g)
    H = input_gram(X)
    a, b = gptq(W, H, UniformScheme(bits=4, group_size=32)), gptq(W, H, UniformScheme(bits=4, group_size=32))
    assert all(torch.equal(x, y) for x, y in zip(a.tensors().values(), b.tensors().values(), strict=True))


def test_quant_linear_matches_dequantized_matmul() -> None:
    W = torch.randn(48, 128, generator=torch.Generator().manual_seed(3))
    qw = rtn(W, UniformScheme(bits=4, group_size=64))
    bias = torch.randn(48)
    x = torch.randn(5, 128)
    assert torch.allclose(QuantLinear(qw, bias)(x), x @ dequantize(qw).T + bias, atol=1e-5)
    dense = QuantLinear(qw, bias).dense()
    assert torch.equal(dense(x), QuantLinear(qw, bias)(x)) and not dense.weight.requires_grad


@pytest.mark.parametrize("width", [5, 128, 300])
def test_input_gram_is_x_transpose_x_and_symmetric(width: int) -> None:
    """Blocks above the diagonal are computed and mirrored: the result is still X^T X."""
    X = torch.randn(3, 70, width, generator=torch.Generator().manual_seed(width))  # [seqs, T, in]
    H = input_gram(X)
    flat = X.reshape(-1, width).double()
    assert torch.allclose(H.double(), flat.T @ flat, rtol=1e-5, atol=1e-3) and torch.equal(H, H.T)


@pytest.fixture(scope="module")
def real_block(model_dir, docs_dir):
    """Block 3 of the fixture model with real calibration activations (fp inputs from blocks 0-2)."""
    from pipeline.architectures import ARCHITECTURES
    from pipeline.data import load_tokenizer, sequences, token_stream
    from workers.block import BlockRunner

    stream = token_stream(
        uri=str(docs_dir / "library"),
        pattern="*.rst.txt",
        tokenizer=load_tokenizer(str(model_dir)),
        needed=16 * 256,
        what="calibration",
    )
    runner = BlockRunner(model_uri=str(model_dir), layout=ARCHITECTURES["llama"], threads=2)
    runner.set_inputs({0: sequences(stream, count=16, length=256)})
    for i in range(3):
        runner.load_block(i)
        runner.forward()
    runner.load_block(3)
    return runner, runner.calibrate(1)[0][2]


@pytest.fixture(scope="module")
def down_proj_11(model_dir, docs_dir):
    """W and H of block 11's down_proj (fp inputs from blocks 0-10): a layer whose columns the
    solve moves far from their starting range (act-order's first columns carry large errors)."""
    from pipeline.architectures import ARCHITECTURES
    from pipeline.data import load_tokenizer, sequences, token_stream
    from workers.block import BlockRunner

    stream = token_stream(
        uri=str(docs_dir / "library"),
        pattern="*.rst.txt",
        tokenizer=load_tokenizer(str(model_dir)),
        needed=16 * 256,
        what="calibration",
    )
    runner = BlockRunner(model_uri=str(model_dir), layout=ARCHITECTURES["llama"], threads=2)
    runner.set_inputs({0: sequences(stream, count=16, length=256)})
    for i in range(11):
        runner.load_block(i)
        runner.forward()
    runner.load_block(11)
    H = torch.from_numpy(runner.calibrate(1, ["mlp.down_proj"])[0][2]["mlp.down_proj"]) / (16 * 256)
    return runner.layer.mlp.down_proj.weight.detach(), H


@pytest.mark.parametrize("bits", [3, 4])
def test_static_groups_choose_each_grid_when_the_solve_reaches_the_group(down_proj_11, bits: int) -> None:
    """Grids fixed from the weights before the solve clamp the columns the solve has moved:
    measured 10x the error of groups in solve order on this layer (30888 vs 2975 at 3 bits),
    and 51.1 perplexity at 3-bit g64 against 22.96. Chosen at the group's first solved
    column from the updated weights, static groups measured 398 here (and 21.92)."""
    W, H = down_proj_11
    scheme = UniformScheme(bits=bits, group_size=64)
    dynamic = proxy_error(W, dequantize(gptq(W, H, scheme, GPTQConfig(act_order=True))), H)
    qw = gptq(W, H, scheme, GPTQConfig(act_order=True, static_groups=True))
    assert qw.g_idx is None
    static = proxy_error(W, dequantize(qw), H)
    assert static < 1.5 * dynamic, (static, dynamic)
    assert static < 0.2 * proxy_error(W, dequantize(rtn(W, scheme)), H)


@pytest.mark.parametrize("linear", ["self_attn.q_proj", "mlp.down_proj"])
@pytest.mark.parametrize(
    "scheme",
    [
        UniformScheme(bits=4, group_size=64),
        UniformScheme(bits=3, group_size=64),
        UniformScheme(bits=2, group_size=64, sym=False),
        UniformScheme(bits=8, group_size=0),
    ],
    ids=str,
)
def test_gptq_beats_rtn_on_a_real_layer(real_block, linear: str, scheme: UniformScheme) -> None:
    runner, hessians = real_block
    W = runner.layer.get_submodule(linear).weight.detach()
    H = torch.from_numpy(hessians[runner.layout.group_of(linear)])
    rtn_err = proxy_error(W, dequantize(rtn(W, scheme)), H)
    for act_order, static_groups in ((False, False), (True, False), (True, True)):
        qw = gptq(W, H, scheme, GPTQConfig(act_order=act_order, static_groups=static_groups))
        assert (qw.g_idx is not None) == (act_order and not static_groups and scheme.group_size > 0)
        gptq_err = proxy_error(W, dequantize(qw), H)
        assert gptq_err < 0.9 * rtn_err, (act_order, static_groups, gptq_err, rtn_err)


def test_damping_grows_until_the_hessian_factors_and_says_so(caplog) -> None:
    from algorithms.gptq import inverse_cholesky

    gen = torch.Generator().manual_seed(0)
    X = torch.randn(64, 8, generator=gen)
    H = X.T @ X  # [8, 8], positive definite...
    H[0, 1] = H[1, 0] = 2 * (H[0, 0] * H[1, 1]).sqrt()  # ...until two inputs disagree too much
    with caplog.at_level("WARNING", logger="algorithms.gptq"):
        U = inverse_cholesky(H, damp=0.01)
    raised = [r.getMessage() for r in caplog.records]
    assert raised and raised[0] == "Hessian not positive definite with damp 0.01; retrying with damp 0.1"
    damp = float(raised[-1].rsplit(" ", 1)[1])
    damped = H.double() + damp * H.diagonal().double().mean() * torch.eye(8, dtype=torch.float64)
    assert torch.allclose((U.T.double() @ U.double()), torch.linalg.inv(damped), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="not positive definite even with damp"):
        inverse_cholesky(-torch.eye(8), damp=0.01)


def test_g_idx_assigns_each_column_its_group() -> None:
    gen = torch.Generator().manual_seed(3)
    W, X = torch.randn(16, 128, generator=gen), torch.randn(400, 128, generator=gen) * torch.rand(128, generator=gen)
    qw = gptq(W, input_gram(X), UniformScheme(bits=4, group_size=32), GPTQConfig(act_order=True))
    assert qw.g_idx is not None and qw.g_idx.dtype == torch.int32
    assert torch.equal(torch.bincount(qw.g_idx.long()), torch.full((4,), 32))  # 4 groups of 32 columns
    codes = unpack(qw.qweight, 4).float()  # [16, 128]
    for j in (0, 37, 127):
        g = int(qw.g_idx[j])
        want = qw.scales[:, g].float() * (codes[:, j] - qw.zeros[:, g].float())
        assert torch.equal(dequantize(qw)[:, j], want)
    again = QuantizedWeight.from_tensors(qw.tensors(), bits=4, group_size=32)
    assert torch.equal(dequantize(again), dequantize(qw))


@pytest.mark.parametrize(
    "scheme", [UniformScheme(bits=4, group_size=64), UniformScheme(bits=3, group_size=128, sym=False)], ids=str
)
def test_mse_clipping_lowers_the_rounding_error_and_keeps_gptq_ahead(real_block, scheme: UniformScheme) -> None:
    from algorithms import grid

    runner, hessians = real_block
    W = runner.layer.get_submodule("mlp.down_proj").weight.detach()  # [576, 1536]
    H = torch.from_numpy(hessians[runner.layout.group_of("mlp.down_proj")])
    rows = W.reshape(-1, scheme.group_size)  # [out * groups, width]
    minmax = grid.rounding_error(rows, *grid.find_params(rows, scheme), scheme)  # [rows]
    searched = grid.rounding_error(rows, *grid.find_params(rows, scheme, mse=True), scheme)
    assert (searched <= minmax).all()  # min-max is the search's first candidate
    assert searched.sum() < 0.9 * minmax.sum()
    errors = {
        (algorithm, mse): proxy_error(W, dequantize(qw), H)
        for algorithm in ("rtn", "gptq")
        for mse in (False, True)
        for qw in [rtn(W, scheme, mse=mse) if algorithm == "rtn" else gptq(W, H, scheme, GPTQConfig(mse=mse))]
    }
    assert errors["rtn", True] < errors["rtn", False]
    # measured here: 4-bit g64 3818 vs 4367, 3-bit g128 asym 15465 vs 20185 (RTN: 13394 vs 16405)
    assert errors["gptq", True] < 1.02 * errors["gptq", False]
    assert errors["gptq", True] < 0.9 * errors["rtn", True]


@pytest.mark.parametrize("act_order", [False, True])
def test_a_partial_last_group_is_stored_with_g_idx(act_order: bool) -> None:
    gen = torch.Generator().manual_seed(5)
    W = torch.randn(16, 96, generator=gen)  # group 64 leaves a last group of 32
    scheme = UniformScheme(bits=4, group_size=64, partial_groups=True)
    with pytest.raises(ValueError, match="group size 64 does not divide input size 96"):
        UniformScheme(bits=4, group_size=64).groups(96)
    qw = rtn(W, scheme)
    assert qw.scales.shape == (16, 2) and torch.equal(qw.g_idx, (torch.arange(96) // 64).int())
    step = qw.scales.float()[:, qw.g_idx.long()]  # [16, 96]
    assert ((dequantize(qw) - W).abs() <= step + 1e-6).all()  # half a step, or the clipped top value
    # the short group's grid is its own 32 columns' range: padding did not widen it
    assert torch.allclose(qw.scales[:, 1].float(), 2 * W[:, 64:].abs().amax(dim=1) / 15, rtol=1e-3)
    same = gptq(W, torch.eye(96), scheme, GPTQConfig(act_order=act_order))
    assert torch.equal(dequantize(same), dequantize(qw)) and same.g_idx is not None


def test_a_shared_prepared_hessian_gives_the_same_codes() -> None:
    """q, k and v (and the row ranges of one linear) share prepare(H): the result must be
    the bits of a solve that prepares H itself."""
    from algorithms.gptq import prepare

    g = torch.Generator().manual_seed(3)
    X = torch.randn(512, 96, generator=g) * torch.linspace(0.1, 3, 96)  # [tokens, in]
    X[:, 7] = 0  # a column no input reaches
    H = X.T @ X
    config = GPTQConfig(act_order=True)
    shared = prepare(H, config)
    for rows in (40, 64):
        W = torch.randn(rows, 96, generator=g)
        alone = gptq(W, H, UniformScheme(bits=4, group_size=32), config)
        with_shared = gptq(W, H, UniformScheme(bits=4, group_size=32), config, shared)
        for name, t in alone.tensors().items():
            assert torch.equal(t, with_shared.tensors()[name]), name


def test_aqlm_2bit_beats_gptq_2bit_on_a_real_layer_at_fewer_bits(real_block) -> None:
    """AQLM 2x8 (2.23 bits per weight on this 576-wide layer, codebooks included) against
    GPTQ 2-bit g64 asymmetric (2 + 18/64 = 2.28): measured 0.0086 vs 0.0182 of tr(W H W^T)
    on block 3's q_proj (and 0.0279 vs 0.0541 on down_proj; beam 1: 0.0096 and 0.0317;
    GPTQ 3-bit g64 reaches 0.0029 and 0.0075 at 3.28 bits)."""
    from algorithms.aqlm import fit
    from algorithms.codebook import CodebookScheme, decode

    runner, hessians = real_block
    W = runner.layer.get_submodule("self_attn.q_proj").weight.detach()
    H = torch.from_numpy(hessians[runner.layout.group_of("self_attn.q_proj")])
    grid = UniformScheme(bits=2, group_size=64, sym=False)
    gptq_err = proxy_error(W, dequantize(gptq(W, H, grid, GPTQConfig(act_order=True))), H)
    scheme = CodebookScheme(num_codebooks=2, nbits_per_codebook=8, in_group_size=8)
    cw, history = fit(W, H, scheme)
    assert scheme.bits_per_weight(*W.shape) < 2 + 18 / 64
    aqlm_err = proxy_error(W, decode(cw), H)
    assert aqlm_err == pytest.approx(history[-1], rel=1e-3)  # the fit's own account of its error
    assert aqlm_err < 0.6 * gptq_err, (aqlm_err, gptq_err)


def test_vptq_beats_rtn_and_gptq_2bit_and_matches_gptq_3bit_on_real_layers_at_fewer_bits(real_block) -> None:
    """Block 3's q_proj and down_proj with real calibration Hessians, errors as shares of
    tr(W H W^T): v4 k256 at 2.10-2.13 bits per weight (codebook, perm and normalisation
    included) against 2-bit g64 asymmetric (2.28): measured 0.0097 / 0.0227 vs GPTQ 0.0182
    / 0.0541; v3 k512 at 3.11-3.16 bits against 3-bit g64 (3.28): 0.0030 / 0.0059 vs GPTQ
    0.0029 / 0.0075 (3% above on q_proj, 22% below on down_proj). RTN is far above both."""
    from algorithms.vector import VectorScheme, decode
    from algorithms.vptq import fit

    runner, hessians = real_block
    for linear in ("self_attn.q_proj", "mlp.down_proj"):
        W = runner.layer.get_submodule(linear).weight.detach()
        H = torch.from_numpy(hessians[runner.layout.group_of(linear)])
        for bits, scheme in ((2, VectorScheme(vector_len=4, num_centroids=256)), (3, VectorScheme(3, 512))):
            grid = UniformScheme(bits=bits, group_size=64, sym=False)
            gptq_err = proxy_error(W, dequantize(gptq(W, H, grid, GPTQConfig(act_order=True))), H)
            rtn_err = proxy_error(W, dequantize(rtn(W, grid)), H)
            vw, _ = fit(W, H, scheme)
            assert scheme.bits_per_weight(*W.shape) < bits + 18 / 64
            vptq_err = proxy_error(W, decode(vw), H)
            print(f"{linear} {scheme.name}: {vptq_err:.5f} vs GPTQ {bits}-bit {gptq_err:.5f}, RTN {rtn_err:.5f}")
            assert vptq_err < 0.5 * rtn_err, (linear, bits, vptq_err, rtn_err)
            assert vptq_err < (0.6 if bits == 2 else 1.05) * gptq_err, (linear, bits, vptq_err, gptq_err)


def real_layer(runner, hessians, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """W and the (unnormalised) H of one linear of the real block."""
    return runner.layer.get_submodule(name).weight.detach(), torch.from_numpy(hessians[runner.layout.group_of(name)])


def test_quip_rotation_is_invertible_and_flattens_real_hessians_and_weights(real_block, down_proj_11) -> None:
    """The randomized Hadamard transforms on both sides undo exactly (float32 tolerance) and
    make real layers incoherent: max diag(H) / mean diag(H) measured 193 -> 3.2 on block 3's
    attention inputs, 36 -> 1.9 on its down_proj inputs, 1364 -> 1.7 on block 11's down_proj
    (massive activations); the weights' max-entry incoherence mu drops 1.8x to 6x."""
    from algorithms.quip import hessian_incoherence, restore, rotate_hessian, rotate_weight, signs, weight_incoherence

    runner, hessians = real_block
    names = ("self_attn.q_proj", "self_attn.k_proj", "mlp.gate_proj", "mlp.down_proj")
    layers = [real_layer(runner, hessians, name) for name in names]
    for W, H in [*layers, down_proj_11]:
        su, sv = signs(*W.shape, 0)
        Wt, Ht = rotate_weight(W, su, sv), rotate_hessian(H, sv)
        assert (restore(Wt, su, sv) - W).abs().max() < 1e-5 * W.abs().max()
        assert torch.allclose(Ht.diagonal().sum(), H.diagonal().sum(), rtol=1e-4)  # the trace is kept
        before, after = hessian_incoherence(H), hessian_incoherence(Ht)
        print(
            f"{tuple(W.shape)}: max/mean diag(H) {before:.1f} -> {after:.2f}, mu(W) "
            f"{weight_incoherence(W):.1f} -> {weight_incoherence(Wt):.2f}"
        )
        assert after < 4 and after < before / 8, (before, after)
        assert weight_incoherence(Wt) < 0.6 * weight_incoherence(W)


def test_quip_e8p_beats_gptq_2bit_on_real_layers_at_fewer_bits(real_block, down_proj_11) -> None:
    """QuIP# E8P at 2.03-2.06 bits per weight (row scales and signs included) against GPTQ
    2-bit g64 asymmetric act-order (2.28), errors as shares of tr(W H W^T): measured block 3
    q_proj 0.0081 vs 0.0182, down_proj 0.0234 vs 0.0541 (VPTQ v4 k256 0.0097 / 0.0227, AQLM
    2x8 0.0086 / 0.0279); block 11's down_proj, whose massive activations the rotation
    spreads, 0.00021 vs 0.00053 (VPTQ v4 k256 without outlier columns: 0.156)."""
    from algorithms.quip import QuipScheme, decode, quip

    runner, hessians = real_block
    layers = {
        name: (
            runner.layer.get_submodule(name).weight.detach(),
            torch.from_numpy(hessians[runner.layout.group_of(name)]),
        )
        for name in ("self_attn.q_proj", "mlp.down_proj")
    }
    for name, (W, H) in {**layers, "block 11 down_proj": down_proj_11}.items():
        grid = UniformScheme(bits=2, group_size=64, sym=False)
        gptq_err = proxy_error(W, dequantize(gptq(W, H, grid, GPTQConfig(act_order=True))), H) / proxy_error(
            W, 0 * W, H
        )
        e8p_err = proxy_error(W, decode(quip(W, H, QuipScheme())), H) / proxy_error(W, 0 * W, H)
        print(f"{name}: QuIP# E8P {e8p_err:.5f} vs GPTQ 2-bit g64 {gptq_err:.5f}")
        assert QuipScheme().bits_per_weight(*W.shape) < 2.07
        assert e8p_err < 0.6 * gptq_err, (name, e8p_err, gptq_err)
