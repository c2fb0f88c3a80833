"""The float and W8A8 formats: FP8 (E4M3) weights, NVFP4 (E2M1 in groups of 16) weights and
int8 weights, each with optional quantized activations, as compressed-tensors and vLLM
hold them (their compressed-tensors layouts: algorithms/float_formats.py).

Weights, by kind (fp8, int8: W = weight * weight_scale):
- fp8:   `weight` float8_e4m3fn [out, in], `weight_scale` float32 [out, 1] (channel) or [1]
         (tensor); scale = max|W| / 448, the largest E4M3 value.
- int8:  `weight` int8 [out, in], `weight_scale` float32 [out, 1] or [1]; scale = max|W| / 127
         (symmetric, so the extremes land on +-127 and nothing is clipped).
- nvfp4: `weight_packed` uint8 [out, in / 2], two 4-bit E2M1 codes a byte, the even column in
         the low nibble; a code is sign << 3 | index into E2M1 = (0, .5, 1, 1.5, 2, 3, 4, 6).
         `weight_global_scale` float32 [1] = 448 * 6 / max|W| (a multiplier, as
         compressed-tensors stores it: it divides the group scales), `weight_scale`
         float8_e4m3fn [out, in / 16] = fp8(global * max|W_group| / 6), and
         W = E2M1[code] * weight_scale / weight_global_scale.
         (compressed-tensors' calculate_qparams / generate_gparam, NVIDIA's NVFP4.)

Activations are quantized before the matmul (algorithms/float_activations.py) by the
scheme's ActivationScheme. Rounding: fp8 by the cast to float8_e4m3fn (nearest, ties to even)
after clamping to +-448; int8 by round-half-to-even and clamping to [-128, 127]; E2M1 to the
nearest value, ties to the even index (compressed-tensors' cast_to_fp4). The sign of a value
that rounds to 0 is kept (code 8 for a negative one), as compressed-tensors packs it.

No I/O, no Ray; torch only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from algorithms.packing import unpack
from algorithms.types import QuantizedWeight

FORMAT = "float"  # lamina's quantization_config "format" of these schemes
SUFFIXES = ("weight", "weight_packed", "weight_scale", "weight_global_scale", "input_scale", "input_global_scale")
WEIGHT_KINDS = ("fp8", "nvfp4", "int8")
STRATEGIES = ("tensor", "channel", "group")
ACT_STRATEGIES = ("token", "tensor", "group")
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
FP4_MAX = 6.0
INT8_MAX = 127.0
QMAX = {"fp8": FP8_MAX, "int8": INT8_MAX, "nvfp4": FP4_MAX}
NVFP4_GROUP = 16
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # the magnitude of each code's low 3 bits
E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
FP8_EPS = 0.125  # compressed-tensors' stand-in for a zero fp8 group scale (codes are 0 there anyway)


@dataclass(frozen=True)
class ActivationScheme:
    """How a linear's input is quantized: kind fp8 | int8 | nvfp4; strategy token (dynamic
    only), tensor, or group (nvfp4: 16 inputs, its global scale static); dynamic: scales
    computed per call, else stored from calibration."""

    kind: str
    strategy: str
    dynamic: bool

    def __post_init__(self) -> None:
        if self.kind not in QMAX:
            raise ValueError(f"activations.kind must be one of {', '.join(QMAX)}, got {self.kind!r}")
        if self.strategy not in ACT_STRATEGIES:
            raise ValueError(f"activations.strategy must be one of {', '.join(ACT_STRATEGIES)}, got {self.strategy!r}")
        if not isinstance(self.dynamic, bool):
            raise ValueError(f"activations.dynamic must be true or false, got {self.dynamic!r}")
        if self.kind == "nvfp4":
            if (self.strategy, self.dynamic) != ("group", False):
                raise ValueError(
                    "nvfp4 activations take strategy 'group' and dynamic false: a static global scale "
                    "from calibration, group scales computed at run time"
                )
        elif self.strategy == "group":
            raise ValueError(f"activations.strategy 'group' is for nvfp4 activations, not {self.kind}")
        if self.strategy == "token" and not self.dynamic:
            raise ValueError("activations.strategy 'token' needs dynamic true (per-token scales are computed per call)")
        if self.kind == "int8" and self.strategy == "tensor" and self.dynamic:
            raise ValueError("int8 activations per tensor must be static (vLLM runs dynamic int8 per token only)")

    @property
    def name(self) -> str:
        if self.kind == "nvfp4":
            return "nvfp4-g16"
        return f"{self.kind}-{self.strategy}-{'dynamic' if self.dynamic else 'static'}"

    def fields(self) -> dict:
        return {"kind": self.kind, "strategy": self.strategy, "dynamic": self.dynamic}


@dataclass(frozen=True)
class FloatScheme:
    """Weights of `kind` with scales per `weight_strategy` (nvfp4: 'group' of group_size 16;
    fp8, int8: 'channel' or 'tensor', group_size 0), and the activations' quantization
    (None: weight-only, which int8 cannot be: that is the uniform 8-bit format)."""

    kind: str = "fp8"
    weight_strategy: str = "channel"
    group_size: int = 0
    activations: ActivationScheme | None = None

    def __post_init__(self) -> None:
        if self.kind not in WEIGHT_KINDS:
            raise ValueError(f"kind must be one of {', '.join(WEIGHT_KINDS)}, got {self.kind!r}")
        if self.weight_strategy not in STRATEGIES:
            raise ValueError(f"weight_strategy must be one of {', '.join(STRATEGIES)}, got {self.weight_strategy!r}")
        if self.kind == "nvfp4" and (self.weight_strategy, self.group_size) != ("group", NVFP4_GROUP):
            raise ValueError("nvfp4 weights take weight_strategy 'group' and group_size 16")
        if self.kind != "nvfp4" and (self.weight_strategy == "group" or self.group_size != 0):
            raise ValueError(f"{self.kind} weights take weight_strategy 'channel' or 'tensor' and group_size 0")
        act = self.activations
        if act is not None and act.kind != self.kind:
            raise ValueError(f"activations.kind must be {self.kind!r} for {self.kind} weights, got {act.kind!r}")
        if self.kind == "int8" and act is None:
            raise ValueError("int8 weights need int8 activations (W8A8); weight-only int8 is the uniform 8-bit format")

    @property
    def name(self) -> str:
        weights = "nvfp4-g16" if self.kind == "nvfp4" else f"{self.kind}-{self.weight_strategy}"
        return weights if self.activations is None else f"{weights}+{self.activations.name}"

    @property
    def static_activations(self) -> bool:
        """Whether a stored activation scale (from calibration) is part of each linear."""
        return self.activations is not None and not self.activations.dynamic

    def fields(self) -> dict:
        """The scheme as lamina's quantization_config names it."""
        return {
            "format": FORMAT,
            "kind": self.kind,
            "weight_strategy": self.weight_strategy,
            "group_size": self.group_size,
            "activations": None if self.activations is None else self.activations.fields(),
        }

    @classmethod
    def from_fields(cls, qc: dict) -> FloatScheme:
        """The scheme from those fields; ValueError names a missing or bad one."""
        if qc.get("format", FORMAT) != FORMAT:
            raise ValueError(f"format must be {FORMAT!r} for a float scheme, got {qc['format']!r}")
        act = _field(qc, "activations", (dict, type(None)))
        if act is not None:
            act = ActivationScheme(
                kind=_field(act, "kind", str, "activations."),
                strategy=_field(act, "strategy", str, "activations."),
                dynamic=_field(act, "dynamic", bool, "activations."),
            )
        return cls(
            kind=_field(qc, "kind", str),
            weight_strategy=_field(qc, "weight_strategy", str),
            group_size=_field(qc, "group_size", int),
            activations=act,
        )

    def misfit(self, out_features: int, in_features: int) -> str | None:
        """Why a linear of this shape cannot be stored (None: it can)."""
        if self.kind == "nvfp4" and in_features % NVFP4_GROUP:
            return f"input size {in_features} is not a multiple of {NVFP4_GROUP} (nvfp4 groups)"
        return None

    def bits_per_weight(self, out_features: int, in_features: int) -> float:
        """Codes and scales (and the per-tensor scales) over the weight."""
        n = out_features * in_features
        if self.kind == "nvfp4":
            return 4 + 8 / NVFP4_GROUP + 32 / n
        return 8 + 32 * (out_features if self.weight_strategy == "channel" else 1) / n


def _field(qc: dict, name: str, kind: type | tuple[type, ...], prefix: str = "") -> object:
    field = f"'{prefix}{name}'"
    if name not in qc:
        raise ValueError(f"quantization_config field {field} is missing")
    value = qc[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"quantization_config field {field} has the wrong type: {value!r}")
    return value


PRESETS = {  # llm-compressor's preset schemes of the same names
    "fp8": FloatScheme("fp8", "tensor", activations=ActivationScheme("fp8", "tensor", dynamic=False)),
    "fp8-dynamic": FloatScheme("fp8", "channel", activations=ActivationScheme("fp8", "token", dynamic=True)),
    "w8a8": FloatScheme("int8", "channel", activations=ActivationScheme("int8", "token", dynamic=True)),
    "nvfp4": FloatScheme("nvfp4", "group", NVFP4_GROUP, ActivationScheme("nvfp4", "group", dynamic=False)),
    "nvfp4a16": FloatScheme("nvfp4", "group", NVFP4_GROUP),
}


@dataclass(frozen=True)
class FloatWeight:
    """A linear's stored tensors in one of the float schemes (see the module docstring):
    weight (fp8 | int8 [out, in]; nvfp4: uint8 [out, in / 2]), weight_scale, and where the
    scheme has them weight_global_scale (nvfp4), input_scale (static fp8/int8 activations),
    input_global_scale (nvfp4 activations). The activation scales come from calibration,
    after the weight is quantized (with_activation_scale)."""

    scheme: FloatScheme
    weight: torch.Tensor
    weight_scale: torch.Tensor
    weight_global_scale: torch.Tensor | None = None
    input_scale: torch.Tensor | None = None
    input_global_scale: torch.Tensor | None = None

    def __post_init__(self) -> None:
        s = self.scheme
        want = {"fp8": torch.float8_e4m3fn, "int8": torch.int8, "nvfp4": torch.uint8}[s.kind]
        _check("weight_packed" if s.kind == "nvfp4" else "weight", self.weight, want, None)
        out = self.out_features
        if s.kind == "nvfp4":
            _check("weight_scale", self.weight_scale, torch.float8_e4m3fn, (out, self.in_features // NVFP4_GROUP))
            _check("weight_global_scale", self.weight_global_scale, torch.float32, (1,))
        else:
            shape = (out, 1) if s.weight_strategy == "channel" else (1,)
            _check("weight_scale", self.weight_scale, torch.float32, shape)
        for name in ("input_scale", "input_global_scale"):
            if getattr(self, name) is not None:
                _check(name, getattr(self, name), torch.float32, (1,))
        nvfp4 = s.kind == "nvfp4"
        if (self.input_global_scale is not None and not nvfp4) or (self.input_scale is not None and nvfp4):
            raise ValueError(f"{s.name}: nvfp4 activations store input_global_scale, fp8/int8 ones input_scale")
        if self.activation_scale is not None and not s.static_activations:
            raise ValueError(f"{s.name}: a stored activation scale, but the scheme's activations are not static")

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1] * (2 if self.scheme.kind == "nvfp4" else 1)

    @property
    def activation_scale(self) -> torch.Tensor | None:
        """The stored activation scale: input_global_scale (nvfp4) or input_scale."""
        return self.input_global_scale if self.scheme.kind == "nvfp4" else self.input_scale

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by suffix: compressed-tensors' names, which the native artifact uses too."""
        stored = {
            "weight_packed" if self.scheme.kind == "nvfp4" else "weight": self.weight,
            "weight_scale": self.weight_scale,
            "weight_global_scale": self.weight_global_scale,
            "input_scale": self.input_scale,
            "input_global_scale": self.input_global_scale,
        }
        return {k: v for k, v in stored.items() if v is not None}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], scheme: FloatScheme) -> FloatWeight:
        """From tensors(); float8 tensors may come as their uint8 bit patterns (numpy has no
        float8), which are viewed back."""
        nvfp4 = scheme.kind == "nvfp4"
        fp8 = {"weight_scale"} if nvfp4 else {"weight"} if scheme.kind == "fp8" else set()
        t = {k: v.view(torch.float8_e4m3fn) if k in fp8 and v.dtype == torch.uint8 else v for k, v in tensors.items()}
        return cls(
            scheme=scheme,
            weight=t.get("weight_packed" if nvfp4 else "weight"),
            weight_scale=t.get("weight_scale"),
            weight_global_scale=t.get("weight_global_scale"),
            input_scale=t.get("input_scale"),
            input_global_scale=t.get("input_global_scale"),
        )


def _check(name: str, t: torch.Tensor | None, dtype: torch.dtype, shape: tuple[int, ...] | None) -> None:
    if t is None:
        raise ValueError(f"{name} is missing")
    if t.dtype != dtype or (t.dim() != 2 if shape is None else tuple(t.shape) != shape):
        want = f"{dtype} {list(shape)}" if shape is not None else f"a 2-D {dtype} tensor"
        raise ValueError(f"{name}: expected {want}, got {t.dtype} {list(t.shape)}")


# -- E4M3 and E2M1 -------------------------------------------------------------------------


def to_fp8(x: torch.Tensor) -> torch.Tensor:
    """x (already divided by its scale) as float8_e4m3fn: clamped to +-448, then cast (nearest, ties to even)."""
    return x.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """x (already divided by its scale) -> uint8 codes in [0, 16): the nearest E2M1 value,
    ties to the even index (0.25 -> 0, 0.75 -> 1, 2.5 -> 2, 5 -> 4), magnitudes above 6
    saturating to 6; bit 3 the sign of x."""
    a = x.abs().float()
    # the midpoint after an odd index, lowered by one ulp, sends its ties up to the even index
    mids = torch.tensor(E2M1_MIDPOINTS, device=x.device)
    mids[1::2] = torch.nextafter(mids[1::2], torch.zeros_like(mids[1::2]))
    index = torch.bucketize(a, mids, out_int32=True).to(torch.uint8)
    return index | (torch.signbit(x).to(torch.uint8) << 3)


def e2m1_values(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes -> their float32 values (code 8 is -0.0)."""
    table = torch.tensor([*E2M1, *(-v for v in E2M1)], device=codes.device)  # [16]
    return table[codes.long()]


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """codes [rows, n] (n even) -> uint8 [rows, n / 2]: column 2j in the low nibble, 2j + 1 in the high."""
    pairs = codes.to(torch.uint8).reshape(codes.shape[0], -1, 2)  # [rows, n/2, 2]
    return (pairs[..., 0] | (pairs[..., 1] << 4)).contiguous()


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [rows, n / 2] -> codes uint8 [rows, n]."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


# -- weights -------------------------------------------------------------------------------


def _absmax(W: torch.Tensor, strategy: str) -> torch.Tensor:
    """max |W| per row [out, 1] ('channel') or of the whole weight [1] ('tensor')."""
    return W.abs().amax(dim=1, keepdim=True) if strategy == "channel" else W.abs().amax().reshape(1)


def _nonzero(scale: torch.Tensor) -> torch.Tensor:
    """A zero scale (an all-zero row) replaced by float32's eps, as compressed-tensors does: its codes are 0."""
    return torch.where(scale == 0, torch.finfo(torch.float32).eps, scale)


def quantize_fp8(W: torch.Tensor, scheme: FloatScheme) -> FloatWeight:
    """W [out, in] -> E4M3 values [out, in] with scale max|W| / 448 per row or per tensor."""
    W = W.float()
    scale = _nonzero(_absmax(W, scheme.weight_strategy) / FP8_MAX)  # [out, 1] | [1]
    return FloatWeight(scheme, to_fp8(W / scale), scale)


def quantize_int8(W: torch.Tensor, scheme: FloatScheme) -> FloatWeight:
    """W [out, in] -> int8 [out, in] with scale max|W| / 127 per row or per tensor."""
    W = W.float()
    scale = _nonzero(_absmax(W, scheme.weight_strategy) / INT8_MAX)  # [out, 1] | [1]
    return FloatWeight(scheme, torch.round(W / scale).clamp(-128, 127).to(torch.int8), scale)


def global_scale(absmax: torch.Tensor | float) -> torch.Tensor:
    """NVFP4's global scale float32 [1] = 448 * 6 / absmax (1 where that is not finite),
    as compressed-tensors' generate_gparam computes it: it maps the largest group scale to
    the top of the fp8 range."""
    a = torch.as_tensor(absmax, dtype=torch.float32).clamp(min=torch.finfo(torch.float32).tiny)
    return torch.nan_to_num(FP8_MAX * FP4_MAX / a, nan=1.0, posinf=1.0, neginf=1.0).reshape(1)


def shared_global_scale(Ws: list[torch.Tensor]) -> torch.Tensor:
    """One NVFP4 global scale [1] for linears that vLLM fuses (q/k/v, gate/up): it takes a
    single weight_global_scale per fused layer, so they must be quantized with the same one
    (pass it to quantize_nvfp4, or to rtn_float as `prepared`)."""
    return global_scale(torch.stack([w.float().abs().amax() for w in Ws]).amax())


def group_scales(absmax: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """fp8 group scales from each group's max |x| [..., groups] and the global scale g [1]:
    fp8(g * absmax / 6), a zero one replaced by 0.125 (compressed-tensors' calculate_qparams)."""
    s = (g * (absmax.float() / FP4_MAX)).clamp(max=FP8_MAX).to(torch.float8_e4m3fn)
    return torch.where(s.float() == 0, FP8_EPS, s.float()).to(torch.float8_e4m3fn)


def nvfp4_codes(x: torch.Tensor, scale: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """x [..., groups, 16], fp8 group scales [..., groups], global g [1] -> codes [..., groups, 16]."""
    return e2m1_codes(x.float() / (scale.float() / g)[..., None])


def quantize_nvfp4(W: torch.Tensor, scheme: FloatScheme, g: torch.Tensor | None = None) -> FloatWeight:
    """W [out, in] -> packed E2M1 codes with fp8 scales per 16 inputs under the global scale
    g (default: the weight's own, global_scale(max|W|))."""
    out, n = W.shape
    if n % NVFP4_GROUP:
        raise ValueError(f"nvfp4: input size {n} is not a multiple of {NVFP4_GROUP}")
    Wg = W.float().reshape(out, n // NVFP4_GROUP, NVFP4_GROUP)  # [out, groups, 16]
    g = global_scale(Wg.abs().amax()) if g is None else g.float().reshape(1)
    scale = group_scales(Wg.abs().amax(dim=-1), g)  # [out, groups] fp8
    codes = nvfp4_codes(Wg, scale, g).reshape(out, n)  # [out, in]
    return FloatWeight(scheme, pack_e2m1(codes), scale, weight_global_scale=g)


def rtn_float(
    W: torch.Tensor, H: torch.Tensor | None, scheme: FloatScheme, options: object = None, prepared: object = None
) -> FloatWeight:
    """Round-to-nearest in `scheme` (the QUANTIZERS signature; H and options unused).
    prepared: for nvfp4, a shared global scale float32 [1] (shared_global_scale) of the
    linears vLLM fuses; None: the weight's own."""
    if scheme.kind == "fp8":
        return quantize_fp8(W, scheme)
    if scheme.kind == "int8":
        return quantize_int8(W, scheme)
    return quantize_nvfp4(W, scheme, prepared if isinstance(prepared, torch.Tensor) else None)


def from_uniform(qw: QuantizedWeight, scheme: FloatScheme) -> FloatWeight:
    """An 8-bit per-channel symmetric weight of the uniform grid (algorithms.types.QuantizedWeight,
    e.g. GPTQ's) as the int8 weight of `scheme`, exactly: the symmetric grid's zero is 128, so
    int8 = code - 128 and weight_scale = its float16 scale in float32."""
    if scheme.kind != "int8" or scheme.weight_strategy != "channel":
        raise ValueError(f"a uniform 8-bit weight converts to int8 per-channel schemes, not {scheme.name}")
    if qw.bits != 8 or qw.group_size != qw.in_features or qw.g_idx is not None:
        raise ValueError(f"needs 8 bits, one group per row and no g_idx; got {qw.bits} bits, group {qw.group_size}")
    if bool((qw.zeros != 128).any()):
        raise ValueError("needs the symmetric grid (every zero point 128)")
    codes = unpack(qw.qweight, 8).to(torch.int16) - 128  # [out, in] in [-128, 127]
    return FloatWeight(scheme, codes.to(torch.int8), qw.scales.float().reshape(-1, 1).contiguous())


def dequantize(fw: FloatWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight [out, in], computed in float32 (as compressed-tensors' dequantize does),
    then cast to dtype."""
    if fw.scheme.kind != "nvfp4":
        return (fw.weight.float() * fw.weight_scale).to(dtype)
    values = e2m1_values(unpack_e2m1(fw.weight))  # [out, in]
    out, n = values.shape
    scale = fw.weight_scale.float() / fw.weight_global_scale  # [out, groups]
    W = values.reshape(out, n // NVFP4_GROUP, NVFP4_GROUP) * scale[..., None]  # [out, groups, 16]
    return W.reshape(out, n).to(dtype)
