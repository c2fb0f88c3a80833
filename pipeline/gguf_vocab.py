"""The tokenizer and hyperparameters of a GGUF file, as llama.cpp's convert_hf_to_gguf.py writes
them for a Llama-family model with a byte-level BPE ("gpt2") tokenizer.

The vocabulary comes from the checkpoint's `tokenizer.json` (no tokenizer code runs): every id
below `vocab_size` gets a token and a type (an added token marked special, or spelled like
`<|...|>`, is CONTROL, another added token USER_DEFINED, an id with no token an UNUSED
`[PADn]`); merges, special token ids, whether BOS is added, and the chat template come from
the `gguf` package's `SpecialVocab`. llama.cpp picks its pre-tokenizer by name, which
convert_hf_to_gguf.py finds by hashing the tokens of a test text; here it is read off the
`pre_tokenizer` of tokenizer.json, for the splits lamina knows (others are refused).
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import gguf
import torch

from pipeline.errors import LaminaError
from storage.checkpoint import Checkpoint

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPLITS = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}  # tokenizer.json Split regex -> llama.cpp name
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class Vocab:
    tokens: list[str]
    types: list[int]  # gguf.TokenType per token
    pre: str  # llama.cpp's pre-tokenizer name
    add_space_prefix: bool
    special: gguf.SpecialVocab  # merges, special token ids, add_bos/eos, chat template

    def add_to(self, writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        writer.add_add_space_prefix(self.add_space_prefix)
        self.special.add_to_gguf(writer, quiet=True)
        if "bos" not in self.special.add_special_token:  # the tokenizer adds none: llama.cpp must not either
            writer.add_add_bos_token(False)


def byte_level(spec: dict, *, regex: bool) -> bool:
    return spec.get("type") == "ByteLevel" and bool(spec.get("use_regex", True)) == regex


def pre_tokenizer_name(spec: dict | None) -> str | None:
    """llama.cpp's name for the text splitting a tokenizer.json pre_tokenizer does, or None."""
    spec = spec or {}
    if byte_level(spec, regex=True):
        return "gpt-2"  # GPT-2's own regex
    parts = (spec.get("pretokenizers") or []) if spec.get("type") == "Sequence" else []
    if len(parts) != 2:
        return None
    first, second = parts
    if first.get("type") == "Digits" and first.get("individual_digits") and byte_level(second, regex=True):
        return "smollm"  # each digit alone, then GPT-2's regex (StarCoder's and SmolLM's)
    if first.get("type") == "Split" and byte_level(second, regex=False):
        return SPLITS.get((first.get("pattern") or {}).get("Regex", ""))
    return None


def looks_special(token: str) -> bool:
    """convert_hf_to_gguf.py's does_token_look_special."""
    return token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>"))


def token_list(tokenizer: dict, vocab_size: int, uri: str) -> tuple[list[str], list[int]]:
    """Every id below vocab_size: (tokens, types), as convert_hf_to_gguf.py's get_vocab_base."""
    added = {int(a["id"]): a for a in tokenizer.get("added_tokens") or []}
    by_id = {int(i): t for t, i in tokenizer["model"]["vocab"].items()}
    by_id.update({i: a["content"] for i, a in added.items()})
    if by_id and max(by_id) >= vocab_size:
        raise LaminaError(f"{uri}: the tokenizer has token id {max(by_id)}, config.json's vocab_size is {vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added and (added[i].get("special") or looks_special(by_id[i])):
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL)
        elif i in added:
            tokens.append(by_id[i].replace("\u2581", " "))
            types.append(gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, [int(t) for t in types]


def read_tokenizer(checkpoint: Checkpoint) -> dict:
    """tokenizer.json, checked to be a byte-level BPE vocabulary llama.cpp can split."""
    location = checkpoint.location
    if not location.exists("tokenizer.json"):
        raise LaminaError(f"{checkpoint.uri}: no tokenizer.json, which a GGUF file must carry")
    tokenizer = json.loads(location.read_bytes("tokenizer.json"))
    model, decoder = tokenizer.get("model") or {}, tokenizer.get("decoder") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder.get("type") != "ByteLevel":
        raise LaminaError(
            f"{checkpoint.uri}: GGUF export writes byte-level BPE tokenizers (llama.cpp's gpt2 model); this one is "
            f"{model.get('type')} with {decoder.get('type')} decoding (sentencepiece-style vocabularies: not yet)"
        )
    if pre_tokenizer_name(tokenizer.get("pre_tokenizer")) is None:
        raise LaminaError(
            f"{checkpoint.uri}: tokenizer.json's pre_tokenizer {json.dumps(tokenizer.get('pre_tokenizer'))[:200]} is "
            "none llama.cpp knows by a name lamina can give it (GPT-2's, SmolLM's digits + GPT-2, Llama 3's, Qwen2's)"
        )
    return tokenizer


def read_vocab(checkpoint: Checkpoint, vocab_size: int) -> Vocab:
    tokenizer = read_tokenizer(checkpoint)
    tokens, types = token_list(tokenizer, vocab_size, checkpoint.uri)
    pre = tokenizer.get("pre_tokenizer") or {}
    prefix = pre if pre.get("type") == "ByteLevel" else (pre.get("pretokenizers") or [{}])[-1]
    with tempfile.TemporaryDirectory(prefix="lamina-vocab-") as folder:  # SpecialVocab reads a local folder
        for name in (*TOKENIZER_FILES, "config.json"):
            if checkpoint.location.exists(name):
                Path(folder, name).write_bytes(checkpoint.location.read_bytes(name))
        special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise LaminaError(f"{checkpoint.uri}: tokenizer.json has no BPE merges")
    return Vocab(tokens, types, pre_tokenizer_name(pre) or "", bool(prefix.get("add_prefix_space", False)), special)


def rope_parameters(config: dict) -> dict:
    """transformers 5's rope_parameters, or 4's rope_theta + rope_scaling, as one dict."""
    params = dict(config.get("rope_scaling") or {})
    params.update(config.get("rope_parameters") or {})
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def check_rope(config: dict, uri: str) -> None:
    kind = rope_parameters(config)["rope_type"]
    if kind not in ROPE_TYPES:
        raise LaminaError(f"{uri}: rope_type {kind!r} is not one GGUF export writes ({', '.join(ROPE_TYPES)})")


def llama3_rope_factors(config: dict, head_dim: int) -> torch.Tensor:
    """Llama 3.1's frequency scaling as convert_hf_to_gguf.py stores it (rope_freqs.weight, [head_dim / 2])."""
    p = rope_parameters(config)
    freqs = 1.0 / (p["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor, low, high = p.get("factor", 8.0), p.get("low_freq_factor", 1.0), p.get("high_freq_factor", 4.0)
    old = p.get("original_max_position_embeddings", config.get("original_max_position_embeddings", 8192))
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def add_hyperparameters(writer: gguf.GGUFWriter, config: dict, *, head_dim: int) -> None:
    """The `{arch}.*` keys llama.cpp reads for a Llama-family model."""
    heads = config["num_attention_heads"]
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config.get("max_position_embeddings", 4096))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    rope = rope_parameters(config)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config["hidden_size"] // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
