"""How a decoder architecture is laid out, as data: where its blocks live, which of their
linears share an input (and so a Hessian), in quantization order."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class BlockLayout:
    modeling_module: str  # a module under transformers.models
    layer_class: str  # the decoder block
    rotary_class: str  # rotary position embedding, run once per sequence length
    norm_class: str  # the final norm before the LM head
    groups: tuple[tuple[str, ...], ...]  # linears sharing an input, in quantization order
    block_prefix: str = "model.layers"
    embed: str = "model.embed_tokens.weight"
    final_norm: str = "model.norm.weight"
    lm_head: str = "lm_head.weight"
    moe: str = ""  # a MoE block's prefix in the checkpoint (its experts are `{moe}.experts.N.*`); "" if dense
    # (the op before a group, the group it alone feeds): where AWQ and SmoothQuant fold the scale of
    # the group's input channels, a norm (its weight) or a linear (its output rows)
    smooth: tuple[tuple[str, str], ...] = ()
    scores: tuple[str, ...] = ()  # the linears whose outputs make attention scores (AWQ clips no range of theirs)

    def is_expert(self, group: str) -> bool:
        """Whether the group's linears are one expert's (they read only the tokens routed to it)."""
        return bool(self.moe) and group.startswith(f"{self.moe}.experts.")

    def expert_of(self, group: str) -> int:
        return int(group.removeprefix(f"{self.moe}.experts.").split(".")[0])

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(name for group in self.groups for name in group)

    def members(self, group: str) -> tuple[str, ...]:
        """The linears of the group its first linear names."""
        return next(g for g in self.groups if g[0] == group)

    def group_of(self, linear: str) -> str:
        """The group's first linear names the group (its Hessian is shared)."""
        return next(group[0] for group in self.groups if linear in group)

    def block(self, index: int) -> str:
        return f"{self.block_prefix}.{index}."

    def module(self) -> ModuleType:
        if not self.modeling_module.startswith("transformers.models."):
            raise ValueError(f"refusing to import modeling code outside transformers: {self.modeling_module}")
        return importlib.import_module(self.modeling_module)
