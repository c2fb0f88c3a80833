"""Architectures are data: each family's block layout, keyed by config.json's model_type."""

from __future__ import annotations

from pipeline.errors import LaminaError
from workers.layout import BlockLayout

LLAMA_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


def llama_like(module: str, prefix: str) -> BlockLayout:
    """The Llama block shape (attention q/k/v/o, gated MLP) under another family's names."""
    return BlockLayout(
        modeling_module=f"transformers.models.{module}.modeling_{module}",
        layer_class=f"{prefix}DecoderLayer",
        rotary_class=f"{prefix}RotaryEmbedding",
        norm_class=f"{prefix}RMSNorm",
        groups=LLAMA_GROUPS,
    )


ARCHITECTURES: dict[str, BlockLayout] = {
    "llama": llama_like("llama", "Llama"),
    "mistral": llama_like("mistral", "Mistral"),
    "qwen2": llama_like("qwen2", "Qwen2"),
}


def layout_for(config: dict) -> BlockLayout:
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise LaminaError(f"unsupported architecture {model_type!r} (supported: {', '.join(sorted(ARCHITECTURES))})")
    return ARCHITECTURES[model_type]
