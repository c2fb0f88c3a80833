"""What a run will need, from config.json alone: every linear's shape, the parameter
count, and per worker the bytes and FLOPs of each block's calibration and solve, turned
into time by a device profile. No weights are read, so a 405B model is planned on a laptop.

The memory model follows what workers/block.py holds for a Hessian-based scheme (GPTQ,
QuIP; the codebook fits hold the same Hessians):

- the block: its stored tensors (source dtype) and the module built from them (float32);
- activations: the hidden states of the worker's chunks (float32, [tokens, hidden]), and
  the largest temporaries of one chunk's forward (the MLP's [tokens, intermediate] x3,
  attention's per-head scores [heads, T, T] for one sequence);
- Hessians: one float32 [in, in] per group of linears sharing an input, as partial chunk
  sums (at most ~2 log2(chunks) sets per worker; the planner counts 2);
- the solve of one row piece (algorithms/gptq.py as written): the reduced Hessians, the
  piece's H / tokens, prepare's one float32 copy (permuted), inverse_cholesky's damped
  float64 copy and factor at its peak (16 bytes per entry; the float32 work after it
  needs 12), and the piece's rows (float32, permuted, and codes: 9 bytes per weight).
  `benchmarks/block70b.py` checks the sum against a measured peak.

- before the first block, the embedding of the worker's chunks (the table as stored and
  in float32); after the last, worker 0's copy of the tensors outside the blocks
  (embeddings, head, final norm) into the artifact: read, then serialized twice
  (safetensors' per-tensor bytes and the file's), three times their stored size.

The peak is the worker's runtime (the profile's baseline), the block and the hidden
states, plus the largest of those phases: embedding, calibration (activations + Hessian
partials), solve (the reduced Hessians + one solve's working set) and the final copy.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from storage.fs import Location

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
F32 = 4


@dataclass(frozen=True)
class LinearShape:
    name: str  # inside the block, e.g. "self_attn.q_proj"
    out_features: int
    in_features: int
    group: str  # the first linear of the group that reads the same input (shares its Hessian)
    bias: bool = False

    @property
    def params(self) -> int:
        return self.out_features * self.in_features + (self.out_features if self.bias else 0)


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only model's sizes as its config.json gives them."""

    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool = False
    experts: int = 0  # 0: a dense MLP; else `intermediate` is each expert's
    experts_per_token: int = 0
    shared_intermediate: int = 0  # a shared expert every token reaches (Qwen2-MoE, DeepSeekMoE); 0: none
    dtype_bytes: int = 2

    @classmethod
    def from_config(cls, config: dict) -> ModelShape:
        model_type = config.get("model_type")
        known = ("llama", "mistral", "qwen2", "mixtral", "qwen2_moe")
        if model_type not in known:
            raise ValueError(f"no shape model for architecture {model_type!r} ({', '.join(known)})")
        hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        qwen_moe = model_type == "qwen2_moe"
        experts = {"mixtral": config.get("num_local_experts", 0), "qwen2_moe": config.get("num_experts", 0)}
        return cls(
            model_type=model_type,
            hidden=hidden,
            intermediate=int(config["moe_intermediate_size" if qwen_moe else "intermediate_size"]),
            layers=int(config["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            vocab=int(config["vocab_size"]),
            tied=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=model_type in ("qwen2", "qwen2_moe"),
            experts=int(experts.get(model_type, 0)),
            experts_per_token=int(config.get("num_experts_per_tok", 0)),
            shared_intermediate=int(config.get("shared_expert_intermediate_size", 0)) if qwen_moe else 0,
            dtype_bytes=DTYPE_BYTES.get(str(config.get("torch_dtype") or config.get("dtype") or "bfloat16"), 2),
        )

    def linears(self) -> tuple[LinearShape, ...]:
        """One block's linears in quantization order (a MoE's router stays in full precision)."""
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        b = self.qkv_bias
        attn = (
            LinearShape("self_attn.q_proj", q, h, "self_attn.q_proj", b),
            LinearShape("self_attn.k_proj", kv, h, "self_attn.q_proj", b),
            LinearShape("self_attn.v_proj", kv, h, "self_attn.q_proj", b),
            LinearShape("self_attn.o_proj", h, q, "self_attn.o_proj"),
        )
        if not self.experts:
            i = self.intermediate
            return (
                *attn,
                LinearShape("mlp.gate_proj", i, h, "mlp.gate_proj"),
                LinearShape("mlp.up_proj", i, h, "mlp.gate_proj"),
                LinearShape("mlp.down_proj", h, i, "mlp.down_proj"),
            )

        def mlp(prefix: str, names: tuple[str, str, str], i: int) -> list[LinearShape]:
            gate, up, down = (prefix + n for n in names)
            return [LinearShape(gate, i, h, gate), LinearShape(up, i, h, gate), LinearShape(down, h, i, down)]

        moe = []
        if self.shared_intermediate:  # reads every token: the MoE input's Hessian
            moe += mlp("mlp.shared_expert.", ("gate_proj", "up_proj", "down_proj"), self.shared_intermediate)
        for e in range(self.experts):  # each expert reads its own tokens: its own Hessians
            if self.model_type == "mixtral":
                moe += mlp(f"block_sparse_moe.experts.{e}.", ("w1", "w3", "w2"), self.intermediate)
            else:
                moe += mlp(f"mlp.experts.{e}.", ("gate_proj", "up_proj", "down_proj"), self.intermediate)
        return (*attn, *moe)

    def block_params(self) -> int:
        """Linears, their biases, the two norms and (MoE) the router and a shared expert's gate."""
        router = self.experts * self.hidden + (self.hidden if self.shared_intermediate else 0)
        return sum(lin.params for lin in self.linears()) + 2 * self.hidden + router

    def outside_params(self) -> int:
        """Outside the blocks: embeddings, (untied) LM head and the final norm."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    def active_params(self) -> int:
        """The block's parameters one token runs through: a MoE's top-k experts of all of them."""
        if not self.experts:
            return self.block_params()
        per_expert = 3 * self.hidden * self.intermediate
        return self.block_params() - (self.experts - self.experts_per_token) * per_expert

    def params(self) -> int:
        """The whole model: blocks, embeddings, final norm and (untied) LM head."""
        return self.layers * self.block_params() + self.outside_params()

    def groups(self) -> dict[str, int]:
        """Each Hessian's input size, by group."""
        return {lin.group: lin.in_features for lin in self.linears()}


@dataclass(frozen=True)
class Profile:
    """What a device does per second (achieved, not peak) and holds: `gemm` float32 matmul
    FLOP/s (TF32 tensor cores on GPUs), `factor` the float64 Cholesky's FLOP/s, `memory`
    bytes usable by one worker, `price` per device-hour (for the cost estimate), and
    `baseline` the bytes a worker holds before any block (its runtime: torch, transformers).
    `host_memory`: a GPU worker's share of its node's RAM (0: the device is the host, a CPU),
    which holds the block, the chunks, calibration and (unless they run on the GPU) the solves;
    `host_gemm`, `host_factor`, `host_column`: the rates of its share of the node's CPUs, where
    calibration runs (and the solves, unless on the GPU)."""

    name: str
    gemm: float
    factor: float
    memory: int
    price: float = 0.0
    baseline: int = 0
    host_memory: int = 0
    column: float = 4e-4  # seconds of GPTQ's per-column loop beyond its FLOPs (small tensor ops)
    host_gemm: float = 0.0  # a GPU worker's CPU share: calibration runs there, and solves unless on the GPU
    host_factor: float = 0.0
    host_column: float = 4e-4

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_doc(cls, doc: dict) -> Profile:
        if set(doc) - {f.name for f in fields(cls)} or "name" not in doc:
            raise ValueError(f"not a device profile: expected the keys {', '.join(f.name for f in fields(cls))}")
        return cls(**doc)


def runtime_rss() -> int:
    """The resident bytes of this process once it has imported what a worker runs (the
    runner, transformers' modeling code): a worker's memory before any block."""
    import importlib

    import workers.block  # noqa: F401

    importlib.import_module("transformers.models.llama.modeling_llama")
    for line in open("/proc/self/status").read().splitlines():  # noqa: SIM115
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def measure_rates(device: str, size: int) -> tuple[float, float, float]:
    """(gemm, factor, column) achieved on `device`: the best of 3 float32 matmuls of size^3
    and float64 Cholesky factorizations of size^2, and what GPTQ on 1024 x 1024 takes per
    column beyond its FLOPs at those rates."""
    import time

    import torch

    from algorithms.gptq import GPTQConfig, gptq
    from algorithms.types import UniformScheme

    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, generator=gen, device=device)
    spd = (a.double() @ a.double().T) / size + torch.eye(size, dtype=torch.float64, device=device)

    def best(fn) -> float:
        times = []
        for _ in range(3):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return min(times)

    gemm = 2.0 * size**3 / best(lambda: a @ a)
    factor = size**3 / 3 / best(lambda: torch.linalg.cholesky(spd))
    W, eye = torch.randn(1024, 1024, generator=gen, device=device), torch.eye(1024, device=device)
    with torch.device(device):
        whole = best(lambda: gptq(W, eye, UniformScheme(bits=4, group_size=128), GPTQConfig()))
    return gemm, factor, max(0.0, whole - 2.0 * 1024**3 / gemm - 1024**3 / 3 / factor) / 1024


def measure_profile(device: str = "cpu", size: int = 0, price: float = 0.0) -> Profile:
    """This machine's achieved rates (measure_rates; size 2048 on CPU, 8192 on a GPU by
    default, and on a GPU machine its CPU's too: calibration runs there); the memory a
    worker may use (RAM, or the GPU's and its share of RAM); the worker runtime's resident
    memory as the baseline (runtime_rss, before the benchmarks)."""
    import os

    import torch

    baseline = runtime_rss()
    gemm, factor, column = measure_rates(device, size or (8192 if device == "cuda" else 2048))
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if device != "cuda":
        name = f"CPU ({torch.get_num_threads()} threads)"
        return Profile(name, gemm, factor, ram, price, baseline=baseline, column=column)
    host_gemm, host_factor, host_column = measure_rates("cpu", 2048)
    return Profile(
        torch.cuda.get_device_name(),
        gemm,
        factor,
        torch.cuda.get_device_properties(0).total_memory,
        price,
        baseline=baseline,
        host_memory=ram // torch.cuda.device_count(),  # one worker per GPU
        column=column,
        host_gemm=host_gemm,
        host_factor=host_factor,
        host_column=host_column,
    )


def load_profile(name_or_path: str) -> Profile:
    """A preset (PROFILES) by name, or a profile saved by `lamina bench profile --save`."""
    if name_or_path in PROFILES:
        return PROFILES[name_or_path]
    from storage.checkpoint import read_json

    where, file = locate(name_or_path)
    if not file or not where.isfile(file):
        raise ValueError(f"{name_or_path}: neither a device profile file nor one of {', '.join(PROFILES)}")
    return Profile.from_doc(read_json(where, file))


def locate(uri: str) -> tuple[Location, str]:
    """A file's URI (or path) as its folder's location and its name."""
    from storage.fs import open_location

    folder, _, name = uri.rpartition("/")
    return open_location(folder or "."), name


GIB = 2**30
CPU_SHARE = {"host_gemm": 0.6e12, "host_factor": 0.15e12}  # 1/8 of a 2 x 48-core node's AVX-512 rates (fp32, fp64)
H100 = {"gemm": 0.6 * 495e12, "factor": 0.6 * 67e12, **CPU_SHARE}
A100 = {"gemm": 0.6 * 156e12, "factor": 0.6 * 19.5e12, **CPU_SHARE}
PROFILES = {  # achieved rates: about 60% of the published dense TF32 / FP64 numbers; host RAM: 1/8 of an 8-GPU node's
    "h100": Profile("H100 80GB", **H100, memory=80 * GIB, price=3.0, host_memory=256 * GIB, column=5e-5),
    "h200": Profile("H200 141GB", **H100, memory=141 * GIB, price=4.0, host_memory=256 * GIB, column=5e-5),
    "a100": Profile("A100 80GB", **A100, memory=80 * GIB, price=2.0, host_memory=144 * GIB, column=6e-5),
    "a100-40gb": Profile("A100 40GB", **A100, memory=40 * GIB, price=1.5, host_memory=144 * GIB, column=6e-5),
    "cpu": Profile("CPU (2 cores)", gemm=50e9, factor=10e9, memory=24 * GIB, price=0.1, baseline=500 * 2**20),
}


@dataclass(frozen=True)
class Tensor:
    """One held tensor (or set of them) of the memory model: what it is, its bytes, and
    where: "host" (RAM) or "device" (a GPU's memory)."""

    what: str
    nbytes: int
    where: str = "host"


@dataclass(frozen=True)
class WorkerEstimate:
    """One worker's peak while it runs one block, and that block's time on it."""

    resident: tuple[Tensor, ...]  # held through the block
    calibration: tuple[Tensor, ...]  # held while calibrating, on top of `resident`
    solve: tuple[Tensor, ...]  # held while solving its largest piece, on top of `resident`
    calibration_flops: float
    solve_flops: float
    factor_flops: float
    seconds: float
    embedding: tuple[Tensor, ...] = ()  # held while embedding the chunks, before the first block
    copy: tuple[Tensor, ...] = ()  # held by worker 0 while it copies the tensors outside the blocks

    def phases(self) -> dict[str, tuple[Tensor, ...]]:
        return {"embedding": self.embedding, "calibration": self.calibration, "solve": self.solve, "copy": self.copy}

    def peak_of(self, where: str) -> int:
        """The bytes held at once in RAM ("host") or on the GPU ("device"), at the worst phase."""

        def held(part: tuple[Tensor, ...]) -> int:
            return sum(t.nbytes for t in part if t.where == where)

        return held(self.resident) + max(held(part) for part in self.phases().values())

    @property
    def peak(self) -> int:
        """Host and device together (a CPU worker's whole peak)."""
        return self.peak_of("host") + self.peak_of("device")

    def largest(self, where: str) -> Tensor:
        held = (*self.resident, *(t for part in self.phases().values() for t in part))
        return max((t for t in held if t.where == where), key=lambda t: t.nbytes)


@dataclass(frozen=True)
class RunEstimate:
    shape: ModelShape
    profile: Profile
    workers: int
    worker: WorkerEstimate  # the busiest worker of one block
    seconds: float  # all blocks
    cost: float  # profile.price x workers x hours
    notes: tuple[str, ...] = field(default_factory=tuple)


def solve_flops(lin_rows: int, in_features: int) -> tuple[float, float]:
    """(sweep FLOPs, factorization FLOPs) of GPTQ on `lin_rows` rows: the column sweep's
    2 rows in^2 (error feedback) and the Hessian's float64 Cholesky plus triangular
    inverse, 2/3 in^3 (repeated by every piece)."""
    return 2.0 * lin_rows * in_features**2, (2 / 3) * in_features**3


def estimate(
    shape: ModelShape,
    profile: Profile,
    *,
    workers: int,
    tokens: int,
    seq_len: int,
    chunk_tokens: int,
    solve_rows: int = 8192,
    spill: bool = False,
    solve_device: str = "cpu",
    inverse_on_cpu: bool = False,
) -> RunEstimate:
    """The run on `workers` devices of `profile`: each worker holds the block and 1/workers
    of the calibration tokens (with `spill`, one chunk's in memory, its input and output,
    and the rest in files); a block's row pieces are spread over the workers by cost. The
    solves run where resources.solve_device says (on "gpu", the Hessian's factorization on
    the CPU with `inverse_on_cpu`); everything else in host memory."""
    from pipeline.balance import balance

    if solve_device == "gpu" and not profile.host_memory:
        raise ValueError(f"solve_device gpu: the {profile.name} profile is not a GPU's")
    gpu = "device" if solve_device == "gpu" else "host"
    factor_at = "host" if inverse_on_cpu else gpu

    h = shape.hidden
    chunks = -(-tokens // chunk_tokens)
    own_tokens = -(-chunks // workers) * chunk_tokens
    block = shape.block_params()
    groups = shape.groups()
    hessians = sum(n * n * F32 for n in groups.values())
    resident = (
        Tensor("the worker's runtime (profile baseline)", profile.baseline),
        Tensor("block weights as stored", block * shape.dtype_bytes),
        Tensor("block module (float32)", block * F32),
        Tensor("hidden states of one chunk, in and out (the rest spilled)", 2 * chunk_tokens * h * F32)
        if spill
        else Tensor("hidden states of the worker's chunks (float32)", own_tokens * h * F32),
    )
    inter = shape.intermediate * (shape.experts_per_token if shape.experts else 1) + shape.shared_intermediate
    scores = shape.heads * seq_len * seq_len * F32
    calibration = (
        Tensor("one chunk's forward temporaries", chunk_tokens * (3 * inter + 4 * h) * F32 + scores),
        Tensor("Hessian partial sums (2 sets)", 2 * hessians),
    )
    tasks = [
        (lin, first, min(first + (solve_rows or lin.out_features), lin.out_features))
        for lin in shape.linears()
        for first in range(0, lin.out_features, solve_rows or lin.out_features)
    ]
    widest = max(tasks, key=lambda t: (t[0].in_features, t[2] - t[1]))
    lin, first, last = widest
    n = lin.in_features
    solve = (
        Tensor("the block's Hessians, reduced", hessians),
        Tensor(f"{lin.name} Hessian / tokens", n * n * F32),
        *((Tensor(f"{lin.name} Hessian / tokens on the GPU", n * n * F32, gpu),) if gpu == "device" else ()),
        Tensor(f"{lin.name} prepare: one float32 copy (permuted)", n * n * F32, factor_at),
        Tensor(f"{lin.name} Cholesky: float64 damped copy and factor", n * n * 16, factor_at),
        *((Tensor(f"{lin.name} inverse factor moved to the GPU", n * n * F32, gpu),) if inverse_on_cpu else ()),
        *(
            (Tensor(f"{lin.name} weight (float32) on the GPU", lin.out_features * n * F32, gpu),)
            if gpu == "device"
            else ()
        ),
        Tensor(
            f"{lin.name} rows {first}:{last} (float32, permuted) and codes", (last - first) * n * (2 * F32 + 1), gpu
        ),
    )
    flops = [solve_flops(b - a, t.in_features) for t, a, b in tasks]  # (sweep, factorization) of each task
    shares = balance([int(sum(f) // 1e6) for f in flops], workers)
    busiest = max(shares, key=lambda s: sum(sum(flops[i]) for i in s))
    sweep = sum(flops[i][0] for i in busiest)
    factor = sum(flops[i][1] for i in busiest)
    forward = 2.0 * own_tokens * shape.active_params() + 4.0 * own_tokens * seq_len * h  # matmuls + attention
    gram = sum(2.0 * own_tokens * n * n for n in groups.values())
    # calibration's forward, then the same forward again through the quantized block (propagation)
    columns = sum(tasks[i][0].in_features for i in busiest)  # the solves' per-column loop
    p = profile
    cpu_gemm, cpu_factor = p.host_gemm or p.gemm, p.host_factor or p.factor  # where calibration runs
    on_gpu = solve_device == "gpu"
    solve_gemm, column = (p.gemm, p.column) if on_gpu else (cpu_gemm, p.host_column if p.host_gemm else p.column)
    factor_rate = p.factor if on_gpu and not inverse_on_cpu else cpu_factor
    seconds = (2 * forward + gram) / cpu_gemm + sweep / solve_gemm + factor / factor_rate + columns * column
    stored = shape.dtype_bytes
    table = shape.vocab * h * (stored + F32 * (stored != F32))  # .float() copies unless it is float32 already
    embedding = (Tensor("embedding table as stored and in float32", table),)
    copy = (Tensor("tensors outside the blocks: read, serialized twice", 3 * shape.outside_params() * stored),)
    worker = WorkerEstimate(resident, calibration, solve, forward + gram, sweep, factor, seconds, embedding, copy)
    total = seconds * shape.layers
    return RunEstimate(shape, profile, workers, worker, total, profile.price * workers * total / 3600)


def fastest(shape: ModelShape, profile: Profile, *, most: int, **kwargs: int) -> RunEstimate:
    """The worker count up to `most` that finishes first (ties: fewer workers)."""
    runs = [estimate(shape, profile, workers=w, **kwargs) for w in range(1, most + 1)]
    return min(runs, key=lambda r: (round(r.seconds, 6), r.workers))


def check_fits(run: RunEstimate) -> None:
    """Refuse a plan whose worker peak exceeds the GPU's memory or its share of RAM (a CPU
    worker's: its memory), naming the largest tensor there and the options."""
    w, p = run.worker, run.profile
    places = (("device", p.memory, f"the {p.name}'s"), ("host", p.host_memory, "its share of the node's RAM"))
    if not p.host_memory:
        places = (("host", p.memory, f"the {p.name}'s"),)
    for where, limit, of in places:
        peak = w.peak_of(where)
        if peak <= limit:
            continue
        big = w.largest(where)
        if big in w.calibration or "chunks" in big.what:
            options = (
                "more workers (fewer chunks each), smaller calibration chunks, chunks spilled to files "
                "(resources.spill), or a device with more memory"
            )
        elif big in w.embedding or big in w.copy:
            options = "a device with more memory for worker 0 (the embeddings and head are copied whole)"
        elif where == "device":
            options = "the Hessian's factorization on the CPU (resources.inverse_on_cpu), or a GPU with more memory"
        elif p.host_memory:
            options = "the solves on the GPU (resources.solve_device: gpu), or nodes with more RAM per GPU"
        else:
            options = "a machine with more memory"
        raise ValueError(
            f"a worker needs {peak / GIB:.1f} GiB at its peak, more than {of} {limit / GIB:.0f} GiB; "
            f"the largest part is {big.what} ({big.nbytes / GIB:.1f} GiB): {options}"
        )


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 100 else f"{n / 2**20:.1f} MiB"


def describe(run: RunEstimate) -> list[str]:
    """The estimate as lines for a terminal."""
    s, w = run.shape, run.worker
    lines = [
        f"{s.model_type}: {s.params() / 1e9:.2f}B parameters, {s.layers} blocks of {s.block_params() / 1e6:.1f}M",
        f"on {run.workers} x {run.profile.name}: per block and worker",
    ]
    parts = (("held", w.resident), *w.phases().items())
    width = max(64, *(len(t.what) + 1 for _, part in parts for t in part))
    for title, part in parts:
        lines += [f"  {title:<12}{t.what:<{width}}{gib(t.nbytes):>12}{'  (GPU)' * (t.where == 'device')}" for t in part]
    peaks = [f"  peak        {gib(w.peak_of('host')):>{width + 12}}{'  (RAM)' * bool(run.profile.host_memory)}"]
    if w.peak_of("device"):
        peaks.append(f"  peak        {gib(w.peak_of('device')):>{width + 12}}  (GPU)")
    lines += [
        *peaks,
        f"  FLOPs: calibration {w.calibration_flops:.3g}, solve sweep {w.solve_flops:.3g}, "
        f"factorizations {w.factor_flops:.3g}",
        f"time {run.seconds / 3600:.2f} h ({run.seconds / s.layers:.1f} s a block), "
        f"cost {run.cost:.2f} at {run.profile.price:g} a device-hour",
    ]
    return lines
