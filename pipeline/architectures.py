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

LLAMA_SMOOTH = (
    ("input_layernorm", "self_attn.q_proj"),
    ("self_attn.v_proj", "self_attn.o_proj"),  # when v's outputs are o's inputs one to one (no GQA)
    ("post_attention_layernorm", "mlp.gate_proj"),
    ("mlp.up_proj", "mlp.down_proj"),  # down reads act(gate) * up: linear in up's rows
)
SCORES = ("self_attn.q_proj", "self_attn.k_proj")


def llama_like(module: str, prefix: str) -> BlockLayout:
    """The Llama block shape (attention q/k/v/o, gated MLP) under another family's names."""
    return BlockLayout(
        modeling_module=f"transformers.models.{module}.modeling_{module}",
        layer_class=f"{prefix}DecoderLayer",
        rotary_class=f"{prefix}RotaryEmbedding",
        norm_class=f"{prefix}RMSNorm",
        groups=LLAMA_GROUPS,
        smooth=LLAMA_SMOOTH,
        scores=SCORES,
    )


ARCHITECTURES: dict[str, BlockLayout] = {
    "llama": llama_like("llama", "Llama"),
    "mistral": llama_like("mistral", "Mistral"),
    "qwen2": llama_like("qwen2", "Qwen2"),
}


def gated_mlp(prefix: str, names: tuple[str, str, str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """A gated MLP's groups: (gate, up) read the MLP's input, down reads its own."""
    gate, up, down = (prefix + n for n in names)
    return (gate, up), (down,)


def moe_like(module: str, prefix: str, moe: str, experts: int, names: tuple[str, ...], shared: bool) -> BlockLayout:
    """Llama's attention, then (with `shared`) a shared expert that reads every token and
    `experts` routed gated MLPs under `{moe}.experts.N.`, each expert's gate/up sharing the
    Hessian of the tokens routed to it; the router and a shared expert's gate stay in full
    precision."""
    groups = gated_mlp(f"{moe}.shared_expert.", ("gate_proj", "up_proj", "down_proj")) if shared else ()
    for e in range(experts):
        groups += gated_mlp(f"{moe}.experts.{e}.", names)
    return BlockLayout(
        modeling_module=f"transformers.models.{module}.modeling_{module}",
        layer_class=f"{prefix}DecoderLayer",
        rotary_class=f"{prefix}RotaryEmbedding",
        norm_class=f"{prefix}RMSNorm",
        groups=(*LLAMA_GROUPS[:2], *groups),
        moe=moe,
        smooth=LLAMA_SMOOTH[:2],  # the MoE's norm also feeds the router: its scale has nowhere to go
        scores=SCORES,
    )


def mixtral(experts: int) -> BlockLayout:
    return moe_like("mixtral", "Mixtral", "block_sparse_moe", experts, ("w1", "w3", "w2"), shared=False)


def qwen2_moe(experts: int) -> BlockLayout:
    """Qwen2-MoE's block, DeepSeekMoE's shape: fine-grained routed experts and a shared one."""
    return moe_like("qwen2_moe", "Qwen2Moe", "mlp", experts, ("gate_proj", "up_proj", "down_proj"), shared=True)


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
