"""Run one decoder block at a time over the chunks a worker owns.

A runner holds at most one block, the hidden states of its chunks and, while
calibrating, the Hessians of its chunks for that block (returned per chunk so that the
driver can sum them in chunk order). The driver decides what runs where.
"""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from algorithms import QUANTIZERS, GPTQConfig, QuantizedWeight, UniformScheme
from algorithms.hessian import input_gram
from kernels import QuantLinear
from storage.checkpoint import Checkpoint
from storage.options import configure
from storage.writer import FileRecord, put_tensors
from workers.layout import BlockLayout

log = logging.getLogger(__name__)
Arrays = dict[str, np.ndarray]


def model_config(raw: dict) -> PretrainedConfig:
    """A transformers config from config.json contents, with SDPA attention (causal when
    no mask is given) and without any quantization_config."""
    fields = {k: v for k, v in raw.items() if k not in ("quantization_config", "model_type")}
    config = AutoConfig.for_model(raw["model_type"], **fields)
    config._attn_implementation = "sdpa"
    return config


def to_arrays(qw: QuantizedWeight) -> Arrays:
    return {k: v.numpy() for k, v in qw.tensors().items()}


def from_arrays(arrays: Arrays, *, bits: int, group_size: int) -> QuantizedWeight:
    return QuantizedWeight.from_tensors(
        {k: torch.from_numpy(v) for k, v in arrays.items()}, bits=bits, group_size=group_size
    )


class _StopForwardError(Exception):
    """Raised by calibration's input hooks once every wanted input has been seen."""


class BlockRunner:
    """Loads blocks of the checkpoint at `model_uri` (source or quantized artifact) and
    runs the chunks it was given through them."""

    def __init__(self, *, model_uri: str, layout: BlockLayout, threads: int, storage: dict[str, dict] | None = None):
        torch.set_num_threads(threads)
        configure(storage or {}, resolved=True)
        self.checkpoint = Checkpoint(model_uri)
        self.layout = layout
        self.config = model_config(self.checkpoint.config)
        self.modeling = layout.module()
        self.rotary = getattr(self.modeling, layout.rotary_class)(self.config)
        qc = self.checkpoint.config.get("quantization_config") or {}
        self.stored_bits, self.stored_group = qc.get("bits", 0), qc.get("group_size", 0)
        self.tokens: dict[int, np.ndarray] = {}  # chunk id -> token ids [seqs, T]
        self.hidden: dict[int, torch.Tensor] = {}  # chunk id -> [seqs, T, hidden]
        self.layer: nn.Module | None = None
        self.raw: dict[str, torch.Tensor] = {}  # the loaded block's stored tensors, by local name
        self.index = -1

    # ---- inputs -------------------------------------------------------------------
    def set_inputs(self, tokens: dict[int, np.ndarray]) -> int:
        """Embed token ids [seqs, T] per chunk; returns the number of chunks held."""
        embed = self.checkpoint.read([self.layout.embed])[self.layout.embed].float()  # [vocab, hidden]
        self.tokens = dict(sorted(tokens.items()))
        self.hidden = {c: nn.functional.embedding(torch.from_numpy(t).long(), embed) for c, t in sorted(tokens.items())}
        return len(self.hidden)

    # ---- one block ----------------------------------------------------------------
    def load_block(self, index: int) -> int:
        """Build block `index` from its stored tensors (byte-range reads); returns bytes read."""
        prefix = self.layout.block(index)
        names = self.checkpoint.names(prefix)
        if not names:
            raise ValueError(f"{self.checkpoint.uri}: no tensors for block {index} ({prefix}*)")
        self.raw = {n[len(prefix) :]: t for n, t in self.checkpoint.read(names).items()}
        with torch.device("meta"):
            layer = getattr(self.modeling, self.layout.layer_class)(self.config, index)
        layer = layer.to_empty(device="cpu")
        quantized = [linear for linear in self.layout.linears if f"{linear}.qweight" in self.raw]
        for linear in quantized:
            self._swap(layer, linear, self._stored_quantized(linear))
        layer.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in self.raw.items()}, strict=True)
        for linear in quantized:  # QuantLinear's CPU reference path dequantizes: once per block, not per chunk
            self._swap(layer, linear, layer.get_submodule(linear).dense())
        self.layer, self.index = layer.eval(), index
        return self.checkpoint.bytes_of(names)

    def _stored_quantized(self, linear: str) -> QuantLinear:
        parts = {
            s: self.raw[f"{linear}.{s}"]
            for s in ("qweight", "scales", "qzeros", "g_idx")
            if f"{linear}.{s}" in self.raw
        }
        qw = QuantizedWeight.from_tensors(parts, bits=self.stored_bits, group_size=self.stored_group)
        return QuantLinear(qw, self.raw.get(f"{linear}.bias"))

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
    def calibrate(self, groups: list[str] | None = None) -> dict[int, Arrays]:
        """Per chunk, the sum of x x^T of the inputs of each linear group (all, or those
        named by their first linear): {chunk: {group: H}}. The forward of a chunk stops
        once the last wanted input is seen: the rest of the block is not needed here."""
        captured: dict[str, torch.Tensor] = {}
        names = [group[0] for group in self.layout.groups] if groups is None else groups

        def capture(name: str, x: torch.Tensor) -> None:
            captured[name] = input_gram(x)
            if len(captured) == len(names):
                raise _StopForwardError

        hooks = [
            self.layer.get_submodule(name).register_forward_pre_hook(
                lambda _m, inputs, name=name: capture(name, inputs[0])
            )
            for name in names
        ]
        try:
            result = {}
            for chunk, hidden in self.hidden.items():
                with contextlib.suppress(_StopForwardError):
                    self._run(hidden)
                if missing := sorted(set(names) - set(captured)):
                    raise RuntimeError(f"block {self.index}: the forward never reached {', '.join(missing)}")
                result[chunk] = {name: h.numpy() for name, h in captured.items()}
                captured.clear()
            return result
        finally:
            for hook in hooks:
                hook.remove()

    @torch.inference_mode()
    def solve(
        self,
        linears: list[str],
        hessians: Arrays | None,
        *,
        tokens: int,
        algorithm: str,
        scheme: UniformScheme,
        options: GPTQConfig,
    ) -> dict[str, Arrays]:
        """Quantize the named linears of the loaded block; H is normalised by the token count."""
        out = {}
        for linear in linears:
            W = self.layer.get_submodule(linear).weight.detach()  # [out, in]
            H = None if hessians is None else torch.from_numpy(hessians[self.layout.group_of(linear)]) / tokens
            out[linear] = to_arrays(QUANTIZERS[algorithm](W, H, scheme, options))
            log.debug("block %d %s quantized", self.index, linear)
        return out

    def install(self, scheme: UniformScheme, *solved: dict[str, Arrays]) -> None:
        """Replace the block's linears by the solved weights, dequantized once: the block
        runs every chunk through them, and the same matmul as QuantLinear's reference
        path (dequantize, then linear) gives the same outputs without repeating the
        dequantization per chunk."""
        for part in solved:
            for linear, arrays in part.items():
                bias = self.layer.get_submodule(linear).bias
                qw = from_arrays(arrays, bits=scheme.bits, group_size=scheme.group_size)
                self._swap(self.layer, linear, QuantLinear(qw, bias).dense())

    @torch.inference_mode()
    def forward(self) -> None:
        """Run every chunk through the loaded block: its outputs become the next inputs."""
        self.hidden = {c: self._run(h) for c, h in self.hidden.items()}

    def write_block(self, uri: str, file: str, *solved: dict[str, Arrays]) -> tuple[FileRecord, list[str]]:
        """Write the loaded block with its solved linears as one safetensors shard."""
        prefix = self.layout.block(self.index)
        done = {linear: arrays for part in solved for linear, arrays in part.items()}
        tensors = {prefix + name: t for name, t in self.raw.items() if name.rpartition(".")[0] not in done}
        for linear, arrays in done.items():
            tensors.update({f"{prefix}{linear}.{k}": torch.from_numpy(v) for k, v in arrays.items()})
        return put_tensors(uri, file, tensors), sorted(tensors)

    # ---- whole-model pieces -------------------------------------------------------
    def copy_tensors(self, uri: str, file: str, names: list[str]) -> tuple[FileRecord, list[str]]:
        """Copy tensors outside the blocks (embeddings, final norm, head) as they are."""
        return put_tensors(uri, file, self.checkpoint.read(names)), sorted(names)

    @torch.inference_mode()
    def score(self) -> dict[int, tuple[float, int]]:
        """Final norm and LM head over each chunk: {chunk: (sum of NLL of predicted tokens, count)}."""
        lay = self.layout
        head = lay.lm_head if lay.lm_head in self.checkpoint.weight_map else lay.embed  # tied embeddings
        tensors = self.checkpoint.read([lay.final_norm, head])
        norm = getattr(self.modeling, lay.norm_class)(self.config.hidden_size, eps=self.config.rms_norm_eps)
        norm.weight.copy_(tensors[lay.final_norm])
        W_head = tensors[head].float()  # [vocab, hidden]
        scores = {}
        for chunk, hidden in self.hidden.items():
            nll, count = 0.0, 0
            for seq, ids in zip(hidden, self.tokens[chunk], strict=True):
                logits = norm(seq) @ W_head.T  # [T, vocab]
                target = torch.from_numpy(ids[1:]).long()  # [T-1]
                per_token = nn.functional.cross_entropy(logits[:-1], target, reduction="none")  # [T-1]
                nll += float(per_token.double().sum())
                count += target.numel()
            scores[chunk] = (nll, count)
        return scores
