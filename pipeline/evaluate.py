"""Distributed perplexity: workers run disjoint windows of held-out text through the
model block by block (quantized linears through QuantLinear) and return NLL sums per
window; the driver reduces them in window order."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from tqdm import tqdm

from pipeline import cluster
from pipeline.architectures import layout_for
from pipeline.data import load_tokenizer, sequences, token_stream
from pipeline.plan import open_checkpoint
from pipeline.recipe import EvalData, Resources


@dataclass(frozen=True)
class EvalReport:
    model: str
    perplexity: float
    nll: float  # mean NLL per predicted token
    tokens: int  # predicted tokens
    seconds: float
    kernel: str  # the low-bit kernel the workers ran quantized linears through; "none" for an unquantized model


def evaluate(model_uri: str, data: EvalData, resources: Resources, *, progress: bool = True) -> EvalReport:
    start = time.perf_counter()
    checkpoint = open_checkpoint(model_uri)
    layout = layout_for(checkpoint.config)
    tokenizer = load_tokenizer(checkpoint.uri)
    stream = token_stream(uri=data.source, pattern=data.glob, tokenizer=tokenizer, needed=data.tokens, what="eval")
    windows = sequences(stream, count=data.windows, length=data.window)  # [windows, window]
    ray = cluster.connect(resources)
    pool = cluster.start_runners(ray, resources, model_uri=checkpoint.uri, layout=layout, kernel=data.kernel)
    runners = pool.runners
    try:
        quantized = bool(checkpoint.config.get("quantization_config"))
        kernel = cluster.get(ray, runners[0].kernel_backend.remote()) if quantized else "none"
        shares = cluster.split(len(windows), len(runners))
        inputs = [{w: windows[w : w + 1] for w in share} for share in shares]
        cluster.get(ray, [r.set_inputs.remote(i) for r, i in zip(runners, inputs, strict=True)])
        n_blocks = checkpoint.config["num_hidden_layers"]
        for i in tqdm(range(n_blocks), desc=f"eval {checkpoint.uri}", unit="block", disable=not progress):
            cluster.get(ray, [r.load_block.remote(i) for r in runners] + [r.forward.remote() for r in runners])
        scores = {w: s for part in cluster.get(ray, [r.score.remote() for r in runners]) for w, s in part.items()}
    finally:
        pool.release()
    nll = sum(scores[w][0] for w in sorted(scores))
    count = sum(scores[w][1] for w in sorted(scores))
    return EvalReport(
        model=checkpoint.uri,
        perplexity=math.exp(nll / count),
        nll=nll / count,
        tokens=count,
        seconds=time.perf_counter() - start,
        kernel=kernel,
    )
