"""`lamina export`: a published artifact in a layout serving engines load (GPTQ or
compressed-tensors pack-quantized for the uniform format, AQLM's Hugging Face layout for
the codebook format, the vptq package's for the vector format), streamed shard by shard
like the native artifact and published the same way (staging, then the manifest last),
so a reader never sees half an export. Every check that can refuse the export runs before the first shard is written."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from importlib.metadata import version

import torch
from tqdm import tqdm

from algorithms.codebook import CodebookScheme, CodebookWeight
from algorithms.float_formats import compressed_tensors_float_config, compressed_tensors_float_tensors
from algorithms.floatq import SUFFIXES as FLOAT
from algorithms.floatq import FloatScheme, FloatWeight
from algorithms.formats import (
    aqlm_config,
    aqlm_tensors,
    awq_tensors,
    compressed_tensors_tensors,
    gptq_tensors,
    vector_layout,
    vptq_config,
    vptq_layer,
    vptq_tensors,
)
from algorithms.types import QuantizedWeight
from algorithms.vector import SUFFIXES as VECTOR
from algorithms.vector import VectorScheme, VectorWeight
from pipeline.architectures import layout_for
from pipeline.errors import LaminaError
from storage import StorageError
from storage.checkpoint import INDEX, Checkpoint, read_json
from storage.fs import open_location
from storage.manifest import MANIFEST, read_manifest
from storage.staging import claim, publish, staging
from storage.writer import FileRecord, put_bytes, put_json, put_tensors

FORMATS = ("gptq", "compressed-tensors", "awq", "aqlm", "vptq", "gguf")
NO_QUIP_EXPORT = (  # why neither a QuIP recipe nor a QuIP artifact can be exported
    "has no export format here: QuIP#'s own loader needs its CUDA kernels; serve the native artifact with "
    "lamina's kernels"
)
EXPORTS = {  # by native format
    "uniform": ("gptq", "compressed-tensors", "awq"),
    "codebook": ("aqlm",),
    "vector": ("vptq",),
    "float": ("compressed-tensors",),
}
MARKER = {  # the suffix that marks a quantized linear
    "uniform": "qweight",
    "codebook": "codes",
    "vector": "indices",
    "float": "weight_scale",
}
SAFETENSORS = {torch.float16: "F16", torch.int16: "I16", torch.int32: "I32"}  # safetensors names the vector dtypes so
QUANTIZED = ("qweight", "scales", "qzeros", "g_idx")  # the native suffixes of a uniform linear
CODEBOOK = ("codes", "codebooks", "scales")  # the native suffixes of a codebook linear
Scheme = CodebookScheme | VectorScheme | FloatScheme  # the formats whose scheme quantization_config names in fields


@dataclass
class ExportReport:
    output: str
    format: str
    linears: int
    nbytes: int
    seconds: float
    files: dict[str, FileRecord] = field(default_factory=dict)


@dataclass(frozen=True)
class Native:
    """What the export needs to know about a published native artifact."""

    checkpoint: Checkpoint
    manifest: dict
    format: str  # "uniform", "codebook" or "vector", as quantization_config names it
    linears: tuple[str, ...]  # full names of the quantized linears, e.g. model.layers.0.mlp.up_proj
    kept: tuple[str, ...]  # full names of the block linears left in full precision
    bits: int = 0  # uniform: the grid
    group_size: int = 0  # 0: per-channel
    sym: bool = True
    codebook: CodebookScheme | None = None  # codebook: the scheme of every quantized linear
    vector: VectorScheme | None = None  # vector: likewise
    float: FloatScheme | None = None  # float: likewise

    @property
    def scheme(self) -> dict:
        return (self.manifest.get("recipe") or {}).get("scheme") or {}

    def has_g_idx(self, linear: str) -> bool:
        return f"{linear}.g_idx" in self.checkpoint.weight_map


def open_native(uri: str) -> Native:
    try:
        manifest = read_manifest(uri)
        checkpoint = Checkpoint(uri)
    except StorageError as e:
        raise LaminaError(str(e)) from None
    qc = checkpoint.config.get("quantization_config") or {}
    fmt = qc.get("format", "uniform")
    if qc.get("quant_method") == "lamina" and fmt == "incoherent":
        raise LaminaError(f"{uri}: an artifact of the incoherent (QuIP) format, which {NO_QUIP_EXPORT}")
    if qc.get("quant_method") != "lamina" or fmt not in EXPORTS or qc.get("out_group_size", 1) != 1:
        raise LaminaError(
            f"{uri}: not a lamina artifact of the uniform, codebook, vector or float format "
            f"(quantization_config {qc or 'missing'})"
        )
    marker = f".{MARKER[fmt]}"
    linears = tuple(n.removesuffix(marker) for n in checkpoint.names() if n.endswith(marker))
    layout = layout_for(checkpoint.config)
    blocks = range(int(checkpoint.config.get("num_hidden_layers", 0)))
    kept = tuple(
        f"{layout.block(i)}{lin}"
        for i in blocks
        for lin in layout.linears
        if f"{layout.block(i)}{lin}.weight" in checkpoint.weight_map
        and f"{layout.block(i)}{lin}{marker}" not in checkpoint.weight_map  # the float format's weight is quantized
    )
    if fmt == "codebook":
        return Native(checkpoint, manifest, fmt, linears, kept, codebook=native_scheme(uri, fmt, qc, CodebookScheme))
    if fmt == "vector":
        return Native(checkpoint, manifest, fmt, linears, kept, vector=native_scheme(uri, fmt, qc, VectorScheme))
    if fmt == "float":
        return Native(checkpoint, manifest, fmt, linears, kept, float=native_scheme(uri, fmt, qc, FloatScheme))
    bits, group_size, sym = int(qc["bits"]), int(qc["group_size"]), bool(qc["sym"])
    return Native(checkpoint, manifest, fmt, linears, kept, bits=bits, group_size=group_size, sym=sym)


def native_scheme(uri: str, fmt: str, qc: dict, kind: type[Scheme]) -> Scheme:
    try:
        return kind.from_fields(qc)
    except KeyError as e:
        raise LaminaError(f"{uri}: the {fmt} format's quantization_config has no {e.args[0]!r}") from None
    except ValueError as e:
        raise LaminaError(f"{uri}: the {fmt} format's quantization_config: {e}") from None


def quantized_weight(native: Native, tensors: dict[str, torch.Tensor], linear: str) -> QuantizedWeight:
    parts = {s: tensors[f"{linear}.{s}"] for s in QUANTIZED if f"{linear}.{s}" in tensors}
    return QuantizedWeight.from_tensors(parts, bits=native.bits, group_size=native.group_size)


def gptq_config(native: Native) -> dict:
    """quantization_config as transformers' GPTQConfig, GPTQModel and vLLM read it."""
    s = native.scheme
    return {
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        "bits": native.bits,
        "group_size": native.group_size or -1,
        "sym": native.sym,
        "desc_act": any(native.has_g_idx(lin) for lin in native.linears),
        "static_groups": bool(s.get("static_groups", False)),
        "true_sequential": bool(s.get("true_sequential", False)),
        "damp_percent": float(s.get("damp", 0.01)),
        "lm_head": False,
        "pack_dtype": "int32",
        "meta": {"quantizer": [f"lamina:{version('lamina')}"]},
        # GPTQModel's and vLLM's per-module overrides: "-:" leaves a module unquantized
        "dynamic": {f"-:^{re.escape(name)}$": {} for name in native.kept},
    }


def compressed_tensors_config(native: Native) -> dict:
    """quantization_config as compressed-tensors' QuantizationConfig (and vLLM) read it."""
    s = native.scheme
    per_channel = native.group_size == 0
    weights = {
        "num_bits": native.bits,
        "type": "int",
        "symmetric": native.sym,
        "strategy": "channel" if per_channel else "group",
        "group_size": None if per_channel else native.group_size,
        "dynamic": False,
        "actorder": "weight" if s.get("act_order") and s.get("algorithm") == "gptq" else None,
        "observer": "mse" if s.get("mse") else "minmax",
    }
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": None,
                "format": "pack-quantized",
            }
        },
        "ignore": ["lm_head", *native.kept],
        "kv_cache_scheme": None,
        "version": version("lamina"),
    }


def check_codebooks(native: Native) -> None:
    """AQLM's config holds one scheme for the whole model: refuse, from the shard headers
    alone, a linear whose tensors are not of the artifact's scheme."""
    s = native.codebook
    code_dtype = "I8" if s.code_dtype == torch.int8 else "I16"  # safetensors' names
    books_shape = (s.num_codebooks, s.codebook_size, 1, s.in_group_size)
    for linear in native.linears:
        codes, books, scales = (native.checkpoint.entry(f"{linear}.{suffix}") for suffix in CODEBOOK)
        if (
            (codes.dtype, codes.shape[2:]) != (code_dtype, (s.num_codebooks,))
            or (books.dtype, books.shape) != ("F16", books_shape)
            or (scales.dtype, scales.shape) != ("F16", (codes.shape[0], 1, 1, 1))
        ):
            raise LaminaError(
                f"{linear}: codes {codes.dtype} {list(codes.shape)}, codebooks {books.dtype} {list(books.shape)} and "
                f"scales {scales.dtype} {list(scales.shape)} are not of the artifact's scheme {s.name} "
                f"g{s.in_group_size}, the one AQLM's config can name"
            )


def model_dtype(native: Native) -> torch.dtype:
    """The dtype the model's config names (transformers 5's `dtype`, 4's `torch_dtype`), in
    which vptq holds the codebooks; float32 where it names none, as transformers loads it."""
    config = native.checkpoint.config
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise LaminaError(f"{native.checkpoint.uri}: the model's dtype {name!r} is not float32, float16 or bfloat16")
    return dtype


def vector_shape(native: Native, linear: str) -> tuple[int, int]:
    """(out, in) of a vector linear, from its indices' and perm's headers."""
    indices, perm = (native.checkpoint.entry(f"{linear}.{suffix}") for suffix in ("indices", "perm"))
    return indices.shape[1] * native.vector.vector_len, perm.shape[0]


def check_vectors(native: Native) -> None:
    """vptq's config names each linear's own layout, but lamina's names one scheme: refuse,
    from the shard headers alone, a linear whose tensors are not of the artifact's scheme,
    or a scheme that vptq cannot read."""
    s, weight_map = native.vector, native.checkpoint.weight_map
    model_dtype(native)
    for linear in native.linears:
        out, inn = vector_shape(native, linear)
        try:
            want = vector_layout(s, out, inn)
        except ValueError as e:
            raise LaminaError(f"{linear} [{out}, {inn}] cannot be exported to vptq: {e}") from None
        present = [suffix for suffix in VECTOR if f"{linear}.{suffix}" in weight_map]
        entries = {suffix: native.checkpoint.entry(f"{linear}.{suffix}") for suffix in present}
        got = {suffix: (e.dtype, tuple(e.shape)) for suffix, e in entries.items()}
        expected = {suffix: (SAFETENSORS[dtype], shape) for suffix, (shape, dtype) in want.items()}
        if got != expected:
            raise LaminaError(
                f"{linear}: tensors {got} are not of the artifact's scheme {s.name} (group_num {s.group_num}, "
                f"outlier_percent {s.outlier_percent}, normalize {s.normalize}), the one vptq's config is written from"
            )


def check_exportable(native: Native, fmt: str) -> None:
    """Refuse, naming the layers, what the format cannot hold; reads only small tensors."""
    if fmt not in FORMATS:
        raise LaminaError(f"unknown export format {fmt!r} (supported: {', '.join(FORMATS)})")
    if fmt not in EXPORTS[native.format]:
        raise LaminaError(
            f"{native.checkpoint.uri} is an artifact of the {native.format} format, which the {fmt} format cannot "
            f"hold; export it as {' or '.join(EXPORTS[native.format])}"
        )
    if fmt == "aqlm":
        check_codebooks(native)
    if fmt == "vptq":
        check_vectors(native)
    if fmt == "compressed-tensors":
        bad = [lin for lin in native.linears if native.has_g_idx(lin)]
        if bad:
            raise LaminaError(
                f"compressed-tensors cannot hold a g_idx (act-order groups in solve order, or a partial last "
                f"group), used by {len(bad)} linears, e.g. {bad[0]}; export --format gptq, or quantize with "
                "scheme.static_groups: true and a group size that divides every input size"
            )
    if fmt == "awq":
        check_awq(native)
    if fmt == "gptq" and not native.sym:
        names = [f"{lin}.qzeros" for lin in native.linears]
        for name, zeros in native.checkpoint.read(names).items():
            if bool((zeros == 0).any()):
                raise LaminaError(
                    f"GPTQ's format stores zero points as zero - 1 and cannot hold the zero point 0 of "
                    f"{int((zeros == 0).sum())} groups of {name.removesuffix('.qzeros')}; "
                    f"export --format compressed-tensors, or quantize with scheme.sym: true"
                )


def check_awq(native: Native) -> None:
    """AWQ's GEMM format: 4-bit codes, groups of consecutive columns, 8 outputs per word."""
    if native.bits != 4 or native.group_size == 0:
        grid = f"{native.bits}-bit {'per-channel' if native.group_size == 0 else f'g{native.group_size}'}"
        raise LaminaError(f"AWQ's format holds 4-bit grouped weights, not this artifact's {grid} grid")
    bad = [lin for lin in native.linears if native.has_g_idx(lin)]
    if bad:
        raise LaminaError(
            f"AWQ's format cannot hold a g_idx (act-order groups in solve order, or a partial last group), used by "
            f"{len(bad)} linears, e.g. {bad[0]}; quantize with scheme.static_groups: true or algorithm: awq"
        )
    narrow = [lin for lin in native.linears if native.checkpoint.entry(f"{lin}.qweight").shape[0] % 8]
    if narrow:
        out = native.checkpoint.entry(f"{narrow[0]}.qweight").shape[0]
        raise LaminaError(f"AWQ's format packs 8 outputs per word: {narrow[0]} has {out}, not a multiple of 8")


def awq_config(native: Native) -> dict:
    """quantization_config as transformers' AwqConfig and vLLM's AWQ read it (GEMM kernels)."""
    head = layout_for(native.checkpoint.config).lm_head.removesuffix(".weight")
    return {
        "quant_method": "awq",
        "version": "gemm",
        "bits": native.bits,
        "group_size": native.group_size,
        "zero_point": True,  # the grid's zero points are stored as they are, symmetric grids' too
        "modules_to_not_convert": [head, *native.kept],
    }


def linear_tensors(native: Native, fmt: str, tensors: dict[str, torch.Tensor], linear: str) -> dict[str, torch.Tensor]:
    """One quantized linear in the export's layout, by suffix."""
    if fmt == "aqlm":
        return aqlm_tensors(CodebookWeight.from_tensors({s: tensors[f"{linear}.{s}"] for s in CODEBOOK}))
    if fmt == "vptq":
        parts = {s: tensors[f"{linear}.{s}"] for s in VECTOR if f"{linear}.{s}" in tensors}
        return vptq_tensors(VectorWeight.from_tensors(parts, native.vector), model_dtype(native))
    if native.format == "float":
        parts = {s: tensors[f"{linear}.{s}"] for s in FLOAT if f"{linear}.{s}" in tensors}
        return compressed_tensors_float_tensors(FloatWeight.from_tensors(parts, native.float))
    qw = quantized_weight(native, tensors, linear)
    if fmt == "awq":
        return awq_tensors(qw)
    return gptq_tensors(qw) if fmt == "gptq" else compressed_tensors_tensors(qw, sym=native.sym)


def convert(native: Native, fmt: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One shard's tensors in the export's layout; tensors of unquantized modules, and the
    biases of quantized linears, pass through."""
    marker = f".{MARKER[native.format]}"
    linears = [n.removesuffix(marker) for n in tensors if n.endswith(marker)]
    out = {n: t for n, t in tensors.items() if n.rpartition(".")[0] not in linears or n.endswith(".bias")}
    for linear in linears:
        out.update({f"{linear}.{suffix}": t for suffix, t in linear_tensors(native, fmt, tensors, linear).items()})
    return out


def quantization_config(native: Native, fmt: str) -> dict:
    head = layout_for(native.checkpoint.config).lm_head.removesuffix(".weight")
    if fmt == "aqlm":
        return aqlm_config(native.codebook, unquantized=(head, *native.kept))
    if fmt == "vptq":
        weight_map = native.checkpoint.weight_map
        layers = {
            lin: vptq_layer(native.vector, *vector_shape(native, lin), bias=f"{lin}.bias" in weight_map)
            for lin in native.linears
        }
        return vptq_config(layers, unquantized=(head, *native.kept))
    if fmt == "awq":
        return awq_config(native)
    if native.format == "float":
        return compressed_tensors_float_config(native.float, ignore=(head, *native.kept))
    return gptq_config(native) if fmt == "gptq" else compressed_tensors_config(native)


def export(artifact: str, fmt: str, dest: str, *, progress: bool = True, gguf_type: str | None = None) -> ExportReport:
    """Write the published artifact at `artifact` to `dest` in format `fmt`, shard by shard
    (gguf: one file of llama.cpp file type `gguf_type`, see pipeline.gguf_export)."""
    if fmt == "gguf":
        return export_gguf(artifact, dest, gguf_type=gguf_type, progress=progress)
    if gguf_type is not None:
        raise LaminaError(f"a GGUF type ({gguf_type}) applies to the gguf format only, not {fmt}")
    start = time.perf_counter()
    native = open_native(artifact)
    check_exportable(native, fmt)
    output = open_location(dest)
    if output.exists(MANIFEST):
        raise LaminaError(f"export destination {output.uri} already holds a published artifact")
    source = native.checkpoint
    run_id = claim(
        output,
        recipe_hash=f"export:{fmt}:{native.manifest.get('recipe_hash', '')}",
        fingerprint=source.fingerprint,
    )
    stage = staging(output, run_id)
    report = ExportReport(output=output.uri, format=fmt, linears=len(native.linears), nbytes=0, seconds=0.0)
    weight_map: dict[str, str] = {}
    for file in tqdm(sorted(source.headers), desc=f"export {fmt}", unit="shard", disable=not progress):
        names = [n for n, f in source.weight_map.items() if f == file]
        tensors = convert(native, fmt, source.read(names))
        report.files[file] = put_tensors(stage.uri, file, tensors)
        weight_map.update(dict.fromkeys(tensors, file))
    qc = quantization_config(native, fmt)
    records = [
        put_json(stage, "config.json", {**read_json(source.location, "config.json"), "quantization_config": qc}),
        put_json(stage, INDEX, {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}),
    ]
    records += [put_bytes(stage, name, source.location.read_bytes(name)) for name in source.side_files()]
    report.files.update({r.name: r for r in records})
    report.nbytes = sum(r.size for r in report.files.values())
    publish(
        output,
        run_id,
        list(report.files.values()),
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        export={"format": fmt, "from": native.checkpoint.uri},
        recipe=native.manifest.get("recipe"),
        recipe_hash=native.manifest.get("recipe_hash"),
        source=native.manifest.get("source"),
        versions=native.manifest.get("versions"),
    )
    report.seconds = time.perf_counter() - start
    return report


def export_gguf(artifact: str, dest: str, *, gguf_type: str | None, progress: bool) -> ExportReport:
    """GGUF export, imported only when asked for: it needs the optional `gguf` package, and
    builds on this module."""
    try:
        from pipeline import gguf_export
    except ModuleNotFoundError as e:
        if e.name != "gguf":
            raise
        raise LaminaError("GGUF export needs the gguf package: pip install 'lamina[gguf]'") from None
    return gguf_export.export_gguf(artifact, dest, gguf_type=gguf_type or gguf_export.DEFAULT_TYPE, progress=progress)
