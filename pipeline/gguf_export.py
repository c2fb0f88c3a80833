"""`lamina export --format gguf`: one `.gguf` file that llama.cpp loads, from a published lamina
artifact (each quantized linear dequantized, then re-quantized into the GGUF block type) or
from an unquantized checkpoint folder (config.json + safetensors).

What convert_hf_to_gguf.py and llama-quantize would make of the model: llama.cpp's tensor
names (`token_embd.weight`, `blk.N.attn_q.weight`, ..., `output_norm.weight`, `output.weight`
unless the embeddings are tied), the rows of attn_q/attn_k permuted the way llama.cpp's Llama
converter permutes them (transformers' GGUF loader undoes it), norms, biases and other 1-D
tensors in F32, every 2-D weight in the type llama.cpp's file type gives it
(algorithms.gguf_quants.tensor_type), the hyperparameters and the tokenizer
(pipeline.gguf_vocab).

The model is read tensor by tensor through lamina's storage layer; the file is written
as it goes (the header first, from the shapes alone), into a local temporary file, then
uploaded into the export's staging folder and published like every export: the manifest
last. Every refusal comes before the first tensor is read.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib.metadata import version

import gguf
import numpy as np
import torch
from tqdm import tqdm

from algorithms import Format, weight_from_tensors
from algorithms.gguf_quants import FILE_TYPES, FileType, Type, quantize, row_bytes, tensor_type
from kernels.reference import dequantize
from pipeline.architectures import layout_for
from pipeline.errors import LaminaError
from pipeline.export import ExportReport
from pipeline.gguf_vocab import (
    Vocab,
    add_hyperparameters,
    check_rope,
    llama3_rope_factors,
    read_vocab,
    rope_parameters,
)
from storage import StorageError
from storage.checkpoint import Checkpoint
from storage.fs import open_location
from storage.manifest import MANIFEST, read_manifest
from storage.staging import claim, publish, staging
from storage.writer import put_file
from workers.block import MARKERS, STORED, stored_format

DEFAULT_TYPE = "Q4_K_M"
GGUF_ARCH = {"llama": "llama", "mistral": "llama"}  # model_type -> llama.cpp's architecture (Mistral's is Llama's)
FORMATS = ("uniform", "codebook", "vector", "incoherent", "float")  # lamina formats kernels.reference dequantizes
LINEARS = {  # a block's linears, in llama.cpp's order, and their llama.cpp names
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
NORMS = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight"}
IGNORED = ("rotary_emb.inv_freq",)  # buffers old checkpoints saved, which llama.cpp recomputes


@dataclass(frozen=True)
class Source:
    checkpoint: Checkpoint
    manifest: dict | None  # a published artifact's; None for a plain checkpoint
    format: Format | None  # how its quantized linears are stored; None when there are none

    @property
    def config(self) -> dict:
        return self.checkpoint.config


@dataclass(frozen=True)
class Entry:
    """One tensor of the GGUF file and where its values come from."""

    name: str  # llama.cpp's name
    source: str  # the checkpoint tensor, or the quantized linear (its stored tensors' prefix)
    shape: tuple[int, ...]  # numpy order: [rows, cols] or [n]
    qtype: Type
    heads: int = 0  # attn_q / attn_k: llama.cpp's row permutation over this many heads
    quantized: bool = False  # a lamina-quantized linear, dequantized first

    @property
    def nbytes(self) -> int:
        rows = int(np.prod(self.shape[:-1], dtype=np.int64))
        return rows * row_bytes(self.qtype, self.shape[-1])


def file_type(name: str) -> FileType:
    if name not in FILE_TYPES:
        raise LaminaError(f"unknown GGUF type {name!r} (supported: {', '.join(FILE_TYPES)})")
    return FILE_TYPES[name]


def open_source(uri: str) -> Source:
    """A published lamina artifact or an unquantized checkpoint; anything else is refused."""
    try:
        checkpoint = Checkpoint(uri)
    except StorageError as e:
        raise LaminaError(str(e)) from None
    qc = checkpoint.config.get("quantization_config")
    fmt = (qc or {}).get("format", "uniform")
    if qc and (qc.get("quant_method") != "lamina" or fmt not in FORMATS):
        raise LaminaError(
            f"{uri}: quantization_config {qc.get('quant_method')!r} format {fmt!r} cannot be dequantized here; GGUF "
            f"export reads lamina artifacts ({', '.join(FORMATS)}) and unquantized checkpoints"
        )
    try:
        manifest = read_manifest(uri) if qc or checkpoint.location.exists(MANIFEST) else None
        return Source(checkpoint, manifest, stored_format(qc) if qc else None)
    except StorageError as e:
        raise LaminaError(str(e)) from None
    except (KeyError, ValueError) as e:
        raise LaminaError(f"{uri}: quantization_config of the {fmt} format cannot be read: {e}") from None


def check_model(config: dict, uri: str) -> str:
    """The llama.cpp architecture of a Llama-like model; refuses the others."""
    layout_for(config)  # refuses what lamina cannot read at all
    arch = GGUF_ARCH.get(config.get("model_type"))
    if arch is None:
        raise LaminaError(
            f"{uri}: GGUF export writes Llama-architecture models ({', '.join(GGUF_ARCH)}), "
            f"not {config.get('model_type')!r}"
        )
    keys = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size")
    missing = [k for k in keys if k not in config]
    if missing:
        raise LaminaError(f"{uri}/config.json: {', '.join(missing)} missing")
    check_rope(config, uri)
    return arch


def preflight(uri: str) -> None:
    """What `lamina plan` checks for a recipe's GGUF export: the source's architecture and tokenizer."""
    source = open_source(uri)
    check_model(source.config, uri)
    read_vocab(source.checkpoint, source.config["vocab_size"])


def head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def linear_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """Each block linear's weight shape [out, in]."""
    hidden, inter, d = config["hidden_size"], config["intermediate_size"], head_dim(config)
    q, kv = config["num_attention_heads"] * d, (config.get("num_key_value_heads") or config["num_attention_heads"]) * d
    return {
        "self_attn.q_proj": (q, hidden),
        "self_attn.k_proj": (kv, hidden),
        "self_attn.v_proj": (kv, hidden),
        "self_attn.o_proj": (hidden, q),
        "mlp.gate_proj": (inter, hidden),
        "mlp.up_proj": (inter, hidden),
        "mlp.down_proj": (hidden, inter),
    }


def permute_rows(W: torch.Tensor, heads: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute: within each head, the rows of the two rotary
    halves interleaved (rows [h, 2, d/2] -> [h, d/2, 2]); 1-D biases alike."""
    return W.reshape(heads, 2, W.shape[0] // heads // 2, *W.shape[1:]).swapaxes(1, 2).reshape(W.shape)


class Planner:
    """The GGUF file's tensors, in writing order, from config.json and the shard headers."""

    def __init__(self, source: Source, ft: FileType):
        self.source, self.ft, self.config = source, ft, source.config
        self.layout = layout_for(self.config)
        self.names = set(source.checkpoint.weight_map)
        self.used: set[str] = set()
        self.n_layers = int(self.config["num_hidden_layers"])
        heads = self.config["num_attention_heads"]
        self.kv_heads = self.config.get("num_key_value_heads") or heads
        self.is_70b = self.n_layers == 80 and self.kv_heads != heads  # llama.cpp's LLM_TYPE_70B
        self.tied = bool(self.config.get("tie_word_embeddings")) or self.layout.lm_head not in self.names
        if self.layout.lm_head not in self.names and self.config.get("tie_word_embeddings") is False:
            raise LaminaError(f"{source.checkpoint.uri}: missing tensor {self.layout.lm_head} (embeddings not tied)")

    def plain(self, name: str, gguf_name: str, role: str, layer: int = 0, heads: int = 0) -> Entry:
        """A tensor stored as it is: 1-D in F32, 2-D in the file type's type for its role."""
        if name not in self.names:
            raise LaminaError(f"{self.source.checkpoint.uri}: missing tensor {name}")
        self.used.add(name)
        shape = tuple(self.source.checkpoint.entry(name).shape)
        qtype = Type.F32 if len(shape) == 1 else self.type_of(role, layer, shape[-1])
        return Entry(gguf_name, name, shape, qtype, heads=heads)

    def type_of(self, role: str, layer: int, cols: int) -> Type:
        return tensor_type(
            self.ft, role=role, layer=layer, n_layers=self.n_layers, cols=cols, tied=self.tied, is_70b=self.is_70b
        )

    def linear(self, i: int, linear: str, shape: tuple[int, int]) -> list[Entry]:
        name, role = f"{self.layout.block(i)}{linear}", LINEARS[linear]
        heads = {"attn_q": self.config["num_attention_heads"], "attn_k": self.kv_heads}.get(role, 0)
        stored = [n for n in self.names if n.rpartition(".")[0] == name and n.rpartition(".")[2] in STORED]
        if any(n.rpartition(".")[2] in MARKERS for n in stored):
            self.used.update(stored)
            qtype = self.type_of(role, i, shape[1])
            entries = [Entry(f"blk.{i}.{role}.weight", name, shape, qtype, heads=heads, quantized=True)]
        else:
            entries = [self.plain(f"{name}.weight", f"blk.{i}.{role}.weight", role, i, heads)]
            if entries[0].shape != shape:
                raise LaminaError(f"{name}.weight has shape {list(entries[0].shape)}, the config implies {list(shape)}")
        if f"{name}.bias" in self.names:
            entries.append(self.plain(f"{name}.bias", f"blk.{i}.{role}.bias", role, i, heads))
        return entries

    def entries(self) -> list[Entry]:
        out = [self.plain(self.layout.embed, "token_embd.weight", "token_embd")]
        shapes = linear_shapes(self.config)
        for i in range(self.n_layers):
            block = self.layout.block(i)
            out += [self.plain(f"{block}{n}", f"blk.{i}.{g}", "norm", i) for n, g in NORMS.items()]
            for linear, shape in shapes.items():
                out += self.linear(i, linear, shape)
        out.append(self.plain(self.layout.final_norm, "output_norm.weight", "norm"))
        if not self.tied:
            out.append(self.plain(self.layout.lm_head, "output.weight", "output"))
        elif self.layout.lm_head in self.names:
            self.used.add(self.layout.lm_head)
        left = sorted(n for n in self.names - self.used if not n.endswith(IGNORED))
        if left:
            raise LaminaError(
                f"{self.source.checkpoint.uri}: {len(left)} tensors have no place in llama.cpp's Llama layout, "
                f"e.g. {left[0]}"
            )
        if rope_parameters(self.config)["rope_type"] == "llama3":
            out.append(Entry("rope_freqs.weight", "", (head_dim(self.config) // 2,), Type.F32))
        return out


def values(source: Source, entry: Entry) -> torch.Tensor:
    """The float32 values of one entry: read (and dequantized) from the checkpoint, permuted."""
    if entry.name == "rope_freqs.weight":
        return llama3_rope_factors(source.config, head_dim(source.config))
    checkpoint = source.checkpoint
    if entry.quantized:
        prefix = f"{entry.source}."
        names = [n for n in checkpoint.weight_map if n.startswith(prefix) and n[len(prefix) :] in STORED]
        parts = {n[len(prefix) :]: t for n, t in checkpoint.read(names).items()}
        W = dequantize(weight_from_tensors(parts, source.format), torch.float32)
    else:
        W = checkpoint.read([entry.source])[entry.source].float()
    if tuple(W.shape) != entry.shape:
        raise LaminaError(f"{entry.source}: decoded to shape {list(W.shape)}, expected {list(entry.shape)}")
    return permute_rows(W, entry.heads) if entry.heads else W


def write_gguf(
    path: str, source: Source, entries: list[Entry], *, arch: str, ft: FileType, vocab: Vocab, progress: bool
) -> None:
    """Header, metadata and tensor infos first (from the entries alone), then each tensor's data."""
    writer = gguf.GGUFWriter(path, arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(source.checkpoint.uri.rstrip("/").rsplit("/", 1)[-1])
    writer.add_quantized_by(f"lamina {version('lamina')}")
    add_hyperparameters(writer, source.config, head_dim=head_dim(source.config))
    writer.add_file_type(int(ft.ftype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    vocab.add_to(writer)
    for e in entries:
        floating = e.qtype in (Type.F32, Type.F16)
        dtype = {Type.F32: np.float32, Type.F16: np.float16}.get(e.qtype, np.uint8)
        shape = e.shape if floating else (*e.shape[:-1], row_bytes(e.qtype, e.shape[-1]))
        writer.add_tensor_info(e.name, shape, np.dtype(dtype), e.nbytes, raw_dtype=None if floating else e.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool, intra_op_threads(1):
        for e in tqdm(entries, desc=f"export gguf {ft.name}", unit="tensor", disable=not progress):
            try:
                data = quantize(values(source, e), e.qtype, pool=pool)
            except ValueError as err:
                raise LaminaError(f"{e.source}: cannot be written as {e.qtype.name}: {err}") from None
            writer.write_tensor_data(data)
    writer.close()


@contextlib.contextmanager
def intra_op_threads(count: int) -> Iterator[None]:
    """torch's intra-op threads set to `count` for a while. The K-quant fits are thousands of
    small tensor ops: with torch's own thread pool each op waits for every thread, which on a
    busy machine cost 10-25x the work itself here; one thread per op, and row chunks spread
    over a pool of threads instead, keeps the cores busy without those waits."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def gguf_name(gguf_type: str) -> str:
    """The file's name in the export folder."""
    return f"model-{gguf_type}.gguf"


def export_gguf(artifact: str, dest: str, *, gguf_type: str = DEFAULT_TYPE, progress: bool = True) -> ExportReport:
    """Write `artifact` (a published lamina artifact or an unquantized checkpoint) to `dest` as
    one GGUF file of llama.cpp file type `gguf_type`, published with a manifest."""
    start = time.perf_counter()
    ft = file_type(gguf_type)
    source = open_source(artifact)
    arch = check_model(source.config, source.checkpoint.uri)
    vocab = read_vocab(source.checkpoint, source.config["vocab_size"])
    entries = Planner(source, ft).entries()
    output = open_location(dest)
    if output.exists(MANIFEST):
        raise LaminaError(f"export destination {output.uri} already holds a published artifact")
    manifest = source.manifest or {}
    fingerprint = source.checkpoint.fingerprint
    recipe_hash = f"export:gguf:{gguf_type}:{manifest.get('recipe_hash', '')}"
    run_id = claim(output, recipe_hash=recipe_hash, fingerprint=fingerprint)
    name = gguf_name(gguf_type)
    with tempfile.TemporaryDirectory(prefix="lamina-gguf-") as folder:
        path = os.path.join(folder, name)
        write_gguf(path, source, entries, arch=arch, ft=ft, vocab=vocab, progress=progress)
        record = put_file(staging(output, run_id), name, path)
    linears = sum(e.name.endswith(".weight") and e.name.split(".")[-2] in LINEARS.values() for e in entries)
    report = ExportReport(output=output.uri, format="gguf", linears=linears, nbytes=record.size, seconds=0.0)
    report.files[name] = record
    publish(
        output,
        run_id,
        [record],
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        export={"format": "gguf", "gguf_type": gguf_type, "file": name, "from": source.checkpoint.uri},
        recipe=manifest.get("recipe"),
        recipe_hash=manifest.get("recipe_hash"),
        source=manifest.get("source") or {"uri": source.checkpoint.uri, "fingerprint": fingerprint},
        versions={**(manifest.get("versions") or {}), "gguf": version("gguf")},
    )
    report.seconds = time.perf_counter() - start
    return report
