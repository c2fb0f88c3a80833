"""Mixture-of-experts blocks with every expert a plain linear.

transformers 5 holds Mixtral's experts fused (`mlp.experts.gate_up_proj` [E, 2I, H],
`mlp.experts.down_proj` [E, H, I]) and converts the per-expert tensors of the checkpoint
on load. lamina reads blocks tensor by tensor under their stored names
(`block_sparse_moe.experts.N.w1/w3/w2`, `block_sparse_moe.gate`), so it replaces the MoE
block by `SparseMoe`: the same routing and arithmetic, with each expert's w1/w3/w2 an
nn.Linear that calibration hooks, quantization replaces and eval runs on its kernel like
any other linear.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN


class Expert(nn.Module):
    """One gated MLP: w2(act(w1 x) * w3 x)."""

    def __init__(self, hidden: int, intermediate: int, act: str):
        super().__init__()
        self.w1 = nn.Linear(hidden, intermediate, bias=False)
        self.w3 = nn.Linear(hidden, intermediate, bias=False)
        self.w2 = nn.Linear(intermediate, hidden, bias=False)
        self.act = ACT2FN[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act(self.w1(x)) * self.w3(x))


class SparseMoe(nn.Module):
    """Mixtral's sparse MoE: softmax over the router's logits, the top k experts per token,
    their probabilities renormalised to sum to 1, each token's output the weighted sum of
    its experts' outputs.

    `route_all` (calibration only) names experts that are run on every token for their
    Hessians' sake; the block's output still takes each of them only for the tokens the
    router sent it. `routed` counts the tokens each expert was sent by the last forward."""

    def __init__(self, hidden: int, intermediate: int, experts: int, top_k: int, act: str):
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(hidden, experts, bias=False)
        self.experts = nn.ModuleList(Expert(hidden, intermediate, act) for _ in range(experts))
        self.route_all: frozenset[int] = frozenset()
        self.routed = torch.zeros(experts, dtype=torch.int64, device="cpu")

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # [tokens, hidden]
        probs = torch.softmax(self.gate(x).float(), dim=-1)  # [tokens, experts]
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)  # [tokens, k]
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
        return out.reshape(shape)


def install_moe(layer: nn.Module, config: object, name: str) -> SparseMoe:
    """Replace the decoder layer's MoE block (built on the meta device) by a SparseMoe
    registered as `name` (the checkpoint's prefix), which the layer's forward still
    reaches as `layer.mlp`: its state dict then has the checkpoint's names."""
    moe = SparseMoe(
        config.hidden_size,
        config.intermediate_size,
        config.num_local_experts,
        config.num_experts_per_tok,
        config.hidden_act,
    )
    del layer.mlp
    setattr(layer, name, moe)
    object.__setattr__(layer, "mlp", moe)  # a plain attribute: the forward finds it, state_dict does not
    return moe
