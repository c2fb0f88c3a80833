"""Run one decoder block at a time over the chunks a worker owns.

A runner holds at most one block, the hidden states of its chunks and, while
calibrating, the Hessians of its chunks for that block (returned per chunk so that the
driver can sum them in chunk order). The driver decides what runs where.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import resource
import socket
from collections.abc import MutableMapping
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from algorithms import (
    PREPARERS,
    QUANTIZERS,
    CodebookScheme,
    FloatScheme,
    Format,
    QuipScheme,
    UniformScheme,
    VectorScheme,
    Weight,
    weight_from_tensors,
)
from algorithms.aqlm import LocalPieces as CodebookPieces
from algorithms.awq import search_scale
from algorithms.float_activations import static_input_scale
from algorithms.floatq import SUFFIXES as FLOAT
from algorithms.floatq import shared_global_scale
from algorithms.hessian import input_gram
from algorithms.quip import quip_rows, rotated
from algorithms.smoothquant import smoothing_scale
from algorithms.vector import SUFFIXES as VECTOR
from algorithms.vptq import LocalPieces as VectorPieces
from kernels import choose, quant_linear
from kernels.backends import Requested
from kernels.reference import dequantize
from storage.checkpoint import Checkpoint
from storage.fs import open_location
from storage.options import configure
from storage.safetensors_io import read_header, read_tensors
from storage.writer import FileRecord, put_tensors
from workers.chunk_sum import MAXIMA, Node, fold, push
from workers.layout import BlockLayout
from workers.moe import SparseMoe, install_moe
from workers.spill import SpilledChunks

log = logging.getLogger(__name__)
Arrays = dict[str, np.ndarray]
Piece = tuple[str, int, Arrays]  # (linear, first row, its quantized tensors for rows first..)


def model_config(raw: dict) -> PretrainedConfig:
    """A transformers config from config.json contents, with SDPA attention (causal when
    no mask is given) and without any quantization_config."""
    fields = {k: v for k, v in raw.items() if k not in ("quantization_config", "model_type")}
    config = AutoConfig.for_model(raw["model_type"], **fields)
    config._attn_implementation = "sdpa"
    return config


def to_arrays(qw: Weight) -> Arrays:
    """The weight's tensors as numpy arrays: float8 ones as their bit patterns (uint8), which
    numpy can hold and the weight types view back."""
    return {
        k: (v.view(torch.uint8) if v.dtype == torch.float8_e4m3fn else v).cpu().numpy() for k, v in qw.tensors().items()
    }


def moved(value: object, device: str) -> object:
    """A prepared solve (a dataclass of tensors and of such dataclasses) on `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if dataclasses.is_dataclass(value):
        return dataclasses.replace(value, **{f.name: moved(getattr(value, f.name), device) for f in fields(value)})
    return value


def from_arrays(arrays: Arrays, fmt: Format) -> Weight:
    return weight_from_tensors({k: torch.from_numpy(v) for k, v in arrays.items()}, fmt)


def stored_format(qc: dict) -> Format | None:
    """How an artifact's quantization_config says its linears are stored (None: not quantized)."""
    if not qc:
        return None
    if qc.get("format") == "codebook":
        return CodebookScheme.from_fields(qc)
    if qc.get("format") == "vector":
        return VectorScheme.from_fields(qc)
    if qc.get("format") == "incoherent":
        return QuipScheme.from_fields(qc)
    if qc.get("format") == "float":
        return FloatScheme.from_fields(qc)
    return UniformScheme(bits=qc["bits"], group_size=qc["group_size"], sym=qc.get("sym", True))


CODEBOOK_OPS = {  # the steps of each fit that run where the pieces are (see algorithms.aqlm / vptq.Pieces)
    CodebookScheme: ("sample", "initial_books", "assign", "search", "fit_scales", "terms", "losses"),
    VectorScheme: ("column_sums", "prepare", "sample", "initial_books", "quantize"),
}
STORED = (
    "qweight",
    "scales",
    "qzeros",
    "g_idx",
    "codes",
    "codebooks",
    *VECTOR,
    "qidxs",
    "su",
    "sv",
    *FLOAT,
)  # suffixes
MARKERS = (
    "qweight",
    "codes",
    "indices",
    "qidxs",
    "weight_scale",
)  # the suffix that marks a quantized linear, by format


@dataclass(frozen=True)
class StagedBlocks:
    """The run's finished blocks 0..len(shards)-1: shard files in the staging folder `uri`,
    quantized linears in the recipe's format."""

    uri: str
    shards: tuple[str, ...]
    format: Format

    @property
    def blocks(self) -> int:
        return len(self.shards)


def join_rows(solved: tuple[list[Piece], ...]) -> dict[str, Arrays]:
    """Whole linears from row pieces solved anywhere: rows in order; what all rows share
    (g_idx, a function of the Hessian alone; codebooks; the vector format's perm and
    normalisation; QuIP's input signs) the same in every piece."""
    by_linear: dict[str, list[tuple[int, Arrays]]] = {}
    for part in solved:
        for linear, first, arrays in part:
            by_linear.setdefault(linear, []).append((first, arrays))
    out = {}
    for linear, pieces in sorted(by_linear.items()):
        pieces.sort(key=lambda p: p[0])
        first = pieces[0][1]
        rows = ("qweight", "scales", "qzeros", "codes", "qidxs", "su", "weight", "weight_packed")
        joined = {k: np.concatenate([a[k] for _, a in pieces]) for k in rows if k in first}
        for k in ("indices", "outlier_indices"):  # the vector format's: [groups, vector rows, ...]
            if k in first:
                joined[k] = np.concatenate([a[k] for _, a in pieces], axis=1)
        shares = ("g_idx", "codebooks", "centroids", "res_centroids", "outlier_centroids", "perm")
        floats = ("weight_global_scale", "input_scale", "input_global_scale")  # a float preset's linears are whole
        for shared in (*shares, "weight_scale", "weight_bias", "sv", *floats):
            if shared in first:
                joined[shared] = first[shared]
                if any(not np.array_equal(a[shared], first[shared]) for _, a in pieces):
                    raise RuntimeError(f"{linear}: row pieces disagree on {shared}")
        out[linear] = joined
    return out


SCORE_ROWS = 1024  # predicted tokens whose log-probs are held at once
ERROR_ROWS = 256  # rows of each solved piece on which its error is measured (70B: ~1% of the solve)
TOKENS = "#tokens"  # an expert group's Hessian comes with the count of its tokens, as hessians[group + TOKENS]
ABSMEAN = "#absmean"  # with channel statistics: a group's sum over tokens of |x| per input channel


def scaled_hessian(hessians: Arrays, group: str, tokens: int) -> torch.Tensor:
    """The group's H / its token count: `tokens` (the calibration set) for a linear every
    token reaches, the routed count for an expert's."""
    count = hessians.get(group + TOKENS)
    return torch.from_numpy(hessians[group]) / (tokens if count is None else max(float(count[0]), 1.0))


def weighted_error(W: torch.Tensor, What: torch.Tensor, H: torch.Tensor | None) -> np.ndarray:
    """[tr(D H D^T), tr(W H W^T)] with D = W - What (the dequantized weight), on every k-th
    row (at most ERROR_ROWS of them); the identity for H when there is none (RTN)."""
    step = max(1, W.shape[0] // ERROR_ROWS)
    Ws = W[::step].float()  # [rows / step, in]
    D = Ws - What[::step].float()  # [rows / step, in]
    if H is None:
        return np.array([float((D * D).sum()), float((Ws * Ws).sum())])
    H = H.float()
    return np.array([float(((D @ H) * D).sum()), float(((Ws @ H) * Ws).sum())])


def solve_rows(
    W: torch.Tensor,
    first: int,
    last: int,
    H: torch.Tensor | None,
    algorithm: str,
    scheme: Format,
    options: object,
    prepared: object,
    *,
    fallback: bool = False,
) -> Arrays:
    """Rows first..last-1 of W [out, in] quantized (`fallback`: by RTN, an expert too few
    tokens reached), with their Hessian-weighted "error"."""
    if fallback:
        qw = QUANTIZERS["rtn"](W[first:last], None, scheme, options)
        error = weighted_error(W[first:last], dequantize(qw), None)
    elif algorithm == "quip":  # its rotation mixes all rows: the error is measured in the rotated space
        qw, Wt, Ht = quip_rows(W, first, last, H, scheme, options, prepared)
        error = weighted_error(Wt, rotated(qw), Ht)
    else:
        qw = QUANTIZERS[algorithm](W[first:last], H, scheme, options, prepared)
        error = weighted_error(W[first:last], dequantize(qw), H)
    return {**to_arrays(qw), "error": error}


def relative_errors(solved: tuple[list[Piece], ...]) -> dict[str, float]:
    """Each linear's tr(D H D^T) / tr(W H W^T), over the rows measured in all its pieces."""
    sums: dict[str, np.ndarray] = {}
    for part in solved:
        for linear, _, arrays in part:
            sums[linear] = sums.get(linear, 0) + arrays["error"]
    return {linear: float(num / den) if den else 0.0 for linear, (num, den) in sorted(sums.items())}


def token_scores(logp: torch.Tensor, target: torch.Tensor, *, top_k: int | None, reference: Arrays | None) -> Arrays:
    """Per predicted token, from its log-probs [rows, vocab] and the tokens that came
    [rows]: "nll"; with top_k, the reference's kept distribution ("logp" [rows, vocab]
    when top_k = 0, else "top_logp" and "top_idx" [rows, k]); with `reference` (those
    arrays of the reference model), "kl" = KL(reference || this model) over the kept
    outcomes plus the tail's mass, and "top1" = whether both argmaxes agree."""
    out = {"nll": (-logp.gather(1, target[:, None])[:, 0]).double().numpy()}
    if top_k == 0:
        out["logp"] = logp.numpy()
    elif top_k is not None:
        top = logp.topk(top_k, dim=-1)
        out["top_logp"], out["top_idx"] = top.values.numpy(), top.indices.to(torch.int32).numpy()
    if reference is not None:
        out["kl"], out["top1"] = kl_and_top1(logp, reference)
    return out


def kl_and_top1(logp: torch.Tensor, reference: Arrays) -> tuple[np.ndarray, np.ndarray]:
    """KL(P || Q) per row, P the reference's kept distribution, Q = exp(logp) [rows, vocab].
    With the reference's top k (ids I, log-probs log p_I) the outcomes are the k tokens and
    "any other token", whose masses are 1 - sum p_I and 1 - sum q_I: a lower bound of the
    full KL (merging outcomes never raises it), equal to it when the tail is empty."""
    if "logp" in reference:  # the whole vocabulary
        ref = torch.from_numpy(reference["logp"]).double()  # [rows, vocab]
        kl = (ref.exp() * (ref - logp.double())).sum(-1)
        return kl.numpy(), (logp.argmax(-1) == ref.argmax(-1)).numpy()
    ref = torch.from_numpy(reference["top_logp"]).double()  # [rows, k]
    idx = torch.from_numpy(reference["top_idx"]).long()  # [rows, k]
    q = logp.gather(1, idx).double()  # [rows, k]
    p_tail = (1 - ref.exp().sum(-1)).clamp(min=0)  # [rows]
    q_tail = (1 - q.exp().sum(-1)).clamp(min=1e-300)  # [rows]
    tail = torch.where(p_tail > 0, p_tail * (p_tail.clamp(min=1e-300).log() - q_tail.log()), 0)
    kl = (ref.exp() * (ref - q)).sum(-1) + tail
    return kl.numpy(), (logp.argmax(-1) == idx[:, 0]).numpy()


def peak_rss() -> int:
    """This process's peak resident memory in bytes: VmHWM, which starts afresh at exec
    (ru_maxrss keeps the peak of the process that forked it), else ru_maxrss."""
    with contextlib.suppress(OSError):
        for line in open("/proc/self/status").read().splitlines():  # noqa: SIM115
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _StopForwardError(Exception):
    """Raised by calibration's input hooks once every wanted input has been seen."""


class BlockRunner:
    """Loads blocks of the checkpoint at `model_uri` (source or quantized artifact) and
    runs the chunks it was given through them."""

    def __init__(
        self,
        *,
        model_uri: str,
        layout: BlockLayout,
        threads: int,
        storage: dict[str, dict] | None = None,
        kernel: Requested | None = None,
        spill: str | None = None,
        solve_device: str = "cpu",
        inverse_on_cpu: bool = False,
    ):
        """kernel: run stored quantized linears through this low-bit kernel (eval); None:
        dequantize them once per block (quantization's propagation, the reference's numbers).
        spill: keep the chunks' hidden states in files under this URI (workers.spill), not
        in memory. solve_device: where GPTQ / QuIP / RTN solves run ("cuda": this worker's
        GPU), with inverse_on_cpu each Hessian's factorization on the CPU all the same."""
        torch.set_num_threads(threads)
        if solve_device != "cpu" and not torch.cuda.is_available():
            raise RuntimeError(f"resources.solve_device: {solve_device}, but {socket.gethostname()} has no GPU here")
        self.solve_device, self.inverse_on_cpu = solve_device, inverse_on_cpu
        self.kernel = kernel
        if kernel is not None:
            choose(kernel, "cpu")  # a forced kernel that cannot run here fails before any work
        configure(storage or {}, resolved=True)
        self.layout = layout
        self.modeling = layout.module()
        self.reopen(model_uri)
        self.spill = spill
        self.tokens: dict[int, np.ndarray] = {}  # chunk id -> token ids [seqs, T]
        self.hidden: MutableMapping[int, torch.Tensor] = self.chunk_store()  # chunk id -> [seqs, T, hidden]
        self.at = 0  # the block whose inputs `hidden` holds
        self.layer: nn.Module | None = None
        self.raw: dict[str, torch.Tensor] = {}  # the loaded block's stored tensors, by local name
        self.index = -1
        self.fits: dict[str, CodebookPieces | VectorPieces] = {}  # linear -> its fit's pieces held here
        self.fit_scheme: CodebookScheme | VectorScheme | None = None
        self.smoothing: dict[str, torch.Tensor] = {}  # group -> the scale folded into the loaded block (see smooth)

    def reopen(self, model_uri: str) -> None:
        """Read blocks from another checkpoint of the same architecture from now on (eval:
        the source's reference pass, then the artifact's, in the same workers)."""
        self.checkpoint = Checkpoint(model_uri)
        self.config = model_config(self.checkpoint.config)
        self.rotary = getattr(self.modeling, self.layout.rotary_class)(self.config)
        self.stored = stored_format(self.checkpoint.config.get("quantization_config") or {})
        self.layer, self.raw, self.index = None, {}, -1

    # ---- inputs -------------------------------------------------------------------
    def kernel_backend(self) -> str | None:
        """The kernel this worker runs quantized linears through (None: dequantized once)."""
        return None if self.kernel is None else choose(self.kernel, "cpu")

    @staticmethod
    def whoami() -> str:
        """host:pid, and the Ray node when run as an actor: how events name this worker."""
        name = f"{socket.gethostname()}:{os.getpid()}"
        with contextlib.suppress(ImportError, AttributeError, RuntimeError):
            import ray

            if ray.is_initialized():
                name += f"@{ray.get_runtime_context().get_node_id()[:8]}"
        return name

    @staticmethod
    def peak_rss() -> int:
        return peak_rss()

    def state(self) -> tuple[int, list[int]]:
        """(the block whose inputs this runner holds, its chunk ids)."""
        return self.at, sorted(self.hidden)

    def chunk_store(self) -> MutableMapping[int, torch.Tensor]:
        """Where the chunks' hidden states live: a dict, or files under the spill URI."""
        return {} if self.spill is None else SpilledChunks(self.spill)

    def set_inputs(self, tokens: dict[int, np.ndarray], staged: StagedBlocks | None = None) -> int:
        """Hold exactly these chunks (token ids [seqs, T] each): see add_inputs."""
        self.hidden.clear()
        self.tokens, self.hidden, self.at = {}, self.chunk_store(), 0
        return self.add_inputs(tokens, staged)

    @torch.inference_mode()
    def add_inputs(self, tokens: dict[int, np.ndarray], staged: StagedBlocks | None = None) -> int:
        """Take on more chunks: embed them and, when blocks are already quantized
        (`staged`: a resumed run, or chunks moved from a lost worker), run them through
        those blocks as stored, which gives the same hidden states the run itself
        propagated. Returns the number of chunks held; the loaded block is gone after a
        catch-up (load the next one)."""
        blocks = staged.blocks if staged else 0
        if self.hidden and blocks != self.at:
            raise RuntimeError(f"runner holds inputs of block {self.at}; cannot add chunks at block {blocks}")
        if tokens:
            embed = self.checkpoint.read([self.layout.embed])[self.layout.embed].float()  # [vocab, hidden]
            for c, t in sorted(tokens.items()):
                self.hidden[c] = nn.functional.embedding(torch.from_numpy(t).long(), embed)
            del embed
        if staged and tokens:
            location = open_location(staged.uri)
            for i, file in enumerate(staged.shards):
                header = read_header(location, file)
                prefix = self.layout.block(i)
                tensors = read_tensors(location, header, sorted(header.entries))
                self._build(i, {n[len(prefix) :]: t for n, t in tensors.items()}, staged.format)
                for c in sorted(tokens):
                    self.hidden[c] = self._run(self.hidden[c])
            self.layer, self.raw, self.index = None, {}, -1
        self.tokens = dict(sorted({**self.tokens, **tokens}.items()))
        if isinstance(self.hidden, dict):
            self.hidden = dict(sorted(self.hidden.items()))
        self.at = blocks
        return len(self.hidden)

    # ---- one block ----------------------------------------------------------------
    def load_block(self, index: int) -> int:
        """Build block `index` from its stored tensors (byte-range reads); returns bytes read."""
        prefix = self.layout.block(index)
        names = self.checkpoint.names(prefix)
        if not names:
            raise ValueError(f"{self.checkpoint.uri}: no tensors for block {index} ({prefix}*)")
        raw = {n[len(prefix) :]: t for n, t in self.checkpoint.read(names).items()}
        self._build(index, raw, self.stored)
        return self.checkpoint.bytes_of(names)

    def _build(self, index: int, raw: dict[str, torch.Tensor], fmt: Format | None) -> None:
        """Block `index` from its stored tensors by local name; quantized linears (those
        stored as qweight, codes or indices) dequantized once, as QuantLinear's reference path would."""
        self.raw, self.smoothing = raw, {}
        with torch.device("meta"):
            layer = getattr(self.modeling, self.layout.layer_class)(self.config, index)
            if self.layout.moe:
                install_moe(layer, self.config, self.layout.moe)
        layer = layer.to_empty(device="cpu")
        quantized = [lin for lin in self.layout.linears if any(f"{lin}.{m}" in self.raw for m in MARKERS)]
        if quantized and fmt is None:
            raise ValueError(
                f"{self.checkpoint.uri}: block {index} holds quantized {quantized[0]} but no quantization_config"
            )
        for linear in quantized:
            self._swap(layer, linear, self._stored_quantized(linear, fmt))
        layer.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in self.raw.items()}, strict=True)
        for linear in quantized:
            module = layer.get_submodule(linear)
            if self.kernel is None:  # the reference path's numbers, dequantized once per block, not per chunk
                self._swap(layer, linear, module.dense())
            else:
                module.use(self.kernel)
        self.layer, self.index = layer.eval(), index

    def _stored_quantized(self, linear: str, fmt: Format) -> nn.Module:
        parts = {s: self.raw[f"{linear}.{s}"] for s in STORED if f"{linear}.{s}" in self.raw}
        return quant_linear(weight_from_tensors(parts, fmt), self.raw.get(f"{linear}.bias"))

    @staticmethod
    def _swap(layer: nn.Module, linear: str, module: nn.Module) -> None:
        parent, _, leaf = linear.rpartition(".")
        setattr(layer.get_submodule(parent), leaf, module)

    def _run(self, hidden: torch.Tensor) -> torch.Tensor:
        seqs, T = hidden.shape[:2]
        position_ids = torch.arange(T).expand(seqs, T)  # [seqs, T]
        position_embeddings = self.rotary(hidden, position_ids)
        out = self.layer(hidden, position_ids=position_ids, position_embeddings=position_embeddings)
        return out[0] if isinstance(out, tuple) else out

    @torch.inference_mode()
    def calibrate(
        self, total: int, groups: list[str] | None = None, route_all: list[int] | None = None, channels: bool = False
    ) -> list[Node]:
        """The sums of x x^T of the inputs of each linear group (all, or those named by
        their first linear) over this runner's chunks, folded into whole subtrees of the
        fixed tree over all `total` chunks (see workers.chunk_sum): [(first chunk, span,
        {group: H})]. The forward of a chunk stops once the last wanted input is seen:
        the rest of the block is not needed here.

        An expert's group also gets its token count (group + TOKENS): a chunk may route
        no token to it (a zero sum). `route_all` names experts run on every token for
        these sums (see SparseMoe). With `channels`, every group also gets the sum of |x|
        (group + ABSMEAN) and the max of |x| (group + MAXIMA) of each input channel, which
        AWQ and SmoothQuant scale by."""
        captured: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        names = [group[0] for group in self.layout.groups] if groups is None else groups
        experts = [name for name in names if self.layout.is_expert(name)]

        def record(name: str, x: torch.Tensor) -> None:
            X = x.reshape(-1, x.shape[-1]).float()  # [tokens, in]
            captured[name], counts[name] = input_gram(X), X.shape[0]
            if channels:
                captured[name + ABSMEAN] = X.abs().sum(dim=0)  # [in]
                captured[name + MAXIMA] = X.abs().amax(dim=0) if len(X) else torch.zeros(X.shape[1])  # [in]

        def capture(name: str, x: torch.Tensor) -> None:
            record(name, x)
            if len(counts) == len(names):
                raise _StopForwardError

        hooks = [
            self.layer.get_submodule(name).register_forward_pre_hook(
                lambda _m, inputs, name=name: capture(name, inputs[0])
            )
            for name in names
        ]
        moe = self.layer.get_submodule(self.layout.moe) if self.layout.moe else None
        if isinstance(moe, SparseMoe):
            moe.route_all = frozenset(route_all or ())
        try:
            stack: list[Node] = []
            for chunk, hidden in self.hidden.items():
                with contextlib.suppress(_StopForwardError):
                    self._run(hidden)
                for name in experts:  # no token of this chunk was routed to it
                    if name not in captured:
                        record(name, torch.zeros(0, self.layer.get_submodule(name).in_features))
                if missing := sorted(set(names) - set(counts)):
                    raise RuntimeError(f"block {self.index}: the forward never reached {', '.join(missing)}")
                sums = {name: h.numpy() for name, h in captured.items()}
                sums.update({name + TOKENS: np.array([counts[name]], dtype=np.int64) for name in experts})
                push(stack, (chunk, 1, sums), total)
                captured.clear()
                counts.clear()
            return stack
        finally:
            for hook in hooks:
                hook.remove()
            if isinstance(moe, SparseMoe):
                moe.route_all = frozenset()

    def token_counts(self, hessians: Arrays) -> dict[str, int]:
        """The token count of each expert group in reduced Hessians."""
        return {k.removesuffix(TOKENS): int(v[0]) for k, v in hessians.items() if k.endswith(TOKENS)}

    def merge(self, *parts: Arrays) -> Arrays:
        """Reduced Hessians of separate calibrations, later ones replacing earlier ones' groups."""
        return {k: v for part in parts for k, v in part.items()}

    def reduce(self, total: int, *parts: list[Node]) -> Arrays:
        """The Hessians of the whole calibration set: every runner's subtrees folded in
        chunk order (runners may hold chunks that are not contiguous after a recovery)."""
        return fold(sorted((node for part in parts for node in part), key=lambda n: n[0]), total)

    # ---- AWQ / SmoothQuant: scales folded into the op before a group ------------------
    def smoothable(self, method: str) -> dict[str, str]:
        """{group: the op before it} of the loaded block that `method` smooths: AWQ every
        mapping of the layout whose op's outputs are the group's inputs one to one (not v
        into o under grouped-query attention), SmoothQuant those after a norm."""
        out = {}
        for prev, group in self.layout.smooth:
            module = self.layer.get_submodule(prev)
            outputs = getattr(module, "out_features", None)  # a linear's; a norm's outputs are its inputs
            one_to_one = method == "awq" and outputs == self.layer.get_submodule(group).in_features
            if outputs is not None and not one_to_one:
                continue
            out[group] = prev
        return out

    @torch.inference_mode()
    def smooth_search(
        self,
        block: int,
        groups: list[str],
        hessians: Arrays,
        *,
        tokens: int,
        method: str,
        config: object,
        scheme: Format,
    ) -> dict[str, tuple[np.ndarray, float | None, float | None]]:
        """The input scale of each named group of the loaded block that `method` smooths:
        {group: (s [in], alpha (None: no scaling was best), AWQ's loss at s relative to no
        scaling (None for SmoothQuant, which does not measure one))}. AWQ searches
        it (algorithms.awq.search_scale); SmoothQuant computes it with the recipe's alpha."""
        if block != self.index:
            raise RuntimeError(f"asked to smooth block {block}, but block {self.index} is loaded")
        out, device = {}, self.solve_device  # AWQ's search runs where the solves do
        smoothable = self.smoothable(method)
        for group in (g for g in groups if g in smoothable):
            Ws = [self.layer.get_submodule(name).weight.detach() for name in self.layout.members(group)]
            if method == "awq":
                H = scaled_hessian(hessians, group, tokens).to(device)
                x_mean = torch.from_numpy(hessians[group + ABSMEAN]).to(device) / tokens
                with torch.device(device):
                    found = search_scale([w.to(device) for w in Ws], H, x_mean, scheme, config)
                out[group] = (found.scale.cpu().numpy(), found.alpha, found.loss_ratio)
            else:
                s = smoothing_scale(torch.from_numpy(hessians[group + MAXIMA]), Ws, float(config))
                out[group] = (s.numpy(), float(config), None)
        return out

    @torch.inference_mode()
    def smooth(self, block: int, method: str, *found: dict[str, tuple[np.ndarray, float | None, float | None]]) -> int:
        """Fold each group's scale s into the loaded block: its linears' columns times s, the
        op before it (a norm's weight, a linear's rows and bias) divided by s, in the
        stored tensors (their dtype) and in the layer alike; the solves then see the
        Hessians of the scaled inputs. Returns the number of groups smoothed."""
        if block != self.index:
            raise RuntimeError(f"asked to smooth block {block}, but block {self.index} is loaded")
        before = self.smoothable(method)
        for group, (s, _, _) in sorted({k: v for part in found for k, v in part.items()}.items()):
            s = torch.from_numpy(s).float()  # [in]
            for name in self.layout.members(group):
                self._rescale(f"{name}.weight", s[None, :])
            prev = before[group]
            rows = s[:, None] if isinstance(self.layer.get_submodule(prev), nn.Linear) else s
            self._rescale(f"{prev}.weight", 1 / rows)
            if f"{prev}.bias" in self.raw:
                self._rescale(f"{prev}.bias", 1 / s)
            self.smoothing[group] = s
        return len(self.smoothing)

    def _rescale(self, name: str, factor: torch.Tensor) -> None:
        """Stored tensor `name` (local) times `factor`, rounded to its stored dtype; the
        layer's parameter becomes exactly what loading that tensor gives."""
        stored = self.raw[name]
        self.raw[name] = (stored.float() * factor).to(stored.dtype)
        module, _, leaf = name.rpartition(".")
        getattr(self.layer.get_submodule(module), leaf).data.copy_(self.raw[name].float())

    @torch.inference_mode()
    def solve(
        self,
        block: int,
        tasks: list[tuple[str, int, int]],
        hessians: Arrays | None,
        *,
        tokens: int,
        algorithm: str,
        scheme: Format,
        options: object,
        rtn: tuple[str, ...] = (),
    ) -> list[Piece]:
        """Quantize rows first..last-1 of each named linear of the loaded block (rows are
        independent given H, which is normalised by the token count); the linears of the
        groups in `rtn` (experts too few tokens reached) by round-to-nearest, without H."""
        if block != self.index:
            raise RuntimeError(f"asked to solve block {block}, but block {self.index} is loaded")
        out = []
        device = self.solve_device
        prepared: dict[str, object] = {}  # one Hessian's prepared solve at a time (70B: GBs each)
        for linear, first, last in sorted(tasks, key=lambda t: (self.layout.group_of(t[0]), t)):
            group = self.layout.group_of(linear)
            W = self.layer.get_submodule(linear).weight.detach().to(device)  # [out, in]
            H = None if hessians is None or group in rtn else scaled_hessian(hessians, group, tokens)
            if H is not None and group in self.smoothing:  # the Hessian of the inputs x / s
                s = self.smoothing[group]
                H = H / s[:, None] / s[None, :]
            noclip = algorithm == "awq" and linear in self.layout.scores  # AWQ clips no attention-score range
            opts = dataclasses.replace(options, clip=False) if noclip else options
            if H is not None and algorithm in PREPARERS and group not in prepared:
                prepared = {}  # the last group's freed before this one's is made
                where = "cpu" if self.inverse_on_cpu else device
                with torch.device(where):
                    prepared = {group: moved(PREPARERS[algorithm](H.to(where), opts), device)}
            H = None if H is None else H.to(device)
            shared = prepared.get(group)
            if isinstance(scheme, FloatScheme) and scheme.kind == "nvfp4":  # one global scale for what vLLM fuses
                shared = shared_global_scale([self.layer.get_submodule(n).weight for n in self.layout.members(group)])
            fit = (algorithm, scheme, opts, shared)
            with torch.device(device):  # what the solve allocates goes where its inputs are
                arrays = solve_rows(W, first, last, H, *fit, fallback=H is None and hessians is not None)
            if isinstance(scheme, FloatScheme) and scheme.static_activations:
                arrays.update(self.activation_scale(hessians, group, scheme))
            out.append((linear, first, arrays))
            log.debug("block %d %s rows %d:%d quantized", self.index, linear, first, last)
        return out

    def activation_scale(self, hessians: Arrays, group: str, scheme: FloatScheme) -> Arrays:
        """The static activation scale of the group's linears, from the calibration set's max
        |x| over their (smoothed) inputs: {input_scale | input_global_scale: [1]}."""
        absmax = torch.from_numpy(hessians[group + MAXIMA])  # [in]
        if group in self.smoothing:
            absmax = absmax / self.smoothing[group]
        name = "input_global_scale" if scheme.kind == "nvfp4" else "input_scale"
        return {name: static_input_scale(float(absmax.max()), scheme.activations).numpy()}

    # ---- codebook fits, split by rows (pipeline/codebook_fit.py drives them) ---------
    @torch.inference_mode()
    def codebook_open(
        self,
        block: int,
        tasks: list[tuple[str, int, int]],
        hessians: Arrays,
        *,
        tokens: int,
        scheme: CodebookScheme | VectorScheme,
        options: object = None,
    ) -> int:
        """Hold rows first..last-1 of each named linear of the loaded block as pieces of
        its codebook fit (one LocalPieces per linear, a Hessian shared by its group):
        AQLM's for a codebook scheme, VPTQ's (with its `options`) for a vector one."""
        if block != self.index:
            raise RuntimeError(f"asked to fit block {block}, but block {self.index} is loaded")
        device = "cuda" if torch.cuda.is_available() else "cpu"  # a GPU when Ray gave this worker one
        if device == "cuda":  # index_add_'s sums in a fixed order: the same bytes every run
            torch.use_deterministic_algorithms(True, warn_only=True)
        groups = {self.layout.group_of(t[0]) for t in tasks}
        H = {group: scaled_hessian(hessians, group, tokens).to(device) for group in groups}
        self.fits = {}
        for linear in sorted({t[0] for t in tasks}):
            W = self.layer.get_submodule(linear).weight.detach().to(device)  # [out, in]
            ranges = [(first, last) for name, first, last in tasks if name == linear]
            Hl = H[self.layout.group_of(linear)]
            if isinstance(scheme, VectorScheme):
                self.fits[linear] = VectorPieces.of(W, ranges, Hl, scheme, options)
            else:
                self.fits[linear] = CodebookPieces.of(W, ranges, Hl, scheme.in_group_size)
        self.fit_scheme = scheme
        return len(tasks)

    def codebook_call(self, linear: str, op: str, *args: object) -> object:
        """One step of a linear's fit on the pieces held here."""
        if op not in CODEBOOK_OPS[type(self.fit_scheme)]:
            raise ValueError(f"unknown codebook fit step {op!r}")
        return getattr(self.fits[linear], op)(*args)

    def codebook_firsts(self) -> dict[str, list[int]]:
        return {linear: pieces.firsts for linear, pieces in self.fits.items()}

    @torch.inference_mode()
    def codebook_finish(self, books: dict[str, object], scheme: CodebookScheme | VectorScheme) -> list[Piece]:
        """The held pieces as solved pieces with the linears' final codebooks; forgets them."""
        out = []
        for linear, pieces in sorted(self.fits.items()):
            if isinstance(scheme, VectorScheme):
                weights = pieces.weights(books[linear])
            else:
                weights = pieces.weights(books[linear], scheme)
            for first, shard, w in zip(pieces.firsts, pieces.shards, weights, strict=True):
                error = weighted_error(shard.W.cpu(), dequantize(w), pieces.H.cpu())
                out.append((linear, first, {**to_arrays(w), "error": error}))
        self.fits = {}
        return out

    def install(self, scheme: Format, *solved: list[Piece]) -> None:
        """Replace the block's linears by the solved weights, dequantized once: the block
        runs every chunk through them, and the same matmul as QuantLinear's reference
        path (dequantize, then linear) gives the same outputs without repeating the
        dequantization per chunk."""
        for linear, arrays in join_rows(solved).items():
            bias = self.layer.get_submodule(linear).bias
            self._swap(self.layer, linear, quant_linear(from_arrays(arrays, scheme), bias).dense())

    @torch.inference_mode()
    def forward(self) -> None:
        """Run every chunk through the loaded block: its outputs become the next inputs."""
        if self.at != self.index:
            raise RuntimeError(f"runner holds inputs of block {self.at}, not of the loaded block {self.index}")
        for c in list(self.hidden):
            self.hidden[c] = self._run(self.hidden[c])
        self.at = self.index + 1

    def write_block(
        self, uri: str, file: str, *solved: list[Piece], fmt: Format | None = None
    ) -> tuple[FileRecord, list[str], dict[str, float]]:
        """Write the loaded block with its solved linears (in format `fmt`) as one
        safetensors shard; returns its record, tensor names and each linear's relative
        Hessian-weighted error."""
        prefix = self.layout.block(self.index)
        done = join_rows(solved)
        replaced = {f"{linear}.weight" for linear in done}  # a solved linear's bias stays as it is
        tensors = {prefix + name: t for name, t in self.raw.items() if name not in replaced}
        for linear, arrays in done.items():
            stored = from_arrays(arrays, fmt).tensors() if isinstance(fmt, FloatScheme) else arrays  # float8 dtypes
            tensors.update({f"{prefix}{linear}.{k}": torch.as_tensor(v) for k, v in stored.items()})
        return put_tensors(uri, file, tensors), sorted(tensors), relative_errors(solved)

    # ---- whole-model pieces -------------------------------------------------------
    def copy_tensors(self, uri: str, file: str, names: list[str]) -> tuple[FileRecord, list[str]]:
        """Copy tensors outside the blocks (embeddings, final norm, head) as they are."""
        return put_tensors(uri, file, self.checkpoint.read(names)), sorted(names)

    @torch.inference_mode()
    def score(self, *, top_k: int | None = None, reference: dict[int, Arrays] | None = None) -> dict[int, Arrays]:
        """Final norm and LM head over each held window (a chunk of one sequence):
        {window: {"nll": [T-1]}} per predicted token; with `top_k` (the reference pass) also
        the top k log-probs and their token ids (k = 0: every log-prob); with `reference`
        (that pass's output for these windows) also "kl" and "top1" against it."""
        lay = self.layout
        head = lay.lm_head if lay.lm_head in self.checkpoint.weight_map else lay.embed  # tied embeddings
        tensors = self.checkpoint.read([lay.final_norm, head])
        norm = getattr(self.modeling, lay.norm_class)(self.config.hidden_size, eps=self.config.rms_norm_eps)
        norm.weight.copy_(tensors[lay.final_norm])
        W_head = tensors[head].float()  # [vocab, hidden]
        scores = {}
        for window, hidden in self.hidden.items():
            (seq,), (ids,) = hidden, self.tokens[window]  # [T, hidden], [T]
            target = torch.from_numpy(ids[1:]).long()  # [T-1]
            parts = []
            for a in range(0, len(target), SCORE_ROWS):  # [rows, vocab] at a time: 8k x 128k would be 4 GB
                b = min(a + SCORE_ROWS, len(target))
                logp = torch.log_softmax(norm(seq[a:b]) @ W_head.T, dim=-1)  # [rows, vocab]
                ref = None if reference is None else {k: v[a:b] for k, v in reference[window].items()}
                parts.append(token_scores(logp, target[a:b], top_k=top_k, reference=ref))
            scores[window] = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        return scores
