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


def mixtral(experts: int) -> BlockLayout:
    """Mixtral's block: Llama's attention, then a router (kept in full precision) over
    `experts` gated MLPs, each expert's w1/w3 sharing the Hessian of the tokens routed to it."""
    moe = "block_sparse_moe"
    experts_groups = []
    for e in range(experts):
        p = f"{moe}.experts.{e}."
        experts_groups += [(p + "w1", p + "w3"), (p + "w2",)]
    return BlockLayout(
        modeling_module="transformers.models.mixtral.modeling_mixtral",
        layer_class="MixtralDecoderLayer",
        rotary_class="MixtralRotaryEmbedding",
        norm_class="MixtralRMSNorm",
        groups=(*LLAMA_GROUPS[:2], *experts_groups),
        moe=moe,
    )


def qwen2_moe(experts: int) -> BlockLayout:
    """Qwen2-MoE's block (DeepSeekMoE's shape): Qwen2's attention, then a shared expert that
    reads every token (its gate/up sharing the MoE input's Hessian) and `experts` routed
    ones; the router and the shared expert's sigmoid gate stay in full precision."""
    shared = "mlp.shared_expert."
    routed = []
    for e in range(experts):
        p = f"mlp.experts.{e}."
        routed += [(p + "gate_proj", p + "up_proj"), (p + "down_proj",)]
    return BlockLayout(
        modeling_module="transformers.models.qwen2_moe.modeling_qwen2_moe",
        layer_class="Qwen2MoeDecoderLayer",
        rotary_class="Qwen2MoeRotaryEmbedding",
        norm_class="Qwen2MoeRMSNorm",
        groups=(*LLAMA_GROUPS[:2], (shared + "gate_proj", shared + "up_proj"), (shared + "down_proj",), *routed),
        moe="mlp",
    )


def count(config: dict, key: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or value < 1:
        raise LaminaError(f"{config.get('model_type')} config: {key} must be a positive integer, not {value!r}")
    return value


def layout_for(config: dict) -> BlockLayout:
    model_type = config.get("model_type")
    if model_type == "qwen2_moe":
        if config.get("decoder_sparse_step", 1) != 1 or config.get("mlp_only_layers"):
            raise LaminaError(
                "qwen2_moe config: blocks with dense MLPs (decoder_sparse_step, mlp_only_layers) are not supported"
            )
        return qwen2_moe(count(config, "num_experts"))
    if model_type == "mixtral":
        return mixtral(count(config, "num_local_experts"))
    if model_type not in ARCHITECTURES:
        supported = ", ".join(sorted([*ARCHITECTURES, "mixtral", "qwen2_moe"]))
        raise LaminaError(f"unsupported architecture {model_type!r} (supported: {supported})")
    return ARCHITECTURES[model_type]
