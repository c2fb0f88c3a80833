"""Distributed evaluation: workers run disjoint windows of held-out text through the model
block by block (quantized linears through QuantLinear on the low-bit kernels) and return
per-token scores; the driver reduces them in window order.

Against the unquantized source (`against`), the same workers first run the source over the
same windows and keep, per token, its NLL and its next-token distribution (top k log-probs
and the tail's mass); that pass is cached in storage by the source's fingerprint and the
eval tokens, so a second eval against the same source skips it. The artifact's pass then
scores each token against it: KL divergence, top-1 agreement, NLL increase.

Two context lengths: `window` and `long_window` (the model's longest by default). The
eval text is checked to be held out from the calibration text (shared files, and shared
32-token spans) before any worker starts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass

import numpy as np
from safetensors.numpy import load as load_arrays
from safetensors.numpy import save as save_arrays
from tqdm import tqdm

from pipeline import cluster
from pipeline.architectures import layout_for
from pipeline.data import files_of, load_tokenizer, ngram_overlap, sequences, token_stream
from pipeline.errors import LaminaError
from pipeline.plan import open_checkpoint
from pipeline.recipe import Calibration, EvalData, Resources
from storage.checkpoint import Checkpoint
from storage.fs import Location, StorageError, open_location

log = logging.getLogger(__name__)
FORMAT = "lamina-eval/1"
RARE_SHARE = 0.1  # the rarest-token decile
NGRAM = 32  # span length of the held-out check
MAX_NGRAM_OVERLAP = 0.01  # more of the eval's spans found in the calibration text: not held out
POSITION_BUCKETS = 32
Arrays = dict[str, np.ndarray]


@dataclass(frozen=True)
class Context:
    """The scores at one context length (reference fields are None without `against`)."""

    window: int
    windows: int
    tokens: int  # predicted tokens: windows * (window - 1)
    perplexity: float
    nll: float  # mean NLL per predicted token
    reference: dict | None  # {"perplexity", "nll"} of the source on the same windows
    ppl_increase: float | None  # perplexity / reference perplexity - 1
    kl: float | None  # mean KL(source || model) per token, nats
    top1: float | None  # share of tokens whose argmax agrees with the source's
    rare_nll_increase: float | None  # mean NLL increase on the rarest-token decile, nats


@dataclass(frozen=True)
class EvalResult:
    model: str
    against: str | None
    kernel: str  # the low-bit kernel quantized linears ran through; "none" for an unquantized model
    data: dict
    contexts: list[Context]  # shortest first
    position: dict | None  # NLL increase by position at the longest context
    calibration: dict | None  # the held-out check
    reference_cache: str | None  # "hit" or "computed"
    seconds: float

    @property
    def perplexity(self) -> float:
        return self.contexts[0].perplexity

    @property
    def nll(self) -> float:
        return self.contexts[0].nll

    @property
    def tokens(self) -> int:
        return self.contexts[0].tokens

    def as_json(self) -> dict:
        return {"format": FORMAT, **asdict(self), "seconds": round(self.seconds, 3)}


def context_lengths(data: EvalData, config: dict) -> list[int]:
    """[window] or [window, long window]: the long one defaults to the model's longest
    context, capped by the eval's tokens."""
    longest = data.long_window or min(int(config.get("max_position_embeddings") or data.tokens), data.tokens)
    for name, length in (("window", data.window), ("long_window", longest)):
        if length > data.tokens:
            raise LaminaError(f"eval.{name}: {length} is longer than eval.tokens ({data.tokens})")
    return sorted({data.window, longest})


def held_out(data: EvalData, calibration: Calibration, tokenizer: object, stream: np.ndarray) -> dict:
    """Refuse eval text that is not held out from the calibration text: a shared file, or
    more than MAX_NGRAM_OVERLAP of its NGRAM-token spans found in the calibration tokens."""
    shared = sorted(set(files_of(data.source, data.glob)) & set(files_of(calibration.source, calibration.glob)))
    if shared:
        raise LaminaError(f"eval and calibration share {len(shared)} file(s), e.g. {shared[0]}: eval must be held out")
    calibrated = token_stream(
        uri=calibration.source,
        pattern=calibration.glob,
        tokenizer=tokenizer,
        needed=calibration.tokens,
        what="calibration",
    )
    overlap = ngram_overlap(stream, calibrated, NGRAM)
    if overlap > MAX_NGRAM_OVERLAP:
        raise LaminaError(
            f"eval text is not held out: {overlap:.1%} of its {NGRAM}-token spans occur in the calibration text"
        )
    return {"files_shared": 0, "ngram": NGRAM, "ngram_overlap": round(overlap, 6)}


# ---- the reference pass's cache ----------------------------------------------------------
def cache_key(fingerprint: str, windows: np.ndarray, top_k: int) -> str:
    head = json.dumps({"fingerprint": fingerprint, "shape": list(windows.shape), "top_k": top_k}).encode()
    return hashlib.sha256(head + windows.astype(np.int64).tobytes()).hexdigest()[:32]


def load_reference(cache: Location, key: str, windows: int) -> dict[int, Arrays] | None:
    """The cached reference scores of `windows` windows, or None (absent or unreadable)."""
    name = f"{key}.safetensors"
    try:
        if not cache.exists(name):
            return None
        flat = load_arrays(cache.read_bytes(name))
    except (StorageError, ValueError, OSError) as e:  # a damaged cache is recomputed, not trusted
        log.warning("reference cache %s/%s unreadable (%s); recomputing", cache.uri, name, e)
        return None
    out: dict[int, Arrays] = {}
    for full, array in flat.items():
        w, _, field = full.partition(".")
        out.setdefault(int(w), {})[field] = array
    return out if sorted(out) == list(range(windows)) else None


def save_reference(cache: Location, key: str, scores: dict[int, Arrays]) -> None:
    flat = {f"{w}.{field}": np.ascontiguousarray(a) for w, s in scores.items() for field, a in s.items()}
    cache.write_bytes(f"{key}.safetensors", save_arrays(flat))


def parent_uri(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[0]


# ---- passes over the windows -------------------------------------------------------------
def run_pass(
    pool: cluster.Pool,
    model_uri: str,
    windows: np.ndarray,
    *,
    top_k: int | None = None,
    reference: dict[int, Arrays] | None = None,
    progress: bool = True,
) -> dict[int, Arrays]:
    """Every window ([windows, T]) through the model at `model_uri`, windows spread over
    the pool's workers: {window: per-token scores} (see BlockRunner.score)."""
    ray, runners = pool.ray, pool.runners
    cluster.get(ray, [r.reopen.remote(model_uri) for r in runners])
    shares = cluster.split(len(windows), len(runners))
    cluster.get(
        ray, [r.set_inputs.remote({w: windows[w : w + 1] for w in s}) for r, s in zip(runners, shares, strict=True)]
    )
    n_blocks = Checkpoint(model_uri).config["num_hidden_layers"]
    desc = f"eval {'reference ' if top_k is not None else ''}{windows.shape[1]}-token windows"
    for i in tqdm(range(n_blocks), desc=desc, unit="block", disable=not progress):
        cluster.get(ray, [r.load_block.remote(i) for r in runners] + [r.forward.remote() for r in runners])
    calls = [
        r.score.remote(top_k=top_k, reference=None if reference is None else {w: reference[w] for w in s})
        for r, s in zip(runners, shares, strict=True)
    ]
    scores = {w: s for part in cluster.get(ray, calls) for w, s in part.items()}
    cluster.get(ray, [r.set_inputs.remote({}) for r in runners])  # drop the windows' hidden states
    return scores


def summarize(
    windows: np.ndarray, scores: dict[int, Arrays], reference: dict[int, Arrays] | None, counts: np.ndarray
) -> tuple[Context, np.ndarray | None]:
    """One context's numbers, and the NLL increase by position ([T-1], None without a reference)."""
    n, T = windows.shape
    nll = np.stack([scores[w]["nll"] for w in range(n)])  # [windows, T-1]
    mean = float(nll.mean())
    if reference is None:
        return Context(T, n, nll.size, math.exp(mean), mean, None, None, None, None, None), None
    ref = np.stack([reference[w]["nll"] for w in range(n)])  # [windows, T-1]
    increase = nll - ref  # [windows, T-1]
    rarity = counts[windows[:, 1:]].ravel()  # how often each predicted token occurs in the eval text
    rarest = np.lexsort((np.arange(rarity.size), rarity))[: max(1, math.ceil(RARE_SHARE * rarity.size))]
    ref_mean = float(ref.mean())
    context = Context(
        window=T,
        windows=n,
        tokens=nll.size,
        perplexity=math.exp(mean),
        nll=mean,
        reference={"perplexity": math.exp(ref_mean), "nll": ref_mean},
        ppl_increase=math.exp(mean - ref_mean) - 1,
        kl=float(np.concatenate([scores[w]["kl"] for w in range(n)]).mean()),
        top1=float(np.concatenate([scores[w]["top1"] for w in range(n)]).mean()),
        rare_nll_increase=float(increase.ravel()[rarest].mean()),
    )
    return context, increase.mean(0)


def by_position(increase: np.ndarray, window: int) -> dict:
    """The mean NLL increase per position [T-1], averaged over POSITION_BUCKETS buckets."""
    bucket = max(1, math.ceil(len(increase) / POSITION_BUCKETS))
    starts = list(range(0, len(increase), bucket))
    means = [round(float(increase[s : s + bucket].mean()), 6) for s in starts]
    return {"window": window, "bucket": bucket, "start": starts, "nll_increase": means}


def reference_scores(
    pool: cluster.Pool, source: Checkpoint, windows: np.ndarray, data: EvalData, cache: Location, progress: bool
) -> tuple[dict[int, Arrays], str]:
    key = cache_key(source.fingerprint, windows, data.kl_top_k)
    found = load_reference(cache, key, len(windows))
    if found is not None:
        return found, "hit"
    scores = run_pass(pool, source.uri, windows, top_k=data.kl_top_k, progress=progress)
    try:
        save_reference(cache, key, scores)
    except StorageError as e:  # an unwritable cache costs the next eval a pass, nothing more
        log.warning("could not cache the reference scores in %s: %s", cache.uri, e)
    return scores, "computed"


def evaluate(
    model_uri: str,
    data: EvalData,
    resources: Resources,
    *,
    against: str | None = None,
    calibration: Calibration | None = None,
    cache_uri: str | None = None,
    progress: bool = True,
) -> EvalResult:
    """Score `model_uri` on the eval text at each context length; against the unquantized
    `against`, also KL, top-1 agreement and NLL increases. With `calibration`, the eval
    text is first checked to be held out from it."""
    start = time.perf_counter()
    checkpoint = open_checkpoint(model_uri)
    layout = layout_for(checkpoint.config)
    source = open_checkpoint(against) if against else None
    if source is not None and source.config.get("vocab_size") != checkpoint.config.get("vocab_size"):
        raise LaminaError(f"{against} has another vocabulary than {model_uri}: not its source")
    lengths = context_lengths(data, checkpoint.config)
    tokenizer = load_tokenizer(checkpoint.uri)
    stream = token_stream(uri=data.source, pattern=data.glob, tokenizer=tokenizer, needed=data.tokens, what="eval")
    checked = held_out(data, calibration, tokenizer, stream) if calibration is not None else None
    counts = np.bincount(stream, minlength=int(checkpoint.config.get("vocab_size") or 0))
    cache = open_location(data.reference_cache or cache_uri or f"{parent_uri(checkpoint.uri)}/.lamina-cache/reference")
    ray = cluster.connect(resources)
    pool = cluster.start_runners(ray, resources, model_uri=checkpoint.uri, layout=layout, kernel=data.kernel)
    contexts, position, cached = [], None, set()
    try:
        quantized = bool(checkpoint.config.get("quantization_config"))
        kernel = cluster.get(ray, pool.runners[0].kernel_backend.remote()) if quantized else "none"
        for length in lengths:
            windows = sequences(stream, count=data.tokens // length, length=length)  # [windows, length]
            reference = None
            if source is not None:
                reference, how = reference_scores(pool, source, windows, data, cache, progress)
                cached.add(how)
            scores = run_pass(pool, checkpoint.uri, windows, reference=reference, progress=progress)
            context, increase = summarize(windows, scores, reference, counts)
            contexts.append(context)
            if increase is not None:
                position = by_position(increase, length)
    finally:
        pool.release()
    return EvalResult(
        model=checkpoint.uri,
        against=None if source is None else source.uri,
        kernel=kernel,
        data={"source": data.source, "glob": data.glob, "tokens": data.tokens},
        contexts=contexts,
        position=position,
        calibration=checked,
        reference_cache=None if not cached else ("hit" if cached == {"hit"} else "computed"),
        seconds=time.perf_counter() - start,
    )
