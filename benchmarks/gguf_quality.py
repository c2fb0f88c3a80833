"""Perplexity of GGUF exports of the fixture model, loaded by transformers' GGUF support,
under the reference protocol of shared/FIXTURES.md (the tutorial text, its first 16,384
tokens, windows of 1024, fp32), beside the unquantized model on the same windows.

    python benchmarks/gguf_quality.py                      # Q8_0, Q4_0, Q4_K_M
    python benchmarks/gguf_quality.py --types Q6_K Q5_K_M --tokens 4096

Each row: the export's time (lamina, from the safetensors checkpoint), its size, the time
transformers takes to load it, and its perplexity; the source's row is measured in the same
run. Not a test: the numbers go into notes and the README.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FIXTURES = ROOT / ".cache" / "fixtures"
MODEL, DOCS = FIXTURES / "smollm2-135m", FIXTURES / "python-docs"


def perplexity(model, windows) -> float:
    """exp(mean NLL of the predicted tokens), each window on its own (1023 predictions per 1024)."""
    import torch

    nll, count = 0.0, 0
    with torch.inference_mode():
        for ids in windows:  # [window]
            logits = model(ids[None]).logits[0, :-1].float()  # [window - 1, vocab]
            nll += float(torch.nn.functional.cross_entropy(logits, ids[1:], reduction="sum"))
            count += len(ids) - 1
    return math.exp(nll / count)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--types", nargs="+", default=["Q8_0", "Q4_0", "Q4_K_M"])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--window", type=int, default=1024)
    args = p.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.data import load_tokenizer, token_stream
    from pipeline.gguf_export import export_gguf, gguf_name

    tokenizer = load_tokenizer(str(MODEL))
    stream = token_stream(
        uri=str(DOCS / "tutorial"), pattern="*.rst.txt", tokenizer=tokenizer, needed=args.tokens, what="eval"
    )
    windows = torch.from_numpy(stream).long().reshape(-1, args.window)  # [windows, window]
    sample = (DOCS / "tutorial" / "introduction.rst.txt").read_text()
    print(f"torch threads {torch.get_num_threads()}, {windows.shape[0]} windows of {args.window}")
    print("| model | export s | MiB | load s | tokenizer same | ppl | eval s |")
    print("|---|---|---|---|---|---|---|")
    start = time.perf_counter()
    source = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    loaded = time.perf_counter() - start
    start = time.perf_counter()
    ppl = perplexity(source, windows)
    print(
        f"| source fp32 | - | {sum(f.stat().st_size for f in MODEL.glob('*.safetensors')) / 2**20:.1f} | "
        f"{loaded:.1f} | - | {ppl:.3f} | {time.perf_counter() - start:.0f} |",
        flush=True,
    )
    del source
    with tempfile.TemporaryDirectory(prefix="lamina-gguf-quality-") as tmp:
        for gguf_type in args.types:
            folder = Path(tmp) / gguf_type
            report = export_gguf(str(MODEL), str(folder), gguf_type=gguf_type, progress=False)
            start = time.perf_counter()
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_name(gguf_type), dtype=torch.float32)
            gguf_tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_name(gguf_type))
            loaded = time.perf_counter() - start
            same = gguf_tokenizer(sample).input_ids == tokenizer(sample).input_ids
            start = time.perf_counter()
            ppl = perplexity(model, windows)
            print(
                f"| GGUF {gguf_type} | {report.seconds:.1f} | {report.nbytes / 2**20:.1f} | {loaded:.1f} | {same} | "
                f"{ppl:.3f} | {time.perf_counter() - start:.0f} |",
                flush=True,
            )
            del model
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
