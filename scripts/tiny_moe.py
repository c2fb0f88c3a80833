"""A tiny Mixtral or Qwen2-MoE (random weights, transformers' own MixtralForCausalLM or
Qwen2MoeForCausalLM) with the fixture model's tokenizer, saved the way transformers saves
it (per-expert tensors): what the MoE tests quantize end to end. One expert is made rare:
its router row is zero while the others' are scaled up, so it is chosen only when (top-1)
every other expert's logit is negative, or (top-2) all but one are, and a small
calibration set leaves it under-calibrated.

    python scripts/tiny_moe.py FIXTURE_MODEL DEST [--family qwen2_moe]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

RARE = 3  # the expert the router seldom picks


def tiny_moe(
    tokenizer_from: Path, dest: Path, *, family: str = "mixtral", experts: int = 8, layers: int = 2, seed: int = 0
) -> Path:
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

    common = {
        "vocab_size": 49152,
        "hidden_size": 64,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
    }
    torch.manual_seed(seed)
    if family == "mixtral":
        config = MixtralConfig(**common, intermediate_size=128, num_local_experts=experts, num_experts_per_tok=1)
        model = MixtralForCausalLM(config).float().eval()
    elif family == "qwen2_moe":
        config = Qwen2MoeConfig(
            **common,
            intermediate_size=128,
            moe_intermediate_size=64,
            shared_expert_intermediate_size=128,
            num_experts=experts,
            num_experts_per_tok=2,
            norm_topk_prob=False,
        )
        model = Qwen2MoeForCausalLM(config).float().eval()
    else:
        raise ValueError(f"no tiny MoE of family {family!r} (mixtral, qwen2_moe)")
    with torch.no_grad():
        for layer in model.model.layers:
            router = layer.mlp.gate.weight  # [experts, hidden]
            router.mul_(8.0)
            router[RARE].zero_()
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    for f in tokenizer_from.iterdir():
        if f.is_file() and f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy(f, dest / f.name)
    return dest


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("tokenizer_from", type=Path)
    p.add_argument("dest", type=Path)
    p.add_argument("--family", default="mixtral", choices=["mixtral", "qwen2_moe"])
    args = p.parse_args()
    print(tiny_moe(args.tokenizer_from, args.dest, family=args.family))


if __name__ == "__main__":
    main()
