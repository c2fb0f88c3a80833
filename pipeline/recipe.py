"""The recipe: one YAML file, validated strictly. Unknown keys and bad values are errors
that name the field; every recipe has a stable hash of what determines the result."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from algorithms import (
    AQLMConfig,
    AWQConfig,
    CodebookScheme,
    Format,
    GPTQConfig,
    QuipConfig,
    QuipScheme,
    UniformScheme,
    VectorScheme,
    VPTQConfig,
)
from algorithms.floatq import PRESETS as FLOAT_PRESETS
from pipeline.errors import LaminaError
from storage.options import literal_secrets


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TextData(Strict):
    """Text files under a URI (a file, or a folder filtered by `glob`), sorted by path and
    joined with a blank line. `.jsonl` files contribute their rows' `text` field."""

    source: str
    glob: str = "**"


class Calibration(TextData):
    samples: int = Field(64, ge=1)
    seq_len: int = Field(512, ge=16, le=65536)
    chunk_size: int = Field(8, ge=1, description="sequences per chunk, the unit of data parallelism")
    max_duplicate_ratio: float = Field(
        0.5, ge=0, le=1, description="refuse a calibration set with a larger share of duplicate sequences"
    )
    propagation: Literal["quantized", "fp"] = Field(
        "quantized",
        description="inputs of block i+1: the outputs of quantized block i (sequential), or of the "
        "unquantized model (fp: every block's Hessians in one pass, then all blocks solved at once)",
    )

    @property
    def tokens(self) -> int:
        return self.samples * self.seq_len

    @property
    def chunks(self) -> int:
        return -(-self.samples // self.chunk_size)


class EvalData(TextData):
    tokens: int = Field(16384, ge=2)
    window: int = Field(1024, ge=2, description="the short context: non-overlapping windows of this many tokens")
    long_window: int = Field(
        0,
        ge=0,
        description="the long context: 0 = the model's max_position_embeddings, capped by `tokens`; "
        "equal to `window` = one context only",
    )
    kernel: Literal["auto", "reference", "cpu", "triton"] = Field(
        "auto", description="the low-bit kernel the eval runs quantized linears through; auto: the best available"
    )
    kl_top_k: int = Field(
        256,
        ge=0,
        description="the reference's next-token distribution is kept as its top k log-probs plus the tail's "
        "mass (KL over those k+1 outcomes, a lower bound of the full KL); 0: the whole vocabulary (exact)",
    )
    reference_cache: str | None = Field(
        None,
        description="URI of the cache of the reference's scores (by source fingerprint and eval tokens); "
        "default: .lamina-cache/reference beside the evaluated artifact",
    )

    @property
    def windows(self) -> int:
        return self.tokens // self.window


class Gates(Strict):
    """Release gates: `lamina release` publishes only when every gate set here passes.
    Measured at the short context against the recipe's source model."""

    max_ppl_increase: float | None = Field(None, ge=0, description="perplexity / source perplexity - 1, e.g. 0.03")
    max_kl: float | None = Field(None, ge=0, description="mean KL(source || quantized) per token, nats")
    min_top1: float | None = Field(None, ge=0, le=1, description="share of tokens whose argmax agrees")
    max_rare_nll_increase: float | None = Field(
        None, ge=0, description="mean NLL increase (nats) on the rarest-token decile"
    )
    max_long_ppl_increase: float | None = Field(None, ge=0, description="max_ppl_increase at the long context")


class AQLMOptions(Strict):
    """AQLM (scheme.algorithm: aqlm): each group of `in_group_size` inputs is the sum of one
    codeword from each of `num_codebooks` codebooks of 2**nbits_per_codebook entries, with
    a scale per output row. 2x8 g8 and 1x16 g8 are 2 bits per weight (plus the codebooks:
    2x8 suits any model; 1x16's 65536 x 8 codebook per linear only pays off on wide layers)."""

    num_codebooks: int = Field(2, ge=1, le=8)
    nbits_per_codebook: int = Field(8, ge=1, le=16)
    in_group_size: int = Field(8, ge=1, le=64)
    beam_size: int = Field(4, ge=1, description="hypotheses kept in the code search over the codebooks")
    max_iters: int = Field(10, ge=0, description="code search / codebook update / scale rounds at most")
    rel_tol: float = Field(0.01, ge=0, description="stop when a round lowers the error by less than this share")
    kmeans_iters: int = Field(8, ge=1)
    cg_iters: int = Field(8, ge=1, description="conjugate-gradient steps per codebook update")
    seed: int = 0

    @property
    def format(self) -> CodebookScheme:
        return CodebookScheme(
            num_codebooks=self.num_codebooks,
            nbits_per_codebook=self.nbits_per_codebook,
            in_group_size=self.in_group_size,
        )

    @property
    def config(self) -> AQLMConfig:
        return AQLMConfig(
            beam_size=self.beam_size,
            max_iters=self.max_iters,
            rel_tol=self.rel_tol,
            kmeans_iters=self.kmeans_iters,
            cg_iters=self.cg_iters,
            seed=self.seed,
        )


class VPTQOptions(Strict):
    """VPTQ (scheme.algorithm: vptq): each run of `vector_len` outputs of an input column is
    one of `num_centroids` centroids (log2(num_centroids) / vector_len bits per weight),
    plus one of `num_res_centroids` residual centroids (0: none), fitted by Hessian-weighted
    k-means and assigned with GPTQ's error feedback. The vptq package's published models
    use v8 k65536 (2 bits) with k256 residuals (3 bits); a small model pays less for its
    codebooks at v4 k256 (2 bits) or v3 k512 (3 bits). The damping, block size and
    act_order of the scheme apply as for GPTQ."""

    vector_len: int = Field(8, ge=1, le=16)
    num_centroids: int = Field(65536, ge=2, le=65536, description="a power of two")
    num_res_centroids: int = Field(0, ge=0, le=65536, description="0 or a power of two: the residual codebook")
    group_num: int = Field(1, ge=1, description="codebooks per linear, each for a run of its columns")
    outlier_percent: float = Field(
        0, ge=0, lt=100, description="share of columns (largest Hessian diagonal) with a codebook of their own"
    )
    outlier_vector_len: int = Field(8, ge=1, le=16)
    outlier_centroids: int = Field(256, ge=2, le=65536)
    normalize: bool = Field(True, description="store each input column as (w - mean) / std, both in float16")
    kmeans_iters: int = Field(10, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _valid(self) -> VPTQOptions:
        self.format  # noqa: B018 -- VectorScheme names a bad codebook size
        return self

    @property
    def format(self) -> VectorScheme:
        return VectorScheme(
            vector_len=self.vector_len,
            num_centroids=self.num_centroids,
            num_res_centroids=self.num_res_centroids,
            group_num=self.group_num,
            outlier_percent=self.outlier_percent,
            outlier_vector_len=self.outlier_vector_len,
            outlier_centroids=self.outlier_centroids,
            normalize=self.normalize,
        )


class QuipOptions(Strict):
    """QuIP / QuIP# (scheme.algorithm: quip): the weight and its inputs' Hessian rotated by
    random-sign Hadamard transforms on both sides, then rounded with LDLQ (GPTQ's feedback)
    to `codebook` e8p (QuIP#'s E8 lattice codebook: 2 bits per weight, plus a scale per
    row) or scalar (QuIP: the scheme's uniform grid of bits, group_size and sym). The
    scheme's damp and block_size apply as for GPTQ; act_order does not (the rotation
    flattens the Hessian's diagonal)."""

    codebook: Literal["e8p", "scalar"] = "e8p"
    seed: int = Field(0, description="the random signs of the rotations (stored with the codes)")


class AWQOptions(Strict):
    """AWQ (scheme.algorithm: awq; algorithms/awq.py): per group of linears sharing an input,
    a per-channel scale from activation and weight magnitudes, its exponent searched on a
    grid of `n_grid` points for the least output error on the calibration set, folded into
    the op before the group (a norm, or the linear before it); then, with `clip`, each
    quantization group's range shrunk by up to `max_shrink` where that lowers the output
    error; then round-to-nearest on the scheme's grid (AWQ's own: bits 4, sym false)."""

    n_grid: int = Field(20, ge=1, le=100)
    duo_scaling: bool = Field(True, description="scale by activation and weight magnitudes (else activations only)")
    clip: bool = True
    max_shrink: float = Field(0.5, ge=0, lt=1)

    @property
    def config(self) -> AWQConfig:
        return AWQConfig(n_grid=self.n_grid, duo_scaling=self.duo_scaling, clip=self.clip, max_shrink=self.max_shrink)


class SmoothQuantOptions(Strict):
    """SmoothQuant (scheme.algorithm: smoothquant; algorithms/smoothquant.py): activation
    outliers migrated into the weights of the linears after each norm, channel j scaled by
    max|x_j|^alpha / max|W_j|^(1 - alpha) (max |x| from the calibration set); then the
    weights solved by GPTQ on the scheme's grid (bits 8, group_size 0 for W8A8)."""

    alpha: float = Field(0.5, ge=0, le=1, description="migration strength: 0.5 for most models, up to 0.85")


class Scheme(Strict):
    algorithm: Literal["gptq", "rtn", "aqlm", "vptq", "quip", "awq", "smoothquant"] = "gptq"
    bits: Literal[2, 3, 4, 8] = 4
    group_size: int = Field(128, ge=0, description="columns per group; 0 = per-channel")
    sym: bool = True
    damp: float = Field(0.01, gt=0, lt=1)
    block_size: int = Field(128, ge=1)
    act_order: bool = Field(True, description="GPTQ: solve columns by descending Hessian diagonal")
    static_groups: bool = Field(
        False, description="GPTQ act-order: groups of stored columns with grids fixed up front (no g_idx stored)"
    )
    unpackable: Literal["refuse", "keep", "partial"] = Field(
        "refuse",
        description="linears whose input size the scheme cannot pack: refuse the recipe, keep them in full "
        "precision, or (when only the group size does not divide it) give them a narrower last group",
    )
    mse: bool = Field(False, description="choose each group's grid by a clipping search (least |w - q(w)|^2.4)")
    solve_rows: int = Field(
        8192,
        ge=0,
        description="rows per solve task: larger linears are split into row ranges that workers solve in "
        "parallel (each repeats the Hessian factorization); 0: never split",
    )
    true_sequential: bool = Field(
        False,
        description="GPTQ: quantize a block's linears in order (q/k/v, o, gate/up, down), each calibrated "
        "on the inputs left by the ones quantized before it",
    )

    @field_validator("group_size")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v and v & (v - 1):
            raise ValueError("must be 0 (per-channel) or a power of two such as 32, 64, 128")
        return v

    @property
    def grid(self) -> UniformScheme:
        return UniformScheme(
            bits=self.bits, group_size=self.group_size, sym=self.sym, partial_groups=self.unpackable == "partial"
        )

    aqlm: AQLMOptions | None = Field(None, description="AQLM's codebooks and fit (algorithm: aqlm)")

    vptq: VPTQOptions | None = Field(None, description="VPTQ's codebooks and fit (algorithm: vptq)")

    quip: QuipOptions | None = Field(None, description="QuIP's codebook and signs (algorithm: quip)")

    awq: AWQOptions | None = Field(None, description="AWQ's scale and clipping searches (algorithm: awq)")

    smoothquant: SmoothQuantOptions | None = Field(None, description="SmoothQuant's alpha (algorithm: smoothquant)")

    preset: Literal["fp8", "fp8-dynamic", "w8a8", "nvfp4", "nvfp4a16"] | None = Field(
        None,
        description="store the weights (and quantize the activations) as this compressed-tensors preset instead of "
        "the uniform grid: fp8 (per-tensor weights, static per-tensor activations), fp8-dynamic (per-channel, "
        "per-token), w8a8 (int8 per-channel, int8 per-token), nvfp4 (FP4 in groups of 16, W4A4), nvfp4a16 "
        "(weights only); algorithm smoothquant defaults to w8a8",
    )

    @model_validator(mode="after")
    def _options_need_their_algorithm(self) -> Scheme:
        for name in OPTIONED:
            if getattr(self, name) is not None and self.algorithm != name:
                raise ValueError(f"{name} options are set but algorithm is {self.algorithm}: set algorithm: {name}")
        if self.preset is not None or self.algorithm == "smoothquant":
            self._preset_fits()
        if self.smoothing and self.true_sequential:
            raise ValueError(
                f"true_sequential cannot be used with algorithm {self.algorithm}: its scales move between a "
                "block's linears (v into o, up into down), so the block is solved at once"
            )
        return self

    def _preset_fits(self) -> None:
        preset = self.float_preset
        if self.algorithm not in PRESET_ALGORITHMS[preset]:
            allowed = " or ".join(PRESET_ALGORITHMS[preset])
            raise ValueError(f"preset {preset} is solved by algorithm {allowed}, not {self.algorithm}")

    @property
    def float_preset(self) -> str | None:
        """The compressed-tensors preset the linears are stored in (None: the recipe's grid)."""
        return self.preset or ("w8a8" if self.algorithm == "smoothquant" else None)

    @property
    def smoothing(self) -> tuple[str, object] | None:
        """(method, its config) when input scales are folded into each block before the
        solves: AWQ's search config, or SmoothQuant's alpha."""
        if self.algorithm == "awq":
            return "awq", (self.awq or AWQOptions()).config
        if self.algorithm == "smoothquant":
            return "smoothquant", (self.smoothquant or SmoothQuantOptions()).alpha
        return None

    @property
    def piece_rows(self) -> int:
        """solve_rows as the pieces are cut: VPTQ's rounded down to a multiple of its vector
        lengths (at least one), since a vector never spans two pieces; a float preset's
        linears whole (per-tensor and global scales span all rows)."""
        if self.float_preset:
            return 0
        if self.algorithm != "vptq" or not self.solve_rows:
            return self.solve_rows
        v = self.format
        step = math.lcm(v.vector_len, v.outlier_vector_len) if v.outlier_percent else v.vector_len
        return max(step, self.solve_rows - self.solve_rows % step)

    @property
    def codebook(self) -> bool:
        """Whether the linears' rows share codebooks fitted over all of them (AQLM, VPTQ)."""
        return self.algorithm in ("aqlm", "vptq")

    @property
    def format(self) -> Format:
        """How the quantized linears are stored: the uniform grid, AQLM's codebooks, VPTQ's
        vectors or QuIP's rotated codes."""
        if self.float_preset:
            return FLOAT_PRESETS[self.float_preset]
        if self.algorithm == "quip":
            o = self.quip or QuipOptions()
            if o.codebook == "e8p":  # 2 bits, a scale per row: the grid's fields do not apply
                return QuipScheme(codebook="e8p")
            return QuipScheme(codebook=o.codebook, bits=self.bits, group_size=self.group_size, sym=self.sym)
        if self.algorithm == "vptq":
            return (self.vptq or VPTQOptions()).format
        return (self.aqlm or AQLMOptions()).format if self.algorithm == "aqlm" else self.grid

    @property
    def options(self) -> GPTQConfig | AQLMConfig | VPTQConfig | QuipConfig | AWQConfig:
        if self.algorithm == "awq":
            return (self.awq or AWQOptions()).config
        if self.algorithm == "quip":
            o = self.quip or QuipOptions()
            return QuipConfig(damp=self.damp, block_size=self.block_size, mse=self.mse, seed=o.seed)
        if self.algorithm == "vptq":
            o = self.vptq or VPTQOptions()
            return VPTQConfig(
                damp=self.damp,
                block_size=self.block_size,
                act_order=self.act_order,
                kmeans_iters=o.kmeans_iters,
                seed=o.seed,
            )
        if self.codebook:
            return (self.aqlm or AQLMOptions()).config
        return GPTQConfig(
            damp=self.damp,
            block_size=self.block_size,
            act_order=self.act_order,
            static_groups=self.static_groups,
            mse=self.mse,
        )


OPTIONED = ("aqlm", "vptq", "quip", "awq", "smoothquant")  # the algorithms with their own options
PRESET_ALGORITHMS = {  # which solves give each preset's weights: fp8 / nvfp4 round to nearest; int8 also GPTQ
    "fp8": ("rtn", "smoothquant"),
    "fp8-dynamic": ("rtn", "smoothquant"),
    "w8a8": ("rtn", "gptq", "smoothquant"),
    "nvfp4": ("rtn",),
    "nvfp4a16": ("rtn",),
}


class Resources(Strict):
    """What each worker reserves on the Ray cluster. None of it changes the artifact's bytes
    (on the same device type): results are a function of the recipe, not of the cluster."""

    workers: int = Field(2, ge=1)
    cpus_per_worker: float = Field(1, gt=0, description="Ray CPUs; torch uses max(1, floor) threads")
    gpus_per_worker: float = Field(0, ge=0, description="Ray GPUs (num_gpus)")
    memory_per_worker_gib: float | None = Field(None, gt=0, description="Ray memory reservation")
    custom: dict[str, float] = Field(default_factory=dict, description="custom Ray resources per worker")
    placement: Literal["pack", "spread", "strict_pack", "strict_spread"] = Field(
        "pack", description="placement group strategy keeping the run's workers together"
    )
    max_retries: int = Field(3, ge=0, description="times one block is redone after losing workers")
    ray_address: str | None = None
    solve_device: Literal["cpu", "gpu"] = Field(
        "cpu",
        description="where the GPTQ, QuIP and RTN solves run (calibration runs on the CPU; AQLM and VPTQ "
        "fits use the worker's GPU whenever it has one)",
    )
    inverse_on_cpu: bool = Field(
        False,
        description="with solve_device gpu: factorize each Hessian on the CPU, keeping only its inverse "
        "factor on the GPU (a quarter of the factorization's memory there)",
    )
    spill: str | None = Field(
        None,
        description="a folder URI (local disk or object storage) where workers keep their chunks' hidden states "
        "between blocks instead of memory: one chunk in memory at a time",
    )

    @model_validator(mode="after")
    def _gpu_solves_need_gpus(self) -> Resources:
        if self.solve_device == "gpu" and not self.gpus_per_worker:
            raise ValueError("solve_device gpu needs gpus_per_worker > 0")
        if self.inverse_on_cpu and self.solve_device != "gpu":
            raise ValueError("inverse_on_cpu applies to solve_device gpu (the CPU solves factorize on the CPU)")
        return self

    def bundle(self) -> dict[str, float]:
        """One worker's resource request, as a placement group bundle."""
        bundle = {"CPU": self.cpus_per_worker, **self.custom}
        if self.gpus_per_worker:
            bundle["GPU"] = self.gpus_per_worker
        if self.memory_per_worker_gib:
            bundle["memory"] = self.memory_per_worker_gib * 2**30
        return bundle


class Experts(Strict):
    """What a MoE model's experts need of calibration. Each expert's Hessian comes from the
    tokens the router sends it; one that got fewer than `min_tokens` in a block is handled
    by `under_calibrated`: `error` stops the run naming it, `rtn` quantizes its linears by
    round-to-nearest (GPTQ's uniform grid only), `all_tokens` runs every calibration token
    through it for its Hessian (the block's outputs still use only the routed tokens).
    The run's report and event log list every expert so handled."""

    min_tokens: int = Field(128, ge=1)
    under_calibrated: Literal["error", "rtn", "all_tokens"] = "error"


class Export(Strict):
    """A copy of the published artifact in a layout serving engines load."""

    format: Literal["gptq", "compressed-tensors", "awq", "aqlm", "vptq", "gguf"]
    output: str = Field(description="URI of the export (a new folder)")
    gguf_type: Literal["F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0"] | None = Field(
        None, description="format gguf: llama.cpp's file type (default Q4_K_M)"
    )

    @model_validator(mode="after")
    def _gguf_type_for_gguf(self) -> Export:
        if self.gguf_type is not None and self.format != "gguf":
            raise ValueError(f"gguf_type applies to format gguf, not {self.format}")
        return self


class Recipe(Strict):
    model: str = Field(description="URI of the source checkpoint (safetensors + config.json)")
    output: str = Field(description="URI where the quantized artifact is written")
    calibration: Calibration | None = None
    scheme: Scheme = Scheme()
    eval: EvalData | None = None
    gates: Gates | None = Field(None, description="what `lamina release` requires of the eval before publishing")
    export: list[Export] = Field(default_factory=list, description="written after the artifact is published")
    resources: Resources = Resources()
    experts: Experts | None = Field(None, description="MoE models: experts that few calibration tokens reach")
    storage: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="fsspec options per URI prefix; credentials only as ${env:NAME} references",
    )

    @model_validator(mode="after")
    def _rtn_fallback_needs_a_uniform_grid(self) -> Recipe:
        if self.experts and self.experts.under_calibrated == "rtn" and self.scheme.algorithm != "gptq":
            raise ValueError(
                f"experts.under_calibrated: rtn falls back to GPTQ's uniform grid; with algorithm "
                f"{self.scheme.algorithm} use error or all_tokens"
            )
        return self

    @field_validator("storage")
    @classmethod
    def _no_literal_secrets(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for prefix, options in v.items():
            if "://" not in prefix and not prefix.endswith("::"):
                raise ValueError(f"{prefix!r} is not a URI prefix such as s3://bucket")
            secrets = literal_secrets(options)
            if secrets:
                raise ValueError(f"{prefix}: {', '.join(secrets)} must be an ${{env:NAME}} reference, not a literal")
        return v

    def hash(self) -> str:
        """sha256 of everything that determines the artifact's bytes (not where it is
        written, with what resources, how storage is reached, how it is evaluated or exported)."""
        skip = {"output", "resources", "eval", "gates", "storage", "export"}
        doc = self.model_dump(mode="json", exclude={*skip, "calibration"})
        for added in (*OPTIONED, "preset"):  # recipes from before AQLM, ..., the presets keep their hash
            if doc["scheme"][added] is None:
                del doc["scheme"][added]
        if doc["experts"] is None:  # recipes from before MoE support keep their hash
            del doc["experts"]
        if self.calibration is not None:  # how much duplication to tolerate does not change the bytes
            doc["calibration"] = self.calibration.model_dump(mode="json", exclude={"max_duplicate_ratio"})
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def describe(error: ValidationError, source: str) -> str:
    """Pydantic's errors as one line: 'recipe.yaml: scheme.bits: Input should be 2, 4 or 8'."""
    parts = []
    for e in error.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        parts.append(f"{where}: {msg}")
    return f"{source}: " + "; ".join(parts)


def parse(doc: object, source: str = "recipe") -> Recipe:
    if not isinstance(doc, dict):
        raise LaminaError(f"{source}: expected a mapping of recipe fields")
    try:
        return Recipe.model_validate(doc)
    except ValidationError as e:
        raise LaminaError(describe(e, source)) from None


def load(path: str) -> Recipe:
    file = Path(path)
    if not file.is_file():
        raise LaminaError(f"recipe not found: {path}")
    try:
        doc = yaml.safe_load(file.read_text())
    except yaml.YAMLError as e:
        raise LaminaError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    return parse(doc, path)
