"""GGUF export: our block quantizers against the `gguf` package's decoders, llama.cpp's
per-tensor types, and whole exports read back by the gguf package's reader and loaded by
transformers' GGUF support (llama.cpp itself is not installed here)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGUFReader
from safetensors.torch import load_file

from algorithms import gguf_quants as gq
from algorithms import weight_from_tensors
from kernels.reference import dequantize
from pipeline.cli import main
from pipeline.driver import quantize
from pipeline.errors import LaminaError
from pipeline.export import export
from pipeline.gguf_export import Planner, gguf_name, intra_op_threads, open_source, permute_rows
from pipeline.gguf_vocab import llama3_rope_factors
from pipeline.recipe import parse
from storage.checkpoint import Checkpoint
from storage.fs import open_location
from storage.manifest import read_manifest, verify
from storage.writer import put_file
from tests.conftest import DOCS, MODEL, SMALL_BLOCKS, small_recipe_doc
from workers.block import stored_format

T = gq.Type
BLOCK_TYPES = (T.Q8_0, T.Q4_0, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K)
LINEARS = {  # llama.cpp's names of a Llama block's tensors, written out independently of the exporter
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
HEADS, KV_HEADS, LAYERS = 9, 3, 30  # the fixture model
MORE_BITS_30 = {0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29}  # llama.cpp's use_more_bits for 30 layers
TEXT = "The tutorial says: def f(x):\n    return x ** 2  # 12345, wörld! <|im_start|>user\nHi<|im_end|>"


@pytest.fixture(scope="module", autouse=True)
def one_thread_per_op():
    """As the exporter runs the fits: torch's per-op thread pool only waits on a busy machine."""
    with intra_op_threads(1):
        yield


# --- (a) block quantizers ----------------------------------------------------------------------------


def weights() -> torch.Tensor:
    """[64, 768] Gaussian rows with the edge cases a block meets: zeros, constants of either
    sign, values near the smallest normal, one large outlier, a row of one sign."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(64, 768, generator=g) * 0.02
    W[0] = 0  # all-zero blocks
    W[1] = -0.3  # constant negative
    W[2] = 0.7  # constant positive
    W[3] = torch.randn(768, generator=g) * 1e-30
    W[4, 100] = 3.0  # an outlier in one block
    W[5] = W[5].abs()  # every block one-signed
    W[6, :256] = torch.linspace(-1, 1, 256)
    return W


def gguf_decode(data: np.ndarray, qtype: T) -> torch.Tensor:
    return torch.from_numpy(np.asarray(gguf.quants.dequantize(data, qtype), dtype=np.float32).copy())


@pytest.mark.parametrize("qtype", [*BLOCK_TYPES, T.F16], ids=lambda t: t.name)
def test_quantized_bytes_decode_in_gguf_to_our_decoding(qtype) -> None:
    W = weights()
    data = gq.quantize(W, qtype)
    theirs = gguf_decode(data, qtype).reshape(W.shape)
    assert data.shape[0] == 64 and (qtype == T.F16 or data.shape[1] == gq.row_bytes(qtype, 768))
    assert torch.equal(theirs, gq.dequantize(data, qtype))
    assert np.array_equal(data, gq.quantize(W.clone(), qtype))  # a function of the weights
    assert torch.equal(theirs[0], torch.zeros(768))  # all-zero blocks stay exactly zero


@pytest.mark.parametrize("qtype", list(gq.K_QUANTS), ids=lambda t: t.name)
def test_k_quant_blocks_decode_to_what_the_quantizer_intended(qtype) -> None:
    blocks = weights().reshape(-1, gq.QK_K)
    data, decoded = gq.K_QUANTS[qtype](blocks)
    assert data.dtype == torch.uint8 and data.shape == (blocks.shape[0], gguf.GGML_QUANT_SIZES[qtype][1])
    assert torch.equal(gguf_decode(data.numpy(), qtype), decoded)


def block_view(W: torch.Tensor, size: int) -> torch.Tensor:
    return W.reshape(-1, size)


def fp16_error(x: torch.Tensor) -> torch.Tensor:
    """How far fp16 rounding can move x: half an ulp, relative when normal, 2^-25 when subnormal."""
    return torch.maximum(x.abs() * 2**-11, torch.full_like(x, 2**-25))


def legacy_bound(W: torch.Tensor, qtype: T) -> torch.Tensor:
    """The largest error each 32-block of a legacy type allows: half a step for Q8_0 and Q5_1, a
    whole step for Q4_0/Q5_0 (the end opposite the largest |x| is one code short), plus the fp16
    rounding of the scale times the largest code (and of Q5_1's minimum)."""
    blocks = block_view(W, 32)
    amax = blocks.abs().amax(1, keepdim=True)
    if qtype in (T.Q8_0, T.Q4_0, T.Q5_0):
        levels, rounding = {T.Q8_0: (127, 0.5), T.Q4_0: (8, 1.0), T.Q5_0: (16, 1.0)}[qtype]
        d = amax / levels
        return d * rounding + levels * fp16_error(d)
    lo, hi = blocks.amin(1, keepdim=True), blocks.amax(1, keepdim=True)
    d = (hi - lo) / 31
    return d / 2 + 31 * fp16_error(d) + fp16_error(lo)


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0, T.Q5_0, T.Q5_1], ids=lambda t: t.name)
def test_legacy_types_err_within_their_block_bound(qtype) -> None:
    W = weights()
    err = (gq.dequantize(gq.quantize(W, qtype), qtype) - W).abs()
    assert (block_view(err, 32) <= legacy_bound(W, qtype) * (1 + 1e-6)).all()


def k_steps(data: np.ndarray, qtype: T) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Each sub-block's step and shift as stored, -> ([m, 1], [m, 1], lowest code, highest code)."""
    b = torch.from_numpy(data).reshape(-1, gguf.GGML_QUANT_SIZES[qtype][1])
    if qtype == T.Q6_K:
        sc = b[:, 192:208].contiguous().view(torch.int8).float()
        return (gq.fp16_at(b, 208) * sc).reshape(-1, 1), torch.zeros(b.shape[0] * 16, 1), -32, 31
    sc, m = gq.k_scale_min(b[:, 4:16])
    step, shift = gq.fp16_at(b, 0) * sc.float(), gq.fp16_at(b, 2) * m.float()
    return step.reshape(-1, 1), shift.reshape(-1, 1), 0, 15 if qtype == T.Q4_K else 31


@pytest.mark.parametrize("qtype", list(gq.K_QUANTS), ids=lambda t: t.name)
def test_k_quants_round_to_nearest_within_the_stored_grid(qtype) -> None:
    """Every weight the stored grid can reach is within half a step of its decoding; the
    sub-block fits beat plain min-max grids of the same bits (Q4_0, Q5_0)."""
    W = weights()
    data = gq.quantize(W, qtype)
    step, shift, lo, hi = k_steps(data, qtype)
    sub = 16 if qtype == T.Q6_K else 32
    x = block_view(W, sub)
    err = (block_view(gq.dequantize(data, qtype), sub) - x).abs()
    codes = (x + shift) / step  # Q6_K's steps carry the sign of its block scale
    reach = (step != 0) & (codes >= lo - 0.5) & (codes <= hi + 0.5)
    assert reach[step.squeeze(1) != 0].float().mean() > 0.99  # a zero step: the all-zero and constant blocks
    assert (err <= step.abs() / 2 * (1 + 1e-5) + 1e-30)[reach].all()
    G = torch.randn(256, 1024, generator=torch.Generator().manual_seed(1))
    rel = {t: float((gq.dequantize(gq.quantize(G, t), t) - G).norm() / G.norm()) for t in (qtype, T.Q4_0, T.Q5_0)}
    limit = {T.Q4_K: rel[T.Q4_0], T.Q5_K: rel[T.Q5_0], T.Q6_K: rel[T.Q5_0] / 2}[qtype]
    assert rel[qtype] < limit


def test_constant_blocks_and_bad_weights() -> None:
    W = torch.full((2, 256), -0.3)
    W[1] = 0.7
    for qtype in BLOCK_TYPES:
        got = gq.dequantize(gq.quantize(W, qtype), qtype)
        assert torch.allclose(got, W, rtol=2**-9, atol=0), qtype.name  # the fp16 scales' rounding
    with pytest.raises(ValueError, match="NaN or infinity"):
        gq.quantize(torch.tensor([[float("nan")] * 32]), T.Q8_0)
    with pytest.raises(ValueError, match="multiple of 256"):
        gq.quantize(torch.zeros(2, 576), T.Q4_K)


# --- llama.cpp's per-tensor types ------------------------------------------------------------------


def test_use_more_bits_and_the_q4_k_m_mixture() -> None:
    assert {i for i in range(30) if gq.use_more_bits(i, 30)} == MORE_BITS_30
    ft = gq.FILE_TYPES["Q4_K_M"]
    llama8b = dict(n_layers=32, tied=False)  # hidden 4096, MLP 14336: every row fits 256-blocks
    more = {i for i in range(32) if gq.use_more_bits(i, 32)}
    assert more == {0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31}
    for i in range(32):
        want = T.Q6_K if i in more else T.Q4_K
        assert gq.tensor_type(ft, role="attn_v", layer=i, cols=4096, **llama8b) == want
        assert gq.tensor_type(ft, role="ffn_down", layer=i, cols=14336, **llama8b) == want
        assert gq.tensor_type(ft, role="attn_q", layer=i, cols=4096, **llama8b) == T.Q4_K
    assert gq.tensor_type(ft, role="output", cols=4096, **llama8b) == T.Q6_K
    assert gq.tensor_type(ft, role="token_embd", cols=4096, **llama8b) == T.Q4_K  # untied: the default
    # a 70B (80 layers, grouped-query attention): attn_v is Q5_K where it would be Q4_K
    assert gq.tensor_type(ft, role="attn_v", layer=40, n_layers=80, cols=8192, tied=False, is_70b=True) == T.Q5_K
    assert gq.tensor_type(ft, role="attn_v", layer=0, n_layers=80, cols=8192, tied=False, is_70b=True) == T.Q6_K
    # rows of 576 (the fixture): K-quants fall back to Q5_0 / Q8_0; the tied embeddings get Q8_0
    assert gq.tensor_type(ft, role="attn_q", layer=3, n_layers=30, cols=576, tied=True) == T.Q5_0
    assert gq.tensor_type(ft, role="attn_v", layer=0, n_layers=30, cols=576, tied=True) == T.Q8_0
    assert gq.tensor_type(ft, role="token_embd", cols=576, tied=True) == T.Q8_0


def test_other_file_types() -> None:
    q40, q80, f16 = gq.FILE_TYPES["Q4_0"], gq.FILE_TYPES["Q8_0"], gq.FILE_TYPES["F16"]
    assert gq.tensor_type(q40, role="output", cols=4096, tied=False) == T.Q6_K
    assert gq.tensor_type(q40, role="token_embd", cols=576, tied=True) == T.Q8_0  # Q6_K falls back
    assert gq.tensor_type(q40, role="ffn_down", layer=0, n_layers=30, cols=1536, tied=True) == T.Q4_0
    assert gq.tensor_type(q80, role="output", cols=4096, tied=False) == T.Q8_0
    assert gq.tensor_type(q80, role="attn_q", cols=100, tied=False) == T.F16  # no 32-block fits
    assert gq.tensor_type(f16, role="token_embd", cols=576, tied=True) == T.F16
    assert gq.tensor_type(gq.FILE_TYPES["Q5_K_M"], role="attn_q", cols=576, tied=True) == T.Q5_1


def test_llama3_rope_factors_match_transformers_frequencies(tmp_path) -> None:
    """rope_freqs.weight divides each rotary frequency the way transformers' llama3 rope does."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0}
    rope |= {"high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    folder = copy_model(tmp_path, rope_parameters=rope, max_position_embeddings=131072)
    entries = Planner(open_source(str(folder)), gq.FILE_TYPES["Q8_0"]).entries()
    assert (entries[-1].name, entries[-1].shape, entries[-1].qtype) == ("rope_freqs.weight", (32,), T.F32)
    config = LlamaConfig(**json.loads((folder / "config.json").read_text()))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config)
    plain = 1.0 / (500000.0 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))
    factors = llama3_rope_factors(config.to_dict(), 64)
    assert factors.min() == 1 and factors.max() == 8
    assert torch.allclose(plain / factors, scaled.float(), rtol=1e-5)


@pytest.mark.parametrize("store", ["file", "memory", "s3"], indirect=True)
def test_a_large_file_is_uploaded_in_parts(store, tmp_path) -> None:
    """The GGUF file reaches the export's staging folder in parts (multipart on S3), hashed as sent."""
    data = np.random.default_rng(0).integers(0, 256, size=20 * 2**20 + 7, dtype=np.uint8).tobytes()
    (tmp_path / "big.bin").write_bytes(data)
    location = open_location(store)
    record = put_file(location, "staging/big.bin", str(tmp_path / "big.bin"))
    assert (record.size, record.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert location.read_bytes("staging/big.bin") == data


# --- (b) exports of the fixture model, read back by the gguf package -----------------------------------


@pytest.fixture(scope="module")
def source() -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(MODEL.glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("gguf")
    out = {}
    for gguf_type in ("Q8_0", "Q4_K_M"):
        report = export(str(MODEL), "gguf", str(tmp / gguf_type), progress=False, gguf_type=gguf_type)
        assert report.format == "gguf" and report.linears == 7 * LAYERS
        out[gguf_type] = tmp / gguf_type
    return out


def hf_name(name: str) -> str:
    """llama.cpp's tensor name -> the checkpoint's."""
    if name.startswith("blk."):
        _, i, rest = name.split(".", 2)
        return f"model.layers.{i}.{LINEARS[rest]}"
    return {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}[name]


def heads_of(name: str) -> int:
    return HEADS if ".attn_q." in name else KV_HEADS if ".attn_k." in name else 0


def permute(W: torch.Tensor, name: str) -> torch.Tensor:
    return permute_rows(W, heads_of(name)) if heads_of(name) else W


def unpermute(W: torch.Tensor, name: str) -> torch.Tensor:
    """transformers' reverse of llama.cpp's q/k row permutation, written from its description."""
    heads = heads_of(name)
    if not heads:
        return W
    return W.reshape(heads, W.shape[0] // heads // 2, 2, *W.shape[1:]).swapaxes(1, 2).reshape(W.shape)


def expected_q4_k_m(name: str) -> T:
    """The fixture's types under llama-quantize Q4_K_M, worked out by hand: rows of 576 fit no
    256-block, so Q4_K becomes Q5_0 and Q6_K becomes Q8_0; ffn_down's rows of 1536 do fit."""
    if name.endswith("norm.weight"):
        return T.F32
    if name == "token_embd.weight":
        return T.Q8_0  # tied: the output's type, Q6_K -> Q8_0
    layer, role = int(name.split(".")[1]), name.split(".")[2]
    if role == "attn_v":
        return T.Q8_0 if layer in MORE_BITS_30 else T.Q5_0
    if role == "ffn_down":
        return T.Q6_K if layer in MORE_BITS_30 else T.Q4_K
    return T.Q5_0


def read_back(folder: Path, gguf_type: str) -> GGUFReader:
    assert verify(str(folder)) == [] and [*read_manifest(str(folder))["files"]] == [gguf_name(gguf_type)]
    return GGUFReader(folder / gguf_name(gguf_type))


@pytest.mark.parametrize("gguf_type", ["Q8_0", "Q4_K_M"])
def test_export_reads_back_to_what_we_quantized(exports, source, gguf_type) -> None:
    reader = read_back(exports[gguf_type], gguf_type)
    names = [t.name for t in reader.tensors]
    want = ["token_embd.weight", *(f"blk.{i}.{n}" for i in range(LAYERS) for n in LINEARS), "output_norm.weight"]
    assert sorted(names) == sorted(want)  # tied embeddings: no output.weight
    for t in reader.tensors:
        W = source[hf_name(t.name)]
        assert tuple(int(d) for d in reversed(t.shape)) == tuple(W.shape), t.name
        want_type = T.F32 if W.dim() == 1 else T.Q8_0 if gguf_type == "Q8_0" else expected_q4_k_m(t.name)
        assert t.tensor_type == want_type, t.name
        data = np.asarray(t.data)
        theirs = gguf_decode(data, t.tensor_type).reshape(W.shape)
        assert torch.equal(theirs, gq.dequantize(data.reshape(W.shape[0], -1), t.tensor_type).reshape(W.shape))
        if t.name.startswith(("token_embd.", "blk.0.", "blk.29.")):  # every type; all of them would cost seconds
            ours = gq.quantize(permute(W, t.name), t.tensor_type)
            assert np.array_equal(data.reshape(ours.shape), ours), t.name  # the bytes we meant to write
        back = unpermute(theirs, t.name)
        rel = float((back - W).norm() / W.norm())
        assert rel < {T.F32: 1e-9, T.Q8_0: 0.01, T.Q6_K: 0.03, T.Q5_0: 0.07, T.Q4_K: 0.1}[t.tensor_type], t.name
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    assert fields["general.architecture"] == "llama"
    assert fields["general.file_type"] == {"Q8_0": 7, "Q4_K_M": 15}[gguf_type]
    assert [fields[f"llama.{k}"] for k in ("block_count", "embedding_length", "feed_forward_length")] == [30, 576, 1536]
    assert [fields[f"llama.attention.{k}"] for k in ("head_count", "head_count_kv")] == [HEADS, KV_HEADS]
    assert fields["llama.rope.freq_base"] == 100000.0 and fields["llama.rope.dimension_count"] == 64
    assert fields["llama.context_length"] == 8192 and fields["llama.vocab_size"] == 49152
    assert fields["tokenizer.chat_template"] == (MODEL / "chat_template.jinja").read_text()


def test_tokenizer_metadata(exports) -> None:
    fields = read_back(exports["Q8_0"], "Q8_0").fields
    tokenizer = json.loads((MODEL / "tokenizer.json").read_text())
    tokens = fields["tokenizer.ggml.tokens"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()
    assert fields["tokenizer.ggml.model"].contents() == "gpt2" and fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert len(tokens) == 49152 and all(tokens[i] == t for t, i in tokenizer["model"]["vocab"].items())
    assert types[:17] == [3] * 17 and set(types[17:]) == {1}  # the 17 added special tokens are CONTROL
    assert fields["tokenizer.ggml.merges"].contents()[:2] == ["Ġ t", "Ġ a"]
    ids = {k: fields[f"tokenizer.ggml.{k}_token_id"].contents() for k in ("bos", "eos", "unknown", "padding")}
    assert ids == {"bos": 1, "eos": 2, "unknown": 0, "padding": 2}
    assert fields["tokenizer.ggml.add_bos_token"].contents() is False


# --- (c) transformers' GGUF loader -----------------------------------------------------------------


def test_transformers_loads_the_export(exports, source) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(exports["Q4_K_M"]), gguf_name("Q4_K_M")
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    reader = GGUFReader(exports["Q4_K_M"] / name)
    state = model.state_dict()
    for t in reader.tensors:
        decoded = gguf_decode(np.asarray(t.data), t.tensor_type).reshape(source[hf_name(t.name)].shape)
        assert torch.equal(state[hf_name(t.name)], unpermute(decoded, t.name)), t.name
    assert torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    ours = AutoTokenizer.from_pretrained(MODEL)
    assert tokenizer(TEXT).input_ids == ours(TEXT).input_ids
    assert "<|im_start|>" in tokenizer.convert_ids_to_tokens(tokenizer(TEXT).input_ids)
    reference = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    text = (DOCS / "tutorial" / "introduction.rst.txt").read_text()[:4000]
    ids = ours(text, return_tensors="pt").input_ids[:, :256]
    with torch.no_grad():
        got, want = model(ids).logits[0, :-1], reference(ids).logits[0, :-1]
    nll = [float(torch.nn.functional.cross_entropy(x, ids[0, 1:])) for x in (got, want)]
    assert nll[0] < nll[1] * 1.05  # Q4_K_M costs this 135M model a few percent of NLL
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.8


# --- (d) a quantized lamina artifact ---------------------------------------------------------------


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, ray_cluster, small_model) -> tuple[str, str]:
    """An asymmetric 4-bit g64 RTN artifact of the 4-block model, whose recipe exports GGUF Q8_0."""
    tmp = tmp_path_factory.mktemp("gguf-artifact")
    export_to = {"format": "gguf", "gguf_type": "Q8_0", "output": str(tmp / "gguf")}
    doc = small_recipe_doc(tmp, small_model, scheme={"algorithm": "rtn", "sym": False}, export=[export_to])
    report = quantize(parse(doc), progress=False)
    assert report.exports == [str(tmp / "gguf")]
    return report.output, report.exports[0]


def test_artifact_exports_within_q8_0_of_its_dequantized_weights(artifact) -> None:
    uri, folder = artifact
    checkpoint = Checkpoint(uri)
    fmt = stored_format(checkpoint.config["quantization_config"])
    reader = read_back(Path(folder), "Q8_0")
    assert read_manifest(folder)["export"]["from"] == checkpoint.uri
    linears = 0
    for t in reader.tensors:
        name = hf_name(t.name)
        module = name.removesuffix(".weight")
        if f"{module}.qweight" in checkpoint.weight_map:
            parts = checkpoint.read([n for n in checkpoint.weight_map if n.rpartition(".")[0] == module])
            W = dequantize(weight_from_tensors({n.rpartition(".")[2]: v for n, v in parts.items()}, fmt))
            linears += 1
        else:
            W = checkpoint.read([name])[name]
        back = unpermute(gguf_decode(np.asarray(t.data), t.tensor_type).reshape(W.shape), t.name)
        if W.dim() == 1:
            assert t.tensor_type == T.F32 and torch.equal(back, W)
        else:
            assert t.tensor_type == T.Q8_0
            err = block_view((back - W).abs(), 32)
            assert (err <= legacy_bound(W, T.Q8_0) * (1 + 1e-6)).all(), t.name
    assert linears == 7 * SMALL_BLOCKS


def test_cli_exports_an_artifact(artifact, tmp_path, capsys) -> None:
    dest = tmp_path / "q40"
    assert main(["-q", "export", artifact[0], "--format", "gguf", "--gguf-type", "Q4_0", str(dest)]) == 0
    assert "model-Q4_0.gguf" in capsys.readouterr().out
    types = {t.name: t.tensor_type for t in read_back(dest, "Q4_0").tensors}
    assert types["blk.0.attn_q.weight"] == T.Q4_0 and types["token_embd.weight"] == T.Q8_0
    assert main(["export", artifact[0], "--format", "gguf", str(dest)]) == 2  # published already
    assert "already holds a published artifact" in capsys.readouterr().err


# --- (e) refused before any work -------------------------------------------------------------------


def copy_model(tmp: Path, **config: object) -> Path:
    """The fixture's config (with `config` over it) and tokenizer, and links to its shards."""
    folder = tmp / "model"
    folder.mkdir()
    for f in MODEL.iterdir():
        if f.suffix == ".safetensors":
            (folder / f.name).symlink_to(f)
        else:
            shutil.copy(f, folder / f.name)
    doc = {**json.loads((MODEL / "config.json").read_text()), **config}
    (folder / "config.json").write_text(json.dumps({k: v for k, v in doc.items() if v is not None}))
    return folder


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"model_type": "qwen2"}, "GGUF export writes Llama-architecture models"),
        ({"model_type": "gpt2"}, "unsupported architecture 'gpt2'"),
        ({"quantization_config": {"quant_method": "gptq", "bits": 4}}, "'gptq' format 'uniform' cannot be dequantized"),
        ({"quantization_config": {"quant_method": "lamina", "format": "fp8"}}, "format 'fp8' cannot be dequantized"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "rope_type 'yarn' is not one GGUF"),
        ({"tie_word_embeddings": False}, "missing tensor lm_head.weight"),
    ],
)
def test_bad_sources_are_refused_before_anything_is_written(tmp_path, config, message) -> None:
    folder = copy_model(tmp_path, **config)
    with pytest.raises(LaminaError, match=message):
        export(str(folder), "gguf", str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()


def test_bad_requests_are_refused(tmp_path) -> None:
    folder = copy_model(tmp_path)
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    with pytest.raises(LaminaError, match=r"unknown GGUF type 'Q3_K_S' \(supported: F16, Q8_0"):
        export(str(folder), "gguf", str(tmp_path / "out"), gguf_type="Q3_K_S")
    with pytest.raises(LaminaError, match="applies to the gguf format only"):
        export(str(folder), "gptq", str(tmp_path / "out"), gguf_type="Q8_0")
    with pytest.raises(LaminaError, match="gguf_type applies to format gguf, not gptq"):
        parse({**small_recipe_doc(tmp_path, MODEL), "export": [{"format": "gptq", "gguf_type": "Q8_0", "output": "x"}]})
    (folder / "tokenizer.json").write_text(json.dumps({**tokenizer, "pre_tokenizer": {"type": "Whitespace"}}))
    with pytest.raises(LaminaError, match=r"pre_tokenizer .* is none llama.cpp knows"):
        export(str(folder), "gguf", str(tmp_path / "out"))
    tokenizer["model"]["byte_fallback"] = True
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(LaminaError, match="sentencepiece-style vocabularies: not yet"):
        export(str(folder), "gguf", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
