"""The float and W8A8 formats (algorithms/floatq.py): the E4M3 / E2M1 math, the quantizers'
properties, activation quantization against its formulas, the kernels against the
reference, and compressed-tensors reading our tensors back to our weights."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from algorithms import QUANTIZERS, GPTQConfig, UniformScheme, rtn, weight_from_tensors
from algorithms.float_activations import (
    activation_codes,
    quantize_activations,
    static_input_scale,
    with_activation_scale,
)
from algorithms.float_formats import compressed_tensors_float_config, compressed_tensors_float_tensors
from algorithms.floatq import (
    E2M1,
    PRESETS,
    ActivationScheme,
    FloatScheme,
    FloatWeight,
    dequantize,
    e2m1_codes,
    e2m1_values,
    from_uniform,
    pack_e2m1,
    rtn_float,
    shared_global_scale,
    to_fp8,
    unpack_e2m1,
)
from kernels import reference
from kernels.quant_linear import ActQuantLinear, FloatLinear, quant_linear
from storage.checkpoint import Checkpoint

log = logging.getLogger(__name__)

# every scheme: the presets, and fp8 / int8 with the other weight strategy
SCHEMES = {
    **PRESETS,
    "fp8-channel-static": FloatScheme("fp8", "channel", activations=ActivationScheme("fp8", "tensor", dynamic=False)),
    "fp8-tensor-dynamic": FloatScheme("fp8", "tensor", activations=ActivationScheme("fp8", "tensor", dynamic=True)),
    "fp8a16": FloatScheme("fp8", "channel"),
    "w8a8-tensor": FloatScheme("int8", "tensor", activations=ActivationScheme("int8", "token", dynamic=True)),
    "w8a8-static": FloatScheme("int8", "channel", activations=ActivationScheme("int8", "tensor", dynamic=False)),
}
FP8_CODES = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn)
FINITE_FP8 = FP8_CODES[~torch.isnan(FP8_CODES.float())]


def weight(out: int = 48, inp: int = 96, seed: int = 0) -> torch.Tensor:
    """A weight with outlier columns and a zero row, as real ones have."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inp, generator=g) * 0.02
    W[:, 3] *= 20
    W[5] = 0
    return W


def quantized(name: str, W: torch.Tensor | None = None, absmax: float = 4.0) -> FloatWeight:
    """W in scheme `name`, with a static activation scale where the scheme stores one."""
    scheme = SCHEMES[name]
    fw = rtn_float(weight() if W is None else W, None, scheme)
    return with_activation_scale(fw, absmax) if scheme.static_activations else fw


def bits(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes, to compare float8 tensors (and -0.0 from 0.0) exactly."""
    return t.contiguous().view(torch.uint8) if t.element_size() == 1 else t.contiguous().view(torch.int32)


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(bits(a[k]), bits(b[k])) for k in a)


def ct_args(scheme: FloatScheme, side: str) -> dict | None:
    return compressed_tensors_float_config(scheme, ignore=[])["config_groups"]["group_0"][side]


# -- E4M3 and E2M1 -------------------------------------------------------------------------


def test_every_finite_e4m3_value_round_trips_and_larger_ones_saturate() -> None:
    assert len(FINITE_FP8) == 254
    assert torch.equal(bits(to_fp8(FINITE_FP8.float())), bits(FINITE_FP8))
    assert to_fp8(torch.tensor([1e6, -500.0, 464.0])).float().tolist() == [448.0, -448.0, 448.0]


def test_every_e2m1_code_round_trips_and_packs_low_nibble_first() -> None:
    codes = torch.arange(16, dtype=torch.uint8)
    values = e2m1_values(codes)
    assert values[:8].tolist() == list(E2M1) and values[8:].tolist() == [-v for v in E2M1]
    assert torch.equal(e2m1_codes(values), codes)  # code 8 is -0.0, whose sign is kept
    packed = pack_e2m1(codes.reshape(2, 8))
    assert packed[0, 0] == 0x10 and packed[1, 3] == 0xFE  # (code 0, code 1) and (code 14, code 15)
    assert torch.equal(unpack_e2m1(packed), codes.reshape(2, 8))


def test_e2m1_rounds_to_nearest_with_ties_to_even_as_compressed_tensors_does() -> None:
    from compressed_tensors.quantization.utils.fp4_utils import cast_to_fp4

    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    assert e2m1_values(e2m1_codes(ties)).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    x = torch.cat([torch.randn(4000, generator=torch.Generator().manual_seed(1)) * 3, ties, -ties, torch.tensor([7.0])])
    ours = e2m1_values(e2m1_codes(x))
    assert torch.equal(ours, cast_to_fp4(x.clone()))
    grid = torch.tensor([*E2M1, *(-v for v in E2M1)])
    nearest = (x.clamp(-6, 6)[:, None] - grid).abs().min(dim=1).values
    assert torch.equal((ours - x.clamp(-6, 6)).abs(), nearest)


# -- the quantizers ------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_quantizing_the_dequantized_weight_gives_the_same_tensors(name: str) -> None:
    fw = quantized(name)
    again = quantized(name, dequantize(fw))
    assert same_tensors(fw.tensors(), again.tensors())
    assert fw.in_features == 96 and fw.out_features == 48


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_rounding_errors_are_within_half_a_step(name: str) -> None:
    W = weight(seed=2)
    fw = quantized(name, W)
    err = (dequantize(fw) - W).abs()
    if fw.scheme.kind == "int8":
        assert (err <= fw.weight_scale / 2 * (1 + 1e-6)).all()
    elif fw.scheme.kind == "fp8":  # 3 mantissa bits: 2**-4 relative; subnormals below 2**-6: 2**-10 absolute
        assert (err <= torch.maximum(W.abs() * 2**-4, fw.weight_scale * 2**-10) * (1 + 1e-6)).all()
    else:  # the widest E2M1 step (4 -> 6) is 2, and a group's max is at most 0.4 steps over 6 (fp8 scale rounding)
        step = (fw.weight_scale.float() / fw.weight_global_scale).repeat_interleave(16, dim=1)
        assert (err <= step * (1 + 1e-6)).all()
    assert torch.equal(dequantize(fw)[5], torch.zeros(96))  # the zero row stays zero
    assert fw.weight_scale.float().isfinite().all() and (fw.weight_scale.float() > 0).all()


def test_relative_errors_order_the_formats() -> None:
    W = torch.randn(96, 256, generator=torch.Generator().manual_seed(3))
    errors = {name: ((dequantize(quantized(name, W)) - W).norm() / W.norm()).item() for name in SCHEMES}
    assert errors["w8a8"] < errors["fp8-dynamic"] < errors["nvfp4"] < 0.12
    assert errors["w8a8"] < errors["w8a8-tensor"] and errors["fp8-dynamic"] <= errors["fp8"]


def test_nvfp4_quantizes_fused_linears_with_one_global_scale() -> None:
    q, k, v = (weight(32, 64, seed=s) * 10**s for s in range(3))
    g = shared_global_scale([q, k, v])
    parts = [QUANTIZERS["rtn"](W, None, PRESETS["nvfp4a16"], GPTQConfig(), g) for W in (q, k, v)]
    assert all(torch.equal(p.weight_global_scale, g) for p in parts)
    assert torch.equal(g, rtn_float(v, None, PRESETS["nvfp4a16"]).weight_global_scale)  # v holds the max
    assert parts[0].weight_scale.float().max() < 448  # q's groups use less of the fp8 range


def test_an_eight_bit_symmetric_uniform_weight_converts_to_int8_exactly() -> None:
    W = weight(40, 72, seed=4)
    qw = rtn(W, UniformScheme(bits=8, group_size=0, sym=True))
    fw = from_uniform(qw, PRESETS["w8a8"])
    assert fw.weight.dtype == torch.int8 and fw.weight_scale.shape == (40, 1)
    assert torch.equal(dequantize(fw), reference.dequantize(qw))
    assert int(fw.weight.min()) == -128  # the symmetric grid's lowest code is used
    for bad, match in [
        (rtn(W, UniformScheme(bits=4, group_size=0, sym=True)), "needs 8 bits"),
        (rtn(W, UniformScheme(bits=8, group_size=8, sym=True)), "one group per row"),
        (rtn(W, UniformScheme(bits=8, group_size=0, sym=False)), "symmetric grid"),
    ]:
        with pytest.raises(ValueError, match=match):
            from_uniform(bad, PRESETS["w8a8"])
    with pytest.raises(ValueError, match="int8 per-channel"):
        from_uniform(qw, SCHEMES["w8a8-tensor"])


# -- activations ---------------------------------------------------------------------------


def activations(seed: int = 5) -> torch.Tensor:
    x = torch.randn(3, 7, 96, generator=torch.Generator().manual_seed(seed))
    x[..., 10] *= 30  # an outlier channel
    x[1, 2] = 0  # an all-zero token
    return x


def test_dynamic_per_token_activations_follow_the_formula() -> None:
    x = activations()
    s8 = x.abs().amax(-1, keepdim=True) / 127
    s8 = torch.where(s8 == 0, 1.0, s8)
    want = torch.round(x / s8).clamp(-128, 127) * s8
    assert torch.equal(quantize_activations(x, PRESETS["w8a8"].activations, None), want)
    s = x.abs().amax(-1, keepdim=True) / 448
    s = torch.where(s == 0, 1.0, s)
    want = (x / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s
    assert torch.equal(quantize_activations(x, PRESETS["fp8-dynamic"].activations, None), want)
    codes, scales = activation_codes(x, PRESETS["w8a8"].activations, None)
    assert codes.dtype == torch.int8 and scales.shape == (3, 7, 1) and codes.abs().amax(-1).max() == 127


@pytest.mark.parametrize("name", ["w8a8", "fp8-dynamic"])
def test_per_token_quantization_scales_with_each_token(name: str) -> None:
    """Scaling a token by a power of two scales its quantized values by exactly that."""
    x, act = activations(6), PRESETS[name].activations
    factor = 2.0 ** torch.randint(-6, 7, (3, 7, 1), generator=torch.Generator().manual_seed(7))
    assert torch.equal(quantize_activations(x * factor, act, None), quantize_activations(x, act, None) * factor)


def test_static_activations_use_the_stored_scale_and_clip_beyond_it() -> None:
    x = activations()
    for name, qmax in (("fp8", 448), ("w8a8-static", 127)):
        act = SCHEMES[name].activations
        scale = static_input_scale(8.0, act)
        assert torch.equal(scale, torch.tensor([8.0 / qmax]))
        y = quantize_activations(x, act, scale)
        lowest = -128 if qmax == 127 else -448  # the outlier channel (|x| up to ~100) clips at the calibrated max
        assert y.max() == (qmax * scale)[0] and y.min() == (lowest * scale)[0]
        inside, err = x.abs() < 8, (y - x).abs()  # half a step: of int8's grid, of fp8's 3-bit mantissa
        bound = scale / 2 if qmax == 127 else torch.maximum(x.abs() * 2**-4, scale * 2**-10)
        assert (err <= bound * (1 + 1e-6))[inside].all()
    with pytest.raises(ValueError, match="need their input_scale"):
        quantize_activations(x, SCHEMES["fp8"].activations, None)
    with pytest.raises(ValueError, match="dynamic: they store no scale"):
        static_input_scale(8.0, PRESETS["w8a8"].activations)
    with pytest.raises(ValueError, match="positive and finite"):
        static_input_scale(0.0, SCHEMES["fp8"].activations)


def test_nvfp4_activations_match_compressed_tensors_dynamic_local_quantization() -> None:
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

    x = activations().reshape(21, 96)
    act = PRESETS["nvfp4"].activations
    g = static_input_scale(float(x.abs().max()), act)
    ours = quantize_activations(x, act, g)
    args = QuantizationArgs.model_validate(ct_args(PRESETS["nvfp4"], "input_activations"))
    scale, zero = compute_dynamic_scales_and_zp(x, args, torch.nn.Module(), global_scale=g)
    assert torch.equal(ours, fake_quantize(x, scale, zero, args, global_scale=g))
    assert torch.equal(ours[2], torch.zeros(96)) is False and torch.equal(quantize_activations(x * 0, act, g), x * 0)


def test_fp8_and_int8_activations_match_compressed_tensors_fake_quantize() -> None:
    """compressed-tensors' own fake quantization with our scales: the same values. (Its
    dynamic int8 scale is max|x| / 127.5; ours is vLLM's, max|x| / 127.)"""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    x = activations().reshape(21, 96)
    for name in ("fp8-dynamic", "w8a8", "fp8", "w8a8-static"):
        scheme = SCHEMES[name]
        stored = static_input_scale(8.0, scheme.activations) if scheme.static_activations else None
        _, scale = activation_codes(x, scheme.activations, stored)
        args = QuantizationArgs.model_validate(ct_args(scheme, "input_activations"))
        want = fake_quantize(x, scale, None, args)
        assert torch.equal(quantize_activations(x, scheme.activations, stored), want), name


# -- kernels -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_float_linear_reference_and_dense_module_agree(name: str) -> None:
    fw = quantized(name)
    bias = torch.randn(48, generator=torch.Generator().manual_seed(8))
    layer = quant_linear(fw, bias)
    assert isinstance(layer, FloatLinear) and same_tensors(layer.quantized.tensors(), fw.tensors())
    x = activations()
    y = layer(x)
    act = fw.scheme.activations
    xq = x if act is None else quantize_activations(x, act, fw.activation_scale)
    assert torch.equal(y, torch.nn.functional.linear(xq, dequantize(fw), bias))
    dense = layer.dense()
    assert isinstance(dense, torch.nn.Linear) and isinstance(dense, ActQuantLinear) == (act is not None)
    assert torch.equal(dense(x), y)  # the dense module still quantizes its activations
    if act is not None:
        assert not torch.equal(y, torch.nn.functional.linear(x, dequantize(fw), bias))


@pytest.mark.parametrize("name", sorted(SCHEMES))
@pytest.mark.parametrize("shape", [(1, 96), (5, 96), (2, 17, 96)])
def test_cpu_backend_matches_the_reference(name: str, shape: tuple[int, ...]) -> None:
    fw = quantized(name)
    bias = torch.randn(48, generator=torch.Generator().manual_seed(9))
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(10))
    want = quant_linear(fw, bias)(x)
    fast = quant_linear(fw, bias, backend="cpu")
    assert fast.backend() == "cpu"
    y = fast(x)
    assert y.shape == want.shape and y.dtype == torch.float32
    assert (y - want).abs().max() <= 2e-6 * want.abs().max()
    yb, want = fast(x.bfloat16()), reference.linear(x.bfloat16(), fw, bias.bfloat16())
    assert yb.dtype == torch.bfloat16 and (yb.float() - want.float()).abs().max() <= 1e-2 * want.abs().max()


def test_the_cpu_backend_uses_torchs_int8_matmul_for_w8a8_only(monkeypatch) -> None:
    """fp8 runs dequantized on CPU: torch's CPU _scaled_mm was slower than the fp32 matmul
    (see kernels/floatq_cpu.py)."""
    from kernels import floatq_cpu

    calls = []
    for fn in ("_int_mm", "_scaled_mm"):
        real = getattr(torch, fn)
        monkeypatch.setattr(torch, fn, lambda *a, _fn=fn, _real=real, **k: calls.append(_fn) or _real(*a, **k))
    x = torch.randn(4, 96)
    for name in ("w8a8", "fp8-dynamic", "fp8", "nvfp4", "fp8a16"):
        floatq_cpu.linear(x, floatq_cpu.layout(quantized(name), torch.device("cpu")), None)
    assert calls == ["_int_mm"]


def test_static_activations_without_their_scale_are_refused() -> None:
    fw = rtn_float(weight(), None, PRESETS["fp8"])
    with pytest.raises(ValueError, match="need their input_scale"):
        quant_linear(fw)(torch.randn(2, 96))
    with pytest.raises(ValueError, match="without their input_scale"):
        compressed_tensors_float_tensors(fw)
    with pytest.raises(ValueError, match="not static"):
        dataclasses.replace(quantized("w8a8"), input_scale=torch.ones(1))


# -- stored tensors and fields -------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_tensors_round_trip_through_from_tensors_and_fields(name: str) -> None:
    fw = quantized(name)
    scheme = FloatScheme.from_fields({"quant_method": "lamina", **fw.scheme.fields()})
    assert scheme == fw.scheme
    again = weight_from_tensors(fw.tensors(), scheme)
    assert same_tensors(again.tensors(), fw.tensors())
    fp8 = torch.float8_e4m3fn
    as_numpy = {k: torch.from_numpy((bits(v) if v.dtype == fp8 else v).numpy()) for k, v in fw.tensors().items()}
    assert same_tensors(FloatWeight.from_tensors(as_numpy, scheme).tensors(), fw.tensors())  # float8 as uint8 bits
    names = {"fp8": "weight", "int8": "weight", "nvfp4": "weight_packed"}
    assert names[fw.scheme.kind] in fw.tensors() and "weight_scale" in fw.tensors()


def mutate(name: str, **changes) -> dict:
    fields = PRESETS[name].fields()
    act = changes.pop("act", {})
    fields.update(changes)
    if act:
        fields["activations"] = {**fields["activations"], **act}
    return fields


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        (mutate("fp8", kind="fp16"), r"kind must be one of fp8, nvfp4, int8, got 'fp16'"),
        (mutate("fp8", weight_strategy="row"), r"weight_strategy must be one of"),
        (mutate("fp8", weight_strategy="group", group_size=128), r"fp8 weights take weight_strategy 'channel' or"),
        (mutate("nvfp4", group_size=32), r"nvfp4 weights take weight_strategy 'group' and group_size 16"),
        (mutate("w8a8", activations=None), r"int8 weights need int8 activations"),
        (mutate("fp8", act={"kind": "int8"}), r"activations.kind must be 'fp8' for fp8 weights"),
        (mutate("fp8", act={"strategy": "token"}), r"activations.strategy 'token' needs dynamic true"),
        (mutate("fp8", act={"strategy": "group"}), r"activations.strategy 'group' is for nvfp4"),
        (mutate("nvfp4", act={"dynamic": True}), r"nvfp4 activations take strategy 'group' and dynamic false"),
        (mutate("w8a8", act={"strategy": "tensor"}), r"int8 activations per tensor must be static"),
        (mutate("fp8", act={"dynamic": "yes"}), r"field 'activations.dynamic' has the wrong type"),
        (mutate("fp8", group_size=True), r"field 'group_size' has the wrong type"),
        ({k: v for k, v in PRESETS["fp8"].fields().items() if k != "kind"}, r"field 'kind' is missing"),
        (mutate("fp8", format="uniform"), r"format must be 'float'"),
    ],
)
def test_bad_fields_are_refused_naming_the_field(fields: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FloatScheme.from_fields(fields)


def test_bad_tensors_are_refused_naming_the_tensor() -> None:
    fw = quantized("fp8-dynamic")
    with pytest.raises(ValueError, match=r"weight_scale: expected torch.float32 \[48, 1\]"):
        FloatWeight.from_tensors({**fw.tensors(), "weight_scale": fw.weight_scale.T}, fw.scheme)
    with pytest.raises(ValueError, match=r"weight: expected a 2-D torch.float8_e4m3fn tensor, got torch.float32"):
        FloatWeight.from_tensors({**fw.tensors(), "weight": fw.weight.float()}, fw.scheme)
    nv = quantized("nvfp4a16")
    with pytest.raises(ValueError, match="weight_packed is missing"):
        FloatWeight.from_tensors({"weight": nv.weight, "weight_scale": nv.weight_scale}, nv.scheme)
    with pytest.raises(ValueError, match="weight_global_scale is missing"):
        FloatWeight.from_tensors({k: v for k, v in nv.tensors().items() if k != "weight_global_scale"}, nv.scheme)
    assert PRESETS["nvfp4"].misfit(32, 72) and PRESETS["nvfp4"].misfit(32, 96) is None
    with pytest.raises(ValueError, match="not a multiple of 16"):
        rtn_float(torch.randn(4, 40), None, PRESETS["nvfp4"])


# -- compressed-tensors --------------------------------------------------------------------

CT_PRESETS = {"fp8": "FP8", "fp8-dynamic": "FP8_DYNAMIC", "w8a8": "W8A8", "nvfp4": "NVFP4", "nvfp4a16": "NVFP4A16"}


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_compressed_tensors_reads_our_tensors_back_to_our_weights(name: str) -> None:
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme

    fw = quantized(name)
    config = compressed_tensors_float_config(fw.scheme, ignore=["lm_head"])
    qc = QuantizationConfig.model_validate(config)
    assert qc.quant_method == "compressed-tensors" and qc.ignore == ["lm_head"]
    scheme = qc.config_groups["group_0"]
    if name in CT_PRESETS:  # the preset's arguments (the observers aside, which are calibration's)
        preset = preset_name_to_scheme(CT_PRESETS[name], ["Linear"])
        for side in ("weights", "input_activations"):
            a, b = getattr(scheme, side), getattr(preset, side)
            assert (a is None) == (b is None), side
            assert a is None or a.model_copy(update={"observer": None}) == b.model_copy(update={"observer": None}), side
    compressor = BaseCompressor.get_value_from_registry(qc.format)
    state = compressed_tensors_float_tensors(fw)
    assert set(compressor.compression_param_names(scheme)) <= set(state) | {"input_global_scale"}
    W = compressor.decompress(state, scheme)["weight"]
    if fw.scheme.kind == "nvfp4":  # compressed-tensors decompresses nvfp4 to bfloat16, from the same float32 products
        assert W.dtype == torch.bfloat16 and torch.equal(W, dequantize(fw, torch.bfloat16))
    else:
        assert W.dtype == torch.float32 and torch.equal(W, dequantize(fw))


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_compressed_tensors_quantization_with_our_scales_gives_our_codes(name: str) -> None:
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

    W = weight(seed=11)
    fw = quantized(name, W)
    qc = QuantizationConfig.model_validate(compressed_tensors_float_config(fw.scheme, ignore=[]))
    scheme = qc.config_groups["group_0"]
    args = scheme.weights
    if fw.scheme.kind == "nvfp4":
        Wg = W.reshape(48, 6, 16)
        g = generate_gparam(W.min(), W.max())
        assert torch.equal(g, fw.weight_global_scale)
        scale, _ = calculate_qparams(Wg.amin(-1), Wg.amax(-1), args, global_scale=g)
        assert torch.equal(scale, fw.weight_scale.float())
        compressed = BaseCompressor.get_value_from_registry(qc.format).compress(
            {"weight": W, "weight_scale": scale, "weight_global_scale": g}, scheme
        )
        assert torch.equal(compressed["weight_packed"], fw.weight)
        assert torch.equal(bits(compressed["weight_scale"]), bits(fw.weight_scale))
        return
    codes = quantize(W, fw.weight_scale, None, args, dtype=args.pytorch_dtype())
    assert torch.equal(bits(codes), bits(fw.weight))
    if fw.scheme.kind == "fp8":  # its scales are compressed-tensors' too (its int8 ones divide by 127.5)
        per_row = fw.scheme.weight_strategy == "channel"
        lo, hi = (W.amin(1, keepdim=True), W.amax(1, keepdim=True)) if per_row else (W.min(), W.max())
        scale, _ = calculate_qparams(lo, hi, args)
        assert torch.equal(scale, fw.weight_scale.reshape(scale.shape))


# -- the real model ------------------------------------------------------------------------

LINEARS = [f"self_attn.{p}_proj" for p in "qkvo"] + [f"mlp.{p}_proj" for p in ("gate", "up", "down")]


def test_relative_weight_errors_on_the_fixture_model(model_dir) -> None:
    """Round-to-nearest over every linear of blocks 0 and 1 of SmolLM2-135M: the relative
    Frobenius error ||W - Q(W)|| / ||W|| over all 14 linears together (measured: fp8
    per-tensor 0.0265, per-channel 0.0263, int8 per-channel 0.0086, nvfp4 0.0948)."""
    checkpoint = Checkpoint(str(model_dir))
    weights = checkpoint.read([f"model.layers.{b}.{lin}.weight" for b in (0, 1) for lin in LINEARS])
    errors = {}
    for name in ("fp8", "fp8-dynamic", "w8a8", "nvfp4"):
        num = sum(float((dequantize(rtn_float(W, None, PRESETS[name])) - W).pow(2).sum()) for W in weights.values())
        errors[name] = (num / sum(float(W.pow(2).sum()) for W in weights.values())) ** 0.5
    log.info("relative weight errors, blocks 0-1: %s", {k: round(v, 5) for k, v in errors.items()})
    assert 0.020 < errors["fp8"] < 0.032 and 0.020 < errors["fp8-dynamic"] < 0.032
    assert 0.005 < errors["w8a8"] < 0.012
    assert 0.08 < errors["nvfp4"] < 0.11


def tiny_export(folder, scheme: FloatScheme) -> tuple[torch.nn.Module, dict[str, FloatWeight]]:
    """A one-block random Llama with its linears in `scheme`, written as a compressed-tensors
    checkpoint into `folder`; returns the model with our dense modules swapped in."""
    import json

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        tie_word_embeddings=False,
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    ours = {n: rtn_float(model.get_submodule(n).weight.detach(), None, scheme) for n in linears}
    if scheme.static_activations:
        ours = {n: with_activation_scale(fw, 3.0) for n, fw in ours.items()}
    stored = {k: v.contiguous() for k, v in model.state_dict().items() if k.removesuffix(".weight") not in ours}
    for n, fw in ours.items():
        stored.update({f"{n}.{k}": v for k, v in compressed_tensors_float_tensors(fw).items()})
    save_file(stored, folder / "model.safetensors", metadata={"format": "pt"})
    doc = {**config.to_dict(), "architectures": ["LlamaForCausalLM"]}
    doc["quantization_config"] = compressed_tensors_float_config(scheme, ignore=["lm_head"])
    (folder / "config.json").write_text(json.dumps(doc))
    for n, fw in ours.items():
        parent, _, leaf = n.rpartition(".")
        setattr(model.get_submodule(parent), leaf, quant_linear(fw).dense())
    return model, ours


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`")  # dequantize=True, on a quantized checkpoint
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_transformers_loads_a_compressed_tensors_checkpoint_of_ours(tmp_path, name: str) -> None:
    """transformers' loader (through compressed-tensors) on a checkpoint we wrote: dequantized,
    our weights exactly; run as compressed-tensors runs it (activations quantized in its own
    forward), our logits: exactly for fp8, within its int8 scale (max|x| / 127.5 against
    vLLM's 127) for W8A8; nvfp4 it runs in bfloat16 only (tested per linear above)."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    scheme = PRESETS[name]
    model, ours = tiny_export(tmp_path, scheme)
    nvfp4 = scheme.kind == "nvfp4"
    loaded = AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=CompressedTensorsConfig(dequantize=True), dtype=torch.float32
    )
    for n, fw in ours.items():
        W = loaded.get_submodule(n).weight.detach()
        assert torch.equal(W, dequantize(fw, torch.bfloat16 if nvfp4 else torch.float32).float()), n
    running = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16 if nvfp4 else torch.float32)
    if nvfp4:  # it runs in bfloat16 only, whose activations round to other E2M1 codes than float32's
        for n, fw in ours.items():
            scale = getattr(running.get_submodule(n), "input_global_scale", None)
            assert (scale is None) == (scheme.activations is None) and (scale is None or scale == fw.input_global_scale)
        return
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        theirs, want = running(ids).logits, model(ids).logits
    err = float((theirs - want).abs().max() / want.abs().max())
    assert err <= (1e-6 if scheme.kind == "fp8" else 2e-2), err
