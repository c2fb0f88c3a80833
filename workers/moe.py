"""Mixture-of-experts blocks with every expert a plain linear.

transformers 5 holds the experts of Mixtral and Qwen2-MoE fused (`mlp.experts.gate_up_proj`
[E, 2I, H], `mlp.experts.down_proj` [E, H, I]) and converts the per-expert tensors of the
checkpoint on load. lamina reads blocks tensor by tensor under their stored names
(Mixtral's `block_sparse_moe.experts.N.w1/w3/w2`, Qwen2-MoE's
`mlp.experts.N.gate_proj/up_proj/down_proj`), so it replaces the MoE block by `SparseMoe`:
the same routing and arithmetic, with each expert's linears nn.Linear modules that
calibration hooks, quantization replaces and eval runs on its kernel like any other.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN

MIXTRAL = ("w1", "w3", "w2")  # an expert's (gate, up, down) linears, by family
QWEN = ("gate_proj", "up_proj", "down_proj")


class Expert(nn.Module):
    """One gated MLP, down(act(gate x) * up x), its linears named as the checkpoint names them."""

    def __init__(self, hidden: int, intermediate: int, act: str, names: tuple[str, str, str]):
        super().__init__()
        self.names = names
        gate, up, down = names
        setattr(self, gate, nn.Linear(hidden, intermediate, bias=False))
        setattr(self, up, nn.Linear(hidden, intermediate, bias=False))
        setattr(self, down, nn.Linear(intermediate, hidden, bias=False))
        self.act = ACT2FN[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(self.act(gate(x)) * up(x))


class SparseMoe(nn.Module):
    """A sparse MoE: softmax over the router's logits, the top k experts per token (their
    probabilities renormalised to sum to 1 when `normalise`, as Mixtral does), each token's
    output the weighted sum of its experts' outputs; with a shared expert (Qwen2-MoE, as
    DeepSeekMoE), plus its output on every token times sigmoid(shared_expert_gate x).

    `route_all` (calibration only) names experts that are run on every token for their
    Hessians' sake; the block's output still takes each of them only for the tokens the
    router sent it. `routed` counts the tokens each expert was sent by the last forward."""

    def __init__(
        self,
        hidden: int,
        intermediate: int,
        experts: int,
        top_k: int,
        act: str,
        *,
        names: tuple[str, str, str] = MIXTRAL,
        normalise: bool = True,
        shared: int = 0,
    ):
        super().__init__()
        self.top_k, self.normalise = top_k, normalise
        self.gate = nn.Linear(hidden, experts, bias=False)
        self.experts = nn.ModuleList(Expert(hidden, intermediate, act, names) for _ in range(experts))
        if shared:
            self.shared_expert = Expert(hidden, shared, act, QWEN)
            self.shared_expert_gate = nn.Linear(hidden, 1, bias=False)
        self.shared = bool(shared)
        self.route_all: frozenset[int] = frozenset()
        self.routed = torch.zeros(experts, dtype=torch.int64, device="cpu")

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # [tokens, hidden]
        probs = torch.softmax(self.gate(x).float(), dim=-1)  # [tokens, experts]
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)  # [tokens, k]
        if self.normalise:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(x)
        self.routed = torch.bincount(chosen.reshape(-1), minlength=len(self.experts))
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)  # [n], [n]
            if e in self.route_all:
                y = expert(x)[token]  # every token through the expert; only the routed ones kept
            elif len(token):
                y = expert(x[token])
            else:
                continue
            out.index_add_(0, token, (y * weights[token, slot, None]).to(out.dtype))
        if self.shared:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out.reshape(shape)


def install_moe(layer: nn.Module, config: object, name: str) -> SparseMoe:
    """Replace the decoder layer's MoE block (built on the meta device) by a SparseMoe
    registered as `name` (the checkpoint's prefix), which the layer's forward still
    reaches as `layer.mlp`: its state dict then has the checkpoint's names."""
    if config.model_type == "qwen2_moe":
        moe = SparseMoe(
            config.hidden_size,
            config.moe_intermediate_size,
            config.num_experts,
            config.num_experts_per_tok,
            config.hidden_act,
            names=QWEN,
            normalise=config.norm_topk_prob,
            shared=config.shared_expert_intermediate_size,
        )
    else:
        moe = SparseMoe(
            config.hidden_size,
            config.intermediate_size,
            config.num_local_experts,
            config.num_experts_per_tok,
            config.hidden_act,
        )
    del layer.mlp
    setattr(layer, name, moe)
    if name != "mlp":  # a plain attribute: the forward finds it, state_dict does not
        object.__setattr__(layer, "mlp", moe)
    return moe
