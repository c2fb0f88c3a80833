"""The `vptq` export (the vptq package's layout) of vector artifacts, read back by the vptq
package's own unpacking and dequantizer and loaded by its AutoModelForCausalLM, against
lamina's `decode`.

The native artifact here is written by hand (the fixture model cut to 2 blocks, each
linear fitted by `algorithms.vptq.fit` under a diagonal Hessian), not by the quantize
pipeline: the export only needs its layout.

What runs on CPU (vptq 0.0.5.post1): its CUDA library does not load, so VQuantLinear's
forward takes `ops.quant_gemm`'s torch path, `ops.dequant` then `F.linear`. Its loader,
`vptq.AutoModelForCausalLM.from_pretrained`, stops under transformers 5 before reading
any file, and leaves a tied lm_head unloaded; `load_vptq` runs its steps (see there).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import accelerate
import pytest
import torch
import vptq
from safetensors.torch import load_file
from torch.nn import functional as F
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.initialization import no_init_weights
from vptq.layers.model_base import make_quant_linear
from vptq.ops import dequant
from vptq.utils.pack import pack_index, unpack_index_tensor

from algorithms.codebook import CodebookScheme
from algorithms.formats import vector_layout, vptq_config, vptq_layer, vptq_tensors
from algorithms.rtn import rtn
from algorithms.types import UniformScheme
from algorithms.vector import (
    VectorScheme,
    VectorWeight,
    as_uint16,
    decode,
    pack_indices,
    to_int16,
    unpack_indices,
)
from algorithms.vptq import VPTQConfig, fit
from pipeline.cli import main
from pipeline.errors import LaminaError
from pipeline.export import export
from scripts.resize_model import resize_model
from storage.manifest import MANIFEST, read_manifest, verify
from tests.conftest import MODEL
from tests.test_export_aqlm import BLOCKS, KEPT, random_weight, write_native

SCHEMES = {
    "v4-k256": VectorScheme(vector_len=4, num_centroids=256),
    "residual": VectorScheme(vector_len=4, num_centroids=256, num_res_centroids=16, normalize=False),
    "outliers": VectorScheme(vector_len=4, num_centroids=256, outlier_percent=5, outlier_centroids=64),
    "groups": VectorScheme(
        vector_len=8, num_centroids=1024, num_res_centroids=256, group_num=2, outlier_percent=3, outlier_vector_len=4
    ),
}
ARTIFACT = VectorScheme(  # the end-to-end scheme: every part of the format, at 2-block fixture speed
    vector_len=4,
    num_centroids=256,
    num_res_centroids=16,
    group_num=2,
    outlier_percent=1,
    outlier_vector_len=8,
    outlier_centroids=16,
)


def random_vectors(scheme: VectorScheme, out: int, n: int, *, seed: int) -> VectorWeight:
    """A vector weight of random indices, codebooks, permutation and normalisation."""
    gen = torch.Generator().manual_seed(seed)
    s, (n_out, gs) = scheme, scheme.layout(out, n)
    G, R = s.group_num, out // s.vector_len
    main = torch.randint(0, s.num_centroids, (G, R, gs), generator=gen)  # [G, out/v, gs]
    res = torch.randint(0, s.num_res_centroids, (G, R, gs), generator=gen) if s.num_res_centroids else None

    outliers = torch.randint(0, s.outlier_centroids, (1, out // s.outlier_vector_len, n_out), generator=gen)

    def book(rows: int, size: int) -> torch.Tensor:
        return (torch.randn(rows, size, generator=gen) * 0.05).half()

    return VectorWeight(
        scheme=s,
        indices=pack_indices(main, res, s.index_bits, s.res_bits),
        centroids=book(G, s.num_centroids * s.vector_len),
        perm=to_int16(torch.randperm(n, generator=gen)),
        res_centroids=book(G, s.num_res_centroids * s.vector_len) if res is not None else None,
        outlier_indices=to_int16(outliers) if n_out else None,
        outlier_centroids=book(1, s.outlier_centroids * s.outlier_vector_len) if n_out else None,
        weight_scale=(0.5 + torch.rand(n, generator=gen)).half() if s.normalize else None,
        weight_bias=book(1, n)[0] if s.normalize else None,
    )


@pytest.mark.parametrize(
    ("index_bits", "res_bits", "n"),
    [(8, 0, 96), (8, 4, 96), (10, 8, 37), (16, 16, 5), (3, 0, 100)],  # 37 and 100 end in part of a word
)
def test_vptq_packs_and_unpacks_our_indices(index_bits, res_bits, n) -> None:
    """Our packed indices are the bytes vptq's pack_index writes, and its unpack_index_tensor
    reads them back (vptq masks residual indices with the main index bits: res_bits <= index_bits)."""
    gen = torch.Generator().manual_seed(index_bits + res_bits)
    main = torch.randint(0, 2**index_bits, (2, 6, n), generator=gen)  # [G, rows, n]
    res = torch.randint(0, 2**res_bits, (2, 6, n), generator=gen) if res_bits else None
    ours = pack_indices(main, res, index_bits, res_bits)
    assert ours.shape == (2, 6, math.ceil(n * (index_bits + res_bits) / 32))
    theirs = pack_index(to_int16(main), index_bits, None if res is None else to_int16(res), res_bits)
    assert torch.equal(ours, theirs)
    got_main, got_res = unpack_index_tensor(ours, index_bits, n, res_bits, n)
    assert torch.equal(got_main, main)
    assert torch.equal(got_res, res) if res is not None else got_res is None
    back_main, back_res = unpack_indices(theirs, n, index_bits, res_bits)
    assert torch.equal(back_main, main) and torch.equal(back_res, res if res is not None else torch.zeros_like(main))


def vptq_weight(module: vptq.VQuantLinear) -> torch.Tensor:
    """vptq's own dequantization of a VQuantLinear's parameters (what its torch forward runs)."""
    m = module
    return dequant(
        indices=m.indices,
        centroids=m.centroids.weight.view(m.num_codebooks, m.num_centroids, m.vector_len),
        outlier_indices=m.outlier_indices,
        outlier_centroids=m.outlier_centroids.weight.view(1, -1, m.outlier_vector_len) if m.enable_outlier else None,
        res_indices=None,
        res_centroids=m.res_centroids.weight if m.enable_residual else None,
        perm=m.perm,
        weight_scale=m.weight_scale,
        weight_bias=m.weight_bias,
        is_indice_packed=True,
        enable_outlier=m.enable_outlier,
        enable_residual=m.enable_residual,
        enable_perm=m.enable_perm,
        enable_norm=m.enable_norm,
        num_centroids=m.num_centroids,
        num_outlier_centroids=m.num_outlier_centroids,
        num_res_centroids=m.num_res_centroids,
        padding=m.padding,
        outlier_padding=m.outlier_padding,
        num_codebooks=m.num_codebooks,
        group_size=m.group_size,
        outlier_size=m.outlier_size,
        vector_len=m.vector_len,
        outlier_vector_len=m.outlier_vector_len,
    )


def vquant_linear(vw: VectorWeight, dtype: torch.dtype) -> vptq.VQuantLinear:
    """A VQuantLinear built from our config entry and holding our tensors (strict load)."""
    config = vptq_layer(vw.scheme, vw.out_features, vw.in_features)
    module = vptq.VQuantLinear(**config, enable_proxy_error=False, dtype=dtype)
    module.load_state_dict(vptq_tensors(vw, dtype), strict=True)
    return module


@pytest.mark.parametrize("name", SCHEMES)
def test_vptq_dequantizes_our_tensors_to_our_weights(name) -> None:
    """In float32 vptq's dequantizer and forward give exactly `decode`; in float16 (the
    codebooks' own dtype) exactly `decode(vw, float16)`: the same gathers, one sum of
    residual and main codewords, one scale and shift, each rounded once in both."""
    scheme = SCHEMES[name]
    vw = random_vectors(scheme, 96, 136, seed=1)
    n_out, _ = scheme.layout(96, 136)
    assert (n_out > 0) == (scheme.outlier_percent > 0)
    x = torch.randn(3, 136, generator=torch.Generator().manual_seed(2))
    for dtype in (torch.float32, torch.float16):
        module = vquant_linear(vw, dtype)
        W = vptq_weight(module)
        assert W.dtype == dtype and torch.equal(W, decode(vw, dtype)), dtype
        assert torch.equal(module(x.to(dtype)), F.linear(x.to(dtype), decode(vw, dtype))), dtype


def test_a_biased_linear_keeps_its_bias() -> None:
    """A biased linear's config entry says so, and its `bias` (which the export passes
    through under the linear's name) loads beside our tensors and is added."""
    vw = random_vectors(SCHEMES["v4-k256"], 32, 64, seed=5)
    bias = torch.randn(32, generator=torch.Generator().manual_seed(6))
    config = vptq_layer(vw.scheme, 32, 64, bias=True)
    module = vptq.VQuantLinear(**config, enable_proxy_error=False, dtype=torch.float32)
    module.load_state_dict({**vptq_tensors(vw, torch.float32), "bias": bias}, strict=True)
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(7))
    assert torch.equal(module(x), F.linear(x, decode(vw), bias))


def test_vptq_tensors_are_vptqs_state_dict_names_and_dtypes() -> None:
    vw = random_vectors(SCHEMES["groups"], 64, 136, seed=3)
    tensors = vptq_tensors(vw, torch.bfloat16)
    n_out = SCHEMES["groups"].outlier_size(136)
    assert {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()} == {
        "indices": (torch.int32, (2, 8, math.ceil((136 - n_out) // 2 * 18 / 32))),
        "centroids.weight": (torch.bfloat16, (2, 1024 * 8)),
        "res_centroids.weight": (torch.bfloat16, (2, 256 * 8)),
        "outlier_indices": (torch.int16, (1, 16, n_out)),
        "outlier_centroids.weight": (torch.bfloat16, (1, 256 * 4)),
        "perm": (torch.int16, (136,)),
        "weight_scale": (torch.bfloat16, (136,)),
        "weight_bias": (torch.bfloat16, (136,)),
    }
    ours = vw.tensors()
    assert all(torch.equal(tensors[k], ours[k]) for k in ("indices", "outlier_indices", "perm"))
    assert torch.equal(vptq_tensors(vw)["centroids.weight"], vw.centroids)  # float16 stays as stored


def test_vptq_tensors_refuse_what_vptq_cannot_read() -> None:
    vw = random_vectors(SCHEMES["v4-k256"], 16, 32, seed=4)
    with pytest.raises(ValueError, match=r"centroids: expected torch.float16 \[1, 1024\], got torch.float32"):
        vptq_tensors(VectorWeight(**{**vw.__dict__, "centroids": vw.centroids.float()}))
    with pytest.raises(ValueError, match=r"tensors \['centroids', 'indices', 'perm'\], expected \[.*'weight_scale'\]"):
        vptq_tensors(VectorWeight(**{**vw.__dict__, "weight_scale": None, "weight_bias": None}))
    with pytest.raises(ValueError, match="outlier_vector_len must be >= 2"):  # vptq would drop them
        VectorScheme(outlier_percent=10, outlier_vector_len=1)
    with pytest.raises(ValueError, match=r"cannot unpack 2 indices of 8 bits in 1 words \(it would drop 0 padding"):
        vector_layout(VectorScheme(vector_len=2, num_centroids=256, group_num=16), 16, 32)


# ---- an artifact fitted by hand, exported through the CLI -------------------------------


@pytest.fixture(scope="module")
def two_blocks(tmp_path_factory) -> Path:
    return resize_model(MODEL, tmp_path_factory.mktemp("two-blocks"), BLOCKS)


@pytest.fixture(scope="module")
def fitted(two_blocks) -> dict[str, VectorWeight]:
    """Each quantized linear fitted by VPTQ under the diagonal Hessian of its column norms
    (deterministic, and it reorders the columns: the permutation is not the identity).
    On one thread: the fits are small ops, and on 2 cores shared with another job two
    threads took 36 s where one took 11."""
    source = load_file(two_blocks / "model.safetensors")
    linears = sorted({n.removesuffix(".weight") for n in source if n.endswith("_proj.weight")} - set(KEPT))
    out, threads = {}, torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for linear in linears:
            W = source[f"{linear}.weight"]  # [out, in]
            H = torch.diag(W.pow(2).sum(0) + 1e-3)  # [in, in]
            out[linear], _ = fit(W, H, ARTIFACT, VPTQConfig(kmeans_iters=1))
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, two_blocks, fitted) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("vptq")
    qc = {"quant_method": "lamina", "format": "vector", "algorithm": "vptq", **ARTIFACT.fields()}
    out = {"vector": write_native(tmp / "vector", two_blocks, qc, lambda linear, W: fitted[linear].tensors())}
    uniform = UniformScheme(bits=4, group_size=64)
    qc = {"quant_method": "lamina", "format": "uniform", "algorithm": "rtn", "bits": 4, "group_size": 64, "sym": True}
    out["uniform"] = write_native(tmp / "uniform", two_blocks, qc, lambda linear, W: rtn(W, uniform).tensors())
    books = CodebookScheme(num_codebooks=2, nbits_per_codebook=8, in_group_size=8)
    qc = {"quant_method": "lamina", "format": "codebook", "algorithm": "aqlm", **books.fields()}
    out["codebook"] = write_native(
        tmp / "codebook", two_blocks, qc, lambda linear, W: random_weight(books, *W.shape, seed=0).tensors()
    )
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory, artifacts) -> str:
    dest = tmp_path_factory.mktemp("vptq-export") / "vptq"
    assert main(["-q", "export", artifacts["vector"], "--format", "vptq", str(dest)]) == 0
    return str(dest)


def test_export_is_published_with_vptqs_config_and_tensors(exported, artifacts, fitted) -> None:
    """Every quantized linear named in config_for_layers, the rest in modules_to_not_convert;
    the codebooks and normalisation cast to the model's float32, exactly (float16 widened)."""
    config = json.loads((Path(exported) / "config.json").read_text())
    assert config["dtype"] == "float32"
    layers = {lin: vptq_layer(ARTIFACT, vw.out_features, vw.in_features) for lin, vw in fitted.items()}
    assert config["quantization_config"] == vptq_config(layers, unquantized=["lm_head", *KEPT])
    assert layers["model.layers.0.mlp.down_proj"]["outlier_size"] == 14  # 1% of 1536, less one for the 2 groups
    assert all(not torch.equal(as_uint16(vw.perm), torch.arange(vw.in_features)) for vw in fitted.values())
    assert read_manifest(exported)["export"] == {"format": "vptq", "from": artifacts["vector"]}
    assert verify(exported) == []
    index = json.loads((Path(exported) / "model.safetensors.index.json").read_text())["weight_map"]
    tensors = {}
    for file in sorted(set(index.values())):
        tensors |= load_file(Path(exported) / file)
    for linear, vw in fitted.items():
        for suffix, t in vw.tensors().items():
            name = f"{linear}.{suffix}.weight" if suffix.endswith("centroids") else f"{linear}.{suffix}"
            want = t.float() if t.is_floating_point() else t
            assert tensors[name].dtype == want.dtype and torch.equal(tensors[name], want), name
        assert f"{linear}.weight" not in tensors


def load_vptq(folder: str) -> torch.nn.Module:
    """What vptq.AutoModelForCausalLM.from_pretrained(folder, device_map={"": "cpu"}) does:
    the model built on the meta device in the config's dtype, the linears of
    config_for_layers replaced by vptq's make_quant_linear (VQuantLinear(**entry,
    dtype=the linear's)), the checkpoint loaded by accelerate in that dtype. Two steps
    differ: vptq takes no_init_weights from transformers.modeling_utils, which transformers
    5 moved to transformers.initialization; and vptq never ties the embeddings (from_config
    under no_init_weights leaves them untied, in transformers 4.57 as in 5), so a tied
    lm_head would stay on the meta device and the model fail to move: tie_weights() here.
    The device map is explicit because without one accelerate loads through
    torch.distributed's set_model_state_dict, which wants a process group."""
    config = AutoConfig.from_pretrained(folder)
    qc = config.quantization_config
    with no_init_weights(), accelerate.init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=config.dtype)
        make_quant_linear(model, qc["config_for_layers"], qc["shared_layer_config"], target_layer=vptq.VQuantLinear)
    model.tie_weights()
    accelerate.load_checkpoint_in_model(model, folder, device_map={"": "cpu"}, dtype=config.dtype)
    return model.eval()


def test_vptq_runs_the_export_as_our_decoded_weights(exported, fitted, two_blocks) -> None:
    """vptq's loader on CPU: quantized linears are VQuantLinear holding our tensors, the rest
    nn.Linear, every tensor of the export read; its torch forward gives exactly
    (torch.equal) the logits of the fixture model whose linears hold `decode(vw)`: the
    dequantized weights are equal in float32, and both models run the same float32 ops."""
    source = load_file(two_blocks / "model.safetensors")
    model = load_vptq(exported)
    index = json.loads((Path(exported) / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(model.state_dict()) == {*index, "lm_head.weight"}
    assert not [name for name, p in model.named_parameters() if p.is_meta]
    for linear, vw in fitted.items():
        module = model.get_submodule(linear)
        assert isinstance(module, vptq.VQuantLinear), linear
        assert torch.equal(module.indices, vw.indices) and torch.equal(module.perm, vw.perm), linear
        assert module.centroids.weight.dtype == module.weight_scale.dtype == torch.float32  # the model's
        assert torch.equal(module.centroids.weight, vw.centroids.float()), linear
        assert torch.equal(module.outlier_centroids.weight, vw.outlier_centroids.float()), linear
        assert torch.equal(vptq_weight(module), decode(vw)), linear
    for linear in KEPT:
        module = model.get_submodule(linear)
        assert type(module) is torch.nn.Linear and torch.equal(module.weight, source[f"{linear}.weight"]), linear
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, source["model.embed_tokens.weight"])
    reference = AutoModelForCausalLM.from_pretrained(two_blocks, dtype=torch.float32).eval()
    for linear, vw in fitted.items():
        reference.get_submodule(linear).weight.data = decode(vw)
    tokens = torch.tensor([[1, 504, 3458, 282, 4667, 314, 253, 1345]])
    with torch.no_grad():
        logits, expected = model(tokens).logits, reference(tokens).logits
    assert torch.isfinite(expected).all() and torch.equal(logits, expected)


@pytest.mark.parametrize(
    ("artifact", "fmt", "needle"),
    [
        ("vector", "gptq", "of the vector format, which the gptq format cannot hold; export it as vptq"),
        ("vector", "compressed-tensors", "which the compressed-tensors format cannot hold; export it as vptq"),
        ("vector", "aqlm", "of the vector format, which the aqlm format cannot hold; export it as vptq"),
        ("uniform", "vptq", "of the uniform format, which the vptq format cannot hold; export it as gptq or compr"),
        ("codebook", "vptq", "of the codebook format, which the vptq format cannot hold; export it as aqlm"),
    ],
)
def test_a_format_that_does_not_fit_the_artifact_is_refused(artifacts, tmp_path, capsys, artifact, fmt, needle):
    dest = tmp_path / "export"
    assert main(["-q", "export", artifacts[artifact], "--format", fmt, str(dest)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("lamina: error: ") and needle in lines[0], lines
    assert not dest.exists()


def test_a_linear_of_another_scheme_is_refused_before_anything_is_written(tmp_path, two_blocks) -> None:
    """vptq's config is written from the artifact's one scheme; the headers show the odd linear."""
    odd, other = "model.layers.1.mlp.up_proj", VectorScheme(vector_len=4, num_centroids=512)
    scheme = SCHEMES["v4-k256"]
    qc = {"quant_method": "lamina", "format": "vector", "algorithm": "vptq", **scheme.fields()}

    def quantize(linear: str, W: torch.Tensor) -> dict:
        return random_vectors(other if linear == odd else scheme, *W.shape, seed=0).tensors()

    artifact = write_native(tmp_path / "mixed", two_blocks, qc, quantize)
    assert (Path(artifact) / MANIFEST).exists()
    dest = tmp_path / "export"
    needle = rf"{odd}: tensors .*'indices': \('I32', \(1, 384, 162\)\).* not of the artifact's scheme v4-k256"
    with pytest.raises(LaminaError, match=needle):
        export(artifact, "vptq", str(dest), progress=False)
    assert not dest.exists()
