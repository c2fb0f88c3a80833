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

ARCHITECTURES: dict[str, BlockLayout] = {
    "llama": BlockLayout(
        modeling_module="transformers.models.llama.modeling_llama",
        layer_class="LlamaDecoderLayer",
        rotary_class="LlamaRotaryEmbedding",
        norm_class="LlamaRMSNorm",
        groups=LLAMA_GROUPS,
    ),
    "mistral": BlockLayout(
        modeling_module="transformers.models.mistral.modeling_mistral",
        layer_class="MistralDecoderLayer",
        rotary_class="MistralRotaryEmbedding",
        norm_class="MistralRMSNorm",
        groups=LLAMA_GROUPS,
    ),
    "qwen2": BlockLayout(
        modeling_module="transformers.models.qwen2.modeling_qwen2",
        layer_class="Qwen2DecoderLayer",
        rotary_class="Qwen2RotaryEmbedding",
        norm_class="Qwen2RMSNorm",
        groups=LLAMA_GROUPS,
    ),
}


def layout_for(config: dict) -> BlockLayout:
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise LaminaError(f"unsupported architecture {model_type!r} (supported: {', '.join(sorted(ARCHITECTURES))})")
    return ARCHITECTURES[model_type]
