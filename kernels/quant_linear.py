"""nn.Linear replacements that store a quantized weight and run it through one of the
low-bit kernels (kernels/backends.py): QuantLinear for the uniform format, CodebookLinear
for the codebook format, VectorLinear for the vector format, FloatLinear for the float and
W8A8 formats; `quant_linear` builds the right one for a weight."""

from __future__ import annotations

import torch
from torch import nn

from algorithms.codebook import CodebookWeight
from algorithms.float_activations import quantize_activations
from algorithms.floatq import ActivationScheme, FloatWeight
from algorithms.quip import QuipScheme, QuipWeight
from algorithms.types import QuantizedWeight
from algorithms.vector import VectorScheme, VectorWeight
from kernels import reference
from kernels.backends import Backend, Requested, choose


class _LowBitLinear(nn.Module):
    """What both formats share: the backend choice ('auto' picks the best one for the
    device of the first input), each kernel's layout of the weight made on first use and
    kept, and the dense equivalent."""

    in_features: int
    out_features: int

    def _init(self, bias: torch.Tensor | None, backend: Requested) -> None:
        self.register_buffer("bias", bias)
        self.requested: Requested = backend
        self._laid_out: tuple[Backend, torch.device, object] | None = None

    @property
    def quantized(self) -> QuantizedWeight | CodebookWeight | VectorWeight:
        raise NotImplementedError

    def _device(self) -> torch.device:
        raise NotImplementedError

    def _kernel(self, backend: Backend):
        raise NotImplementedError

    def use(self, backend: Requested) -> _LowBitLinear:
        """Run through `backend` from the next call on."""
        self.requested, self._laid_out = backend, None
        return self

    def backend(self, device: torch.device | None = None) -> Backend:
        device = device or self._device()
        return choose(self.requested, "cuda" if device.type == "cuda" else "cpu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        backend = self.backend(x.device)
        if backend == "reference":
            return reference.linear(x, self.quantized, self.bias)
        kernel = self._kernel(backend)
        if self._laid_out is None or self._laid_out[:2] != (backend, x.device):
            self._laid_out = (backend, x.device, kernel.layout(self.quantized, x.device))
        return kernel.linear(x, self._laid_out[2], self.bias)

    def dense(self) -> nn.Linear:
        """An nn.Linear holding the dequantized weight: the same outputs as this layer's
        reference path, for running one layer over many batches on CPU."""
        layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        layer.weight = nn.Parameter(reference.dequantize(self.quantized), requires_grad=False)
        if self.bias is not None:
            layer.bias = nn.Parameter(self.bias.float(), requires_grad=False)
        return layer.eval()


class QuantLinear(_LowBitLinear):
    """Buffers `qweight`, `scales`, `qzeros` (and `g_idx`, `bias`) as in the native artifact."""

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None = None, backend: Requested = "reference"):
        super().__init__()
        self.in_features, self.out_features = qw.in_features, qw.out_features
        self.bits, self.group_size = qw.bits, qw.group_size
        self.register_buffer("qweight", qw.qweight)
        self.register_buffer("scales", qw.scales)
        self.register_buffer("qzeros", qw.zeros)
        self.register_buffer("g_idx", qw.g_idx)
        self._init(bias, backend)

    @property
    def quantized(self) -> QuantizedWeight:
        return QuantizedWeight(
            qweight=self.qweight,
            scales=self.scales,
            zeros=self.qzeros,
            bits=self.bits,
            group_size=self.group_size,
            in_features=self.in_features,
            g_idx=self.g_idx,
        )

    def _device(self) -> torch.device:
        return self.qweight.device

    def _kernel(self, backend: Backend):
        """The module of a compiled backend (imported on first use: triton only where it
        runs): each has `layout(qw, device)` and `linear(x, laid_out, bias)`."""
        if backend == "cpu":
            from kernels import cpu

            return cpu
        from kernels import triton_uniform

        return triton_uniform

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group={self.group_size}, "
            f"backend={self.requested}"
        )


class CodebookLinear(_LowBitLinear):
    """Buffers `codes`, `codebooks`, `scales` (and `bias`) as in the native artifact and
    AQLM's checkpoints. The `cpu` backend is the lookup-table path of kernels/codebook_cpu.py."""

    def __init__(self, cw: CodebookWeight, bias: torch.Tensor | None = None, backend: Requested = "reference"):
        super().__init__()
        self.in_features, self.out_features = cw.in_features, cw.out_features
        self.register_buffer("codes", cw.codes)
        self.register_buffer("codebooks", cw.codebooks)
        self.register_buffer("scales", cw.scales)
        self._init(bias, backend)

    @property
    def quantized(self) -> CodebookWeight:
        return CodebookWeight(codes=self.codes, codebooks=self.codebooks, scales=self.scales)

    def _device(self) -> torch.device:
        return self.codes.device

    def _kernel(self, backend: Backend):
        if backend == "cpu":
            from kernels import codebook_cpu

            return codebook_cpu
        from kernels import triton_codebook

        return triton_codebook

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.quantized.scheme.name}, backend={self.requested}"


class _SchemeLinear(_LowBitLinear):
    """A weight whose tensors (by suffix) and scheme make it: each tensor a buffer named by
    its suffix, the weight rebuilt from them by `weight_type.from_tensors`."""

    weight_type: type[VectorWeight] | type[QuipWeight]
    marker: str  # a buffer every weight of the format has, on the layer's device

    def __init__(
        self, weight: VectorWeight | QuipWeight, bias: torch.Tensor | None = None, backend: Requested = "reference"
    ):
        super().__init__()
        self.in_features, self.out_features = weight.in_features, weight.out_features
        self.scheme: VectorScheme | QuipScheme = weight.scheme
        self.suffixes = tuple(weight.tensors())
        for name, t in weight.tensors().items():
            self.register_buffer(name, t)
        self._init(bias, backend)

    @property
    def quantized(self) -> VectorWeight | QuipWeight:
        return self.weight_type.from_tensors({s: getattr(self, s) for s in self.suffixes}, self.scheme)

    def _device(self) -> torch.device:
        return getattr(self, self.marker).device

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.scheme.name}, backend={self.requested}"


class VectorLinear(_SchemeLinear):
    """Buffers named as in the native artifact and vptq's VQuantLinear (`indices`,
    `centroids`, ...; see algorithms/vector.py). The `cpu` backend decodes the weight once
    (kept while the layer is on that device) and runs torch's matmul."""

    weight_type, marker = VectorWeight, "indices"

    def _kernel(self, backend: Backend):
        if backend == "cpu":
            from kernels import vector_cpu

            return vector_cpu
        from kernels import triton_vector

        return triton_vector


class IncoherentLinear(_SchemeLinear):
    """QuIP / QuIP# (algorithms/quip.py): buffers `su`, `sv` (the signs) and the rotated
    weight's codes (`qidxs` and `scales` for E8P; the uniform grid's tensors for scalar).
    `reference` runs the fast Walsh-Hadamard transforms on the activations around the
    decoded rotated weight; `cpu` decodes the weight back to the model's space once and
    runs torch's matmul; `triton` decodes E8P codes in Triton kernels between the torch
    transforms (kernels/triton_quip.py)."""

    weight_type, marker = QuipWeight, "su"

    def _kernel(self, backend: Backend):
        if backend == "cpu":
            from kernels import quip_cpu

            return quip_cpu
        from kernels import triton_quip

        return triton_quip


class FloatLinear(_SchemeLinear):
    """The float and W8A8 formats (algorithms/floatq.py): buffers named as compressed-tensors
    names them (`weight` or `weight_packed`, `weight_scale`, ...). `reference` quantizes the
    activations (when the scheme does) and multiplies them with the dequantized weight;
    `cpu` runs torch's int8 / fp8 matmuls where they apply (kernels/floatq_cpu.py). There is
    no GPU kernel yet: on CUDA the reference path runs."""

    weight_type, marker = FloatWeight, "weight_scale"

    def backend(self, device: torch.device | None = None) -> Backend:
        chosen = super().backend(device)
        return "reference" if chosen == "triton" else chosen

    def _kernel(self, backend: Backend):
        from kernels import floatq_cpu

        return floatq_cpu

    def dense(self) -> nn.Linear:
        """The dense equivalent: an nn.Linear holding the dequantized weight that still
        quantizes its input as this layer does (ActQuantLinear), so that a block run
        through it sees the W8A8 / W4A4 numbers."""
        layer = super().dense()
        fw = self.quantized
        if fw.scheme.activations is None:
            return layer
        return ActQuantLinear(layer.weight, layer.bias, fw.scheme.activations, fw.activation_scale)


class ActQuantLinear(nn.Linear):
    """nn.Linear whose input is quantized first (algorithms/float_activations.py): the same
    outputs as FloatLinear's reference path, without dequantizing the weight per call."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        activations: ActivationScheme,
        act_scale: torch.Tensor | None,
    ):
        out_features, in_features = weight.shape
        super().__init__(in_features, out_features, bias=bias is not None, device="meta")
        self.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            self.bias = nn.Parameter(bias, requires_grad=False)
        self.activations = activations
        self.register_buffer("act_scale", act_scale)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = quantize_activations(x, self.activations, self.act_scale)
        return nn.functional.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activations={self.activations.name}"


def quant_linear(
    weight: QuantizedWeight | CodebookWeight | VectorWeight | QuipWeight | FloatWeight,
    bias: torch.Tensor | None = None,
    backend: Requested = "reference",
) -> QuantLinear | CodebookLinear | VectorLinear | IncoherentLinear | FloatLinear:
    if isinstance(weight, FloatWeight):
        return FloatLinear(weight, bias, backend)
    if isinstance(weight, QuipWeight):
        return IncoherentLinear(weight, bias, backend)
    if isinstance(weight, VectorWeight):
        return VectorLinear(weight, bias, backend)
    if isinstance(weight, CodebookWeight):
        return CodebookLinear(weight, bias, backend)
    return QuantLinear(weight, bias, backend)
