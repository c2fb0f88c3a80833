"""Planning: everything that can be checked before a worker starts. Reads config.json,
the index and the safetensors headers (range reads only), the calibration text, and the
output location; refuses what cannot run with one line that names the problem."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np

from algorithms import NEEDS_HESSIAN
from algorithms.packing import codes_per_run
from pipeline.architectures import layout_for
from pipeline.data import duplicate_ratio, files_of, load_tokenizer, sequences, token_stream
from pipeline.errors import LaminaError
from pipeline.export import NO_QUIP_EXPORT
from pipeline.recipe import Recipe
from storage import StorageError
from storage.checkpoint import Checkpoint
from storage.fs import open_location
from storage.manifest import MANIFEST
from workers.layout import BlockLayout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LinearPlan:
    name: str  # inside the block, e.g. "self_attn.q_proj"
    out_features: int
    in_features: int

    @property
    def solve_cost(self) -> int:
        """GPTQ's work grows as in^2 * (in + out): Cholesky plus the column sweep."""
        return self.in_features**2 * (self.in_features + self.out_features)

    def pieces(self, rows: int) -> list[SolveTask]:
        """Row ranges of at most `rows` rows (0: the whole linear), each solved on its own."""
        step = rows or self.out_features
        return [
            SolveTask(self.name, first, min(first + step, self.out_features), self.in_features)
            for first in range(0, self.out_features, step)
        ]


@dataclass(frozen=True)
class SolveTask:
    """Rows first..last-1 of one linear: the unit the driver spreads over workers."""

    linear: str
    first: int
    last: int
    in_features: int

    @property
    def cost(self) -> int:
        """Factorizing the Hessian (in^3, repeated by every piece) plus the sweep (rows * in^2)."""
        return self.in_features**2 * (self.in_features + self.last - self.first)


@dataclass(frozen=True)
class BlockPlan:
    index: int
    linears: tuple[LinearPlan, ...]  # to quantize
    nbytes: int
    kept: tuple[str, ...] = ()  # linears left in full precision (scheme.unpackable: keep)


@dataclass(frozen=True)
class Plan:
    recipe: Recipe
    source_uri: str
    output_uri: str
    layout: BlockLayout
    blocks: tuple[BlockPlan, ...]
    other_tensors: tuple[str, ...]  # outside the blocks: embeddings, final norm, head
    side_files: tuple[str, ...]  # tokenizer and generation files copied beside the weights
    source_bytes: int
    fingerprint: str
    calibration: np.ndarray | None  # token ids [samples, seq_len], None when not needed
    calibration_qa: dict | None = None  # what calibration_qa found (logged in the run's events)

    @property
    def needs_calibration(self) -> bool:
        return self.calibration is not None


def open_checkpoint(uri: str) -> Checkpoint:
    try:
        return Checkpoint(uri)
    except StorageError as e:
        raise LaminaError(str(e)) from None


def _block_plan(source: Checkpoint, layout: BlockLayout, index: int) -> BlockPlan:
    prefix = layout.block(index)
    linears = []
    for name in layout.linears:
        entry = source.entry(f"{prefix}{name}.weight")
        if len(entry.shape) != 2:
            raise LaminaError(f"{source.uri}: {prefix}{name}.weight is not a matrix (shape {entry.shape})")
        linears.append(LinearPlan(name=name, out_features=entry.shape[0], in_features=entry.shape[1]))
    return BlockPlan(index=index, linears=tuple(linears), nbytes=source.bytes_of(source.names(prefix)))


def _packing(recipe: Recipe, blocks: tuple[BlockPlan, ...], layout: BlockLayout) -> tuple[BlockPlan, ...]:
    """The blocks with the linears the scheme cannot pack moved to `kept` (scheme.unpackable
    keep), or left in place (partial, when a narrower last group is all they need);
    refuses them, naming them, otherwise."""
    scheme = recipe.scheme
    per_run = codes_per_run(scheme.bits)

    def named(bad: list[tuple[int, LinearPlan]]) -> str:
        def size(lin: LinearPlan) -> str:  # what the scheme cuts: VPTQ and QuIP both sizes, the others the input
            both = scheme.algorithm in ("vptq", "quip")
            return f"{lin.out_features}x{lin.in_features}" if both else str(lin.in_features)

        listed = ", ".join(f"{layout.block(i)}{lin.name} ({size(lin)})" for i, lin in bad[:4])
        return f"{len(bad)} linears: {listed}{', ...' if len(bad) > 4 else ''}"

    def words(lin: LinearPlan) -> bool:
        e8p = scheme.algorithm == "quip" and scheme.format.codebook == "e8p"
        return scheme.codebook or e8p or bool(scheme.float_preset) or lin.in_features % per_run == 0

    def misfit(lin: LinearPlan) -> str | None:
        """VPTQ, QuIP: why the scheme does not fit the linear's shape (None: it does)."""
        if scheme.algorithm == "quip":
            return scheme.format.misfit(lin.out_features, lin.in_features)
        try:
            scheme.format.layout(lin.out_features, lin.in_features)
        except ValueError as e:
            return str(e)
        return None

    def groups(lin: LinearPlan) -> bool:
        if scheme.float_preset:
            return scheme.format.misfit(lin.out_features, lin.in_features) is None
        if scheme.algorithm in ("vptq", "quip"):
            return misfit(lin) is None
        if scheme.codebook:
            return lin.in_features % scheme.format.in_group_size == 0
        return not scheme.group_size or lin.in_features % scheme.group_size == 0

    every = [(b.index, lin) for b in blocks for lin in b.linears]
    ungrouped = [(i, lin) for i, lin in every if not groups(lin)]
    if scheme.algorithm == "vptq" and ungrouped and scheme.unpackable != "keep":
        i, lin = ungrouped[0]
        raise LaminaError(
            f"scheme.vptq: {misfit(lin)} ({layout.block(i)}{lin.name}); {named(ungrouped)} do not fit; "
            "choose vector lengths and a group count that divide them, or set scheme.unpackable: keep to "
            "leave them in full precision"
        )
    if scheme.algorithm == "quip" and ungrouped and scheme.unpackable != "keep":
        i, lin = ungrouped[0]
        raise LaminaError(
            f"scheme.quip: {misfit(lin)} ({layout.block(i)}{lin.name}); {named(ungrouped)} do not fit; "
            "set scheme.unpackable: keep to leave them in full precision"
        )
    if scheme.codebook and ungrouped and scheme.unpackable != "keep":
        raise LaminaError(
            f"scheme.aqlm.in_group_size {scheme.format.in_group_size} does not divide the input size of "
            f"{named(ungrouped)}; choose one that divides them, or set scheme.unpackable: keep to leave "
            "them in full precision"
        )

    unfilled = [(i, lin) for i, lin in every if not words(lin)]
    if unfilled and scheme.unpackable != "keep":
        raise LaminaError(
            f"scheme.bits {scheme.bits}: input sizes not a multiple of {per_run} leave 32-bit words part-filled "
            f"in {named(unfilled)}; set scheme.unpackable: keep to leave them in full precision"
        )
    if ungrouped and scheme.unpackable == "refuse":
        raise LaminaError(
            f"scheme.group_size {scheme.group_size} does not divide the input size of {named(ungrouped)}; "
            "choose a group size that divides them (or 0 for per-channel), or set scheme.unpackable "
            "to keep (full precision) or partial (a narrower last group, stored with g_idx)"
        )
    if scheme.unpackable != "keep":
        return blocks
    return tuple(
        replace(
            b,
            linears=tuple(lin for lin in b.linears if words(lin) and groups(lin)),
            kept=tuple(lin.name for lin in b.linears if not (words(lin) and groups(lin))),
        )
        for b in blocks
    )


def _check_exports(recipe: Recipe) -> None:
    scheme = recipe.scheme
    for target in recipe.export:
        where = f"export to {target.output}"
        if open_location(target.output).uri == open_location(recipe.output).uri:
            raise LaminaError(f"{where}: the export needs its own folder, not the artifact's output")
        if open_location(target.output).exists(MANIFEST):
            raise LaminaError(f"{where}: already holds a published artifact; choose a new URI")
        if target.format == "gguf":  # holds the dequantized weights of any scheme: only the model can be refused
            _check_gguf(recipe.model, where)
            continue
        if scheme.algorithm == "quip":
            raise LaminaError(f"{where}: scheme.algorithm quip {NO_QUIP_EXPORT}")
        if scheme.float_preset:
            if target.format != "compressed-tensors":
                raise LaminaError(
                    f"{where}: format {target.format} cannot hold preset {scheme.float_preset} (export format "
                    "compressed-tensors, or gguf)"
                )
            continue
        fits = {"aqlm": "codebooks: export format aqlm", "vptq": "vectors: export format vptq"}
        uniform = ("gptq", "compressed-tensors", "awq")
        wanted = {"aqlm": ("aqlm",), "vptq": ("vptq",)}.get(scheme.algorithm, uniform)
        if target.format not in wanted:
            fits = fits.get(scheme.algorithm, "a uniform grid: gptq, compressed-tensors or awq")
            raise LaminaError(
                f"{where}: format {target.format} cannot hold scheme.algorithm {scheme.algorithm} ({fits})"
            )
        g_idx = scheme.algorithm == "gptq" and scheme.act_order and not scheme.static_groups
        if target.format in ("compressed-tensors", "awq") and g_idx:
            raise LaminaError(
                f"{where}: {target.format} cannot hold act-order groups in solve order (g_idx); "
                "set scheme.static_groups: true, or export format gptq"
            )
        if target.format == "awq" and (scheme.bits != 4 or scheme.group_size == 0):
            raise LaminaError(f"{where}: awq holds 4-bit grouped weights; set scheme.bits: 4 and a group_size")


def _check_gguf(model: str, where: str) -> None:
    """The source's architecture and tokenizer, which GGUF export checks again when it runs."""
    try:
        from pipeline.gguf_export import preflight
    except ModuleNotFoundError as e:
        if e.name != "gguf":
            raise
        raise LaminaError(f"{where}: GGUF export needs the gguf package: pip install 'lamina[gguf]'") from None
    try:
        preflight(model)
    except LaminaError as e:
        raise LaminaError(f"{where}: {e}") from None


def _calibration(recipe: Recipe) -> np.ndarray | None:
    static = getattr(recipe.scheme.format, "static_activations", False)  # their scales come from calibration
    if not (NEEDS_HESSIAN[recipe.scheme.algorithm] or static):
        return None
    cal = recipe.calibration
    if cal is None:
        scheme = recipe.scheme
        why = (
            f"the static activation scales of scheme.preset {scheme.preset}"
            if static
            else f"scheme.algorithm {scheme.algorithm!r}"
        )
        raise LaminaError(f"calibration: required by {why}")
    stream = token_stream(
        uri=cal.source, pattern=cal.glob, tokenizer=load_tokenizer(recipe.model), needed=cal.tokens, what="calibration"
    )
    return sequences(stream, count=cal.samples, length=cal.seq_len)


def calibration_qa(recipe: Recipe, seqs: np.ndarray) -> dict:
    """Before any compute: the calibration set is as long as asked (token_stream refuses a
    short one), not mostly duplicates, and shares no file with the eval text; a
    calibration and eval read from the same source URI is worth a warning."""
    cal = recipe.calibration
    dup = duplicate_ratio(seqs)
    if dup > cal.max_duplicate_ratio:
        raise LaminaError(
            f"calibration: {dup:.0%} of the {len(seqs)} sequences of {cal.seq_len} tokens repeat another "
            f"(calibration.max_duplicate_ratio is {cal.max_duplicate_ratio:g}); use more varied text"
        )
    if dup:
        log.warning("calibration: %.1f%% of the %d sequences are duplicates", 100 * dup, len(seqs))
    qa = {"requested_tokens": cal.tokens, "tokens": int(seqs.size), "duplicate_ratio": round(dup, 6)}
    if recipe.eval is not None:
        shared = sorted(set(files_of(cal.source, cal.glob)) & set(files_of(recipe.eval.source, recipe.eval.glob)))
        if shared:
            raise LaminaError(
                f"calibration and eval share {len(shared)} file(s), e.g. {shared[0]}: the eval text must be "
                "held out (change calibration.glob or eval.glob)"
            )
        qa["same_source"] = cal.source.rstrip("/") == recipe.eval.source.rstrip("/")
        if qa["same_source"]:
            log.warning("calibration and eval read the same source %s (different files): is it held out?", cal.source)
    return qa


def make_plan(recipe: Recipe) -> Plan:
    """Check the source, the scheme against every layer, the output and the calibration data."""
    fp = recipe.calibration is not None and recipe.calibration.propagation == "fp"
    if fp and recipe.scheme.true_sequential:
        raise LaminaError(
            "scheme.true_sequential needs each stage's inputs from the quantized stages before it; "
            "it cannot be combined with calibration.propagation: fp"
        )
    source = open_checkpoint(recipe.model)
    layout = layout_for(source.config)
    n_blocks = source.config.get("num_hidden_layers")
    if not isinstance(n_blocks, int) or n_blocks < 1:
        raise LaminaError(f"{source.uri}/config.json: num_hidden_layers missing or invalid")
    try:
        blocks = tuple(_block_plan(source, layout, i) for i in range(n_blocks))
    except StorageError as e:
        raise LaminaError(str(e)) from None
    blocks = _packing(recipe, blocks, layout)
    output = open_location(recipe.output)
    if output.exists(MANIFEST):
        raise LaminaError(f"output {output.uri} already holds a published artifact; choose a new output URI")
    _check_exports(recipe)
    block_names = {n for b in blocks for n in source.names(layout.block(b.index))}
    calibration = _calibration(recipe)
    return Plan(
        recipe=recipe,
        source_uri=source.uri,
        output_uri=output.uri,
        layout=layout,
        blocks=blocks,
        other_tensors=tuple(n for n in source.names() if n not in block_names),
        side_files=tuple(source.side_files()),
        source_bytes=source.total_bytes,
        fingerprint=source.fingerprint,
        calibration=calibration,
        calibration_qa=None if calibration is None else calibration_qa(recipe, calibration),
    )
