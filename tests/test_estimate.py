"""The planner's estimates from config.json alone, on the published configs of real
families (tests/configs: Llama-3 8B and 70B, Llama-3.1-405B, Qwen2.5-72B, Mixtral-8x7B)."""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.estimate import GIB, PROFILES, ModelShape, Profile, check_fits, estimate, fastest

CONFIGS = Path(__file__).parent / "configs"
PUBLISHED = {  # the parameter counts their model cards give
    "llama-3-8b": 8_030_261_248,
    "llama-3-70b": 70_553_706_496,
    "llama-3.1-405b": 405_853_388_800,
    "qwen2.5-72b": 72_706_203_648,
    "mixtral-8x7b": 46_702_792_704,
}


def shape(name: str) -> ModelShape:
    return ModelShape.from_config(json.loads((CONFIGS / f"{name}.json").read_text()))


def by_hand(c: dict) -> int:
    """Embeddings and head, then per block: q/o (hidden^2), k/v (hidden x kv_heads x
    head_dim), the MLP (3 hidden x intermediate, per expert), biases, norms, router."""
    h, i, kv = (
        c["hidden_size"],
        c["intermediate_size"],
        c["num_key_value_heads"] * c["hidden_size"] // c["num_attention_heads"],
    )
    experts = c.get("num_local_experts", 1)
    block = 2 * h * h + 2 * h * kv + experts * 3 * h * i + 2 * h
    if c["model_type"] == "qwen2":
        block += h + 2 * kv  # q/k/v biases
    if c["model_type"] == "mixtral":
        block += experts * h  # the router
    return c["num_hidden_layers"] * block + 2 * c["vocab_size"] * h + h


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_of_real_families_are_exact(name: str) -> None:
    config = json.loads((CONFIGS / f"{name}.json").read_text())
    assert shape(name).params() == by_hand(config) == PUBLISHED[name]


def test_405b_down_proj_hessian_where_it_is_held_and_the_refusals_that_name_it() -> None:
    """The solve of a 405B down_proj as algorithms/gptq.py holds it (24 bytes per Hessian
    entry at its peak). On the CPU (the default) it is in the worker's share of the node's
    RAM; on the GPU it does not fit an A100 40GB unless the factorization runs on the CPU
    (inverse_on_cpu), and it fits an H100 80GB."""
    s = shape("llama-3.1-405b")
    assert s.groups()["mlp.down_proj"] == 53248
    sizes = {"workers": 8, "tokens": 128 * 2048, "seq_len": 2048, "chunk_tokens": 2048}
    a100 = PROFILES["a100-40gb"]
    run = estimate(s, a100, **sizes)
    solve = {t.what: t for t in run.worker.solve}
    assert solve["mlp.down_proj Hessian / tokens"].nbytes == 53248**2 * 4  # 11.3 GB
    assert solve["mlp.down_proj Cholesky: float64 damped copy and factor"].nbytes == 53248**2 * 16
    assert {t.where for t in run.worker.solve} == {"host"} and run.worker.peak_of("device") == 0
    check_fits(run)
    gpu = estimate(s, a100, **sizes, solve_device="gpu")
    assert {t.what for t in gpu.worker.solve if t.where == "device"} >= {
        "mlp.down_proj Cholesky: float64 damped copy and factor",
        "mlp.down_proj Hessian / tokens on the GPU",
    }
    with pytest.raises(ValueError, match=r"more than the A100 40GB's 40 GiB; the largest part is mlp\.down_proj Chol"):
        check_fits(gpu)
    split = estimate(s, a100, **sizes, solve_device="gpu", inverse_on_cpu=True)
    assert split.worker.peak_of("device") < 0.45 * gpu.worker.peak_of("device")
    check_fits(split)
    check_fits(estimate(s, PROFILES["h100"], **sizes, solve_device="gpu"))
    assert gpu.seconds < run.seconds < estimate(s, PROFILES["cpu"], **sizes).seconds
    wide = estimate(s, PROFILES["h200"], workers=1, tokens=1024 * 2048, seq_len=2048, chunk_tokens=64 * 2048)
    with pytest.raises(ValueError, match=r"its share of the node's RAM .* the largest part is .*: more workers"):
        check_fits(wide)
    with pytest.raises(ValueError, match=r"solve_device gpu: the CPU .* profile is not a GPU's"):
        estimate(s, PROFILES["cpu"], **sizes, solve_device="gpu")


def test_qwen_moe_with_a_shared_expert_counts_as_its_card_says() -> None:
    """Qwen1.5-MoE-A2.7B (DeepSeekMoE's shape: 60 fine-grained experts, top-4, plus a shared
    expert): the card's 14.3B parameters and 2.7B activated, and by hand per block: q/k/v/o
    with q/k/v biases, the shared expert (3 x 2048 x 5632) and its gate (2048), 60 experts
    (3 x 2048 x 1408 each), the router (60 x 2048), two norms."""
    s = shape("qwen1.5-moe-a2.7b")
    h = 2048
    block = 4 * h * h + 3 * h + 3 * h * 5632 + h + 60 * 3 * h * 1408 + 60 * h + 2 * h
    assert s.block_params() == block
    assert s.params() == 24 * block + 2 * 151936 * h + h == 14_315_784_192
    assert round((s.layers * s.active_params() + s.outside_params()) / 1e9, 1) == 2.7
    groups = s.groups()
    assert groups["mlp.shared_expert.gate_proj"] == h and groups["mlp.experts.59.down_proj"] == 1408
    assert len(groups) == 2 + 2 + 60 * 2


def test_mixtral_experts_are_linears_with_their_own_hessians() -> None:
    s = shape("mixtral-8x7b")
    names = [lin.name for lin in s.linears()]
    assert len(names) == 4 + 8 * 3 and "block_sparse_moe.experts.7.w2" in names
    groups = s.groups()
    assert len(groups) == 2 + 8 * 2 and groups["block_sparse_moe.experts.3.w2"] == 14336
    active = s.layers * s.active_params() + s.outside_params()  # 2 of 8 experts per token: the card's 12.9B active
    assert round(active / 1e9, 1) == 12.9 and s.active_params() < s.block_params() / 3


def test_more_workers_finish_sooner_until_the_block_cannot_be_split_and_cost_follows() -> None:
    s = shape("llama-3-70b")
    sizes = {"tokens": 128 * 2048, "seq_len": 2048, "chunk_tokens": 8 * 2048}
    runs = [estimate(s, PROFILES["h100"], workers=w, **sizes) for w in (1, 2, 4, 8)]
    assert all(a.seconds > b.seconds for a, b in itertools.pairwise(runs))
    for r in runs:
        assert r.cost == pytest.approx(3.0 * r.workers * r.seconds / 3600)
    best = fastest(s, PROFILES["h100"], most=32, **sizes)
    assert best.seconds <= min(r.seconds for r in runs) and best.workers <= 32


def test_lamina_plan_prints_the_estimate_and_refuses_what_cannot_fit(capsys) -> None:
    assert main(["plan", "--config", str(CONFIGS / "llama-3-70b.json"), "--workers", "8"]) == 0
    out = capsys.readouterr().out
    assert "70.55B parameters" in out and "mlp.down_proj Cholesky: float64 damped copy and factor" in out
    args = ["plan", "--config", str(CONFIGS / "llama-3.1-405b.json"), "--device", "a100-40gb", "--workers", "8"]
    assert main([*args, "--solve-device", "gpu"]) == 2
    assert "the largest part is mlp.down_proj Cholesky" in capsys.readouterr().err
    assert main([*args, "--solve-device", "gpu", "--inverse-on-cpu"]) == 0
    assert "mlp.down_proj inverse factor moved to the GPU" in capsys.readouterr().out
    assert main(["plan"]) == 2 and "give a recipe or --config" in capsys.readouterr().err


def test_a_measured_profile_is_saved_and_planned_with_and_a_bad_one_refused(tmp_path, capsys) -> None:
    path = tmp_path / "cpu.json"
    assert main(["bench", "profile", "--size", "256", "--save", str(path)]) == 0
    profile = Profile.from_doc(json.loads(path.read_text()))
    assert profile.gemm > 1e8 and profile.factor > 1e7 and profile.memory > GIB and profile.baseline > 50 * 2**20
    capsys.readouterr()
    assert main(["plan", "--config", str(CONFIGS / "llama-3-8b.json"), "--device", str(path), "--workers", "2"]) == 0
    assert "the worker's runtime (profile baseline)" in capsys.readouterr().out
    (tmp_path / "bad.json").write_text('{"name": "x", "flops": 1}')
    assert main(["plan", "--config", str(CONFIGS / "llama-3-8b.json"), "--device", str(tmp_path / "bad.json")]) == 2
    assert "not a device profile" in capsys.readouterr().err
    assert main(["plan", "--config", str(CONFIGS / "llama-3-8b.json"), "--device", "tpu"]) == 2
    assert "neither a device profile file nor one of h100" in capsys.readouterr().err


def test_the_fixture_workers_peak_is_predicted_within_30_percent(ray_cluster, small_model, small_reference) -> None:
    """The planner's peak for the small recipe on one worker (small_reference: 4 blocks,
    8 x 128 tokens in chunks of one sequence, 512-row pieces) against the peak RSS that
    worker reported. The profile's baseline is measured as `lamina bench profile` does on
    a worker: a fresh runner actor's resident memory before any block."""
    from pipeline.architectures import layout_for
    from workers.actors import block_actor

    config = json.loads((small_model / "config.json").read_text())
    idle = block_actor().options(num_cpus=1).remote(model_uri=str(small_model), layout=layout_for(config), threads=1)
    baseline = ray_cluster.get(idle.peak_rss.remote())
    ray_cluster.kill(idle)
    profile = dataclasses.replace(PROFILES["cpu"], baseline=baseline)
    run = estimate(ModelShape.from_config(config), profile, workers=1, tokens=8 * 128, seq_len=128,
                   chunk_tokens=128, solve_rows=512)  # fmt: skip
    (measured,) = small_reference.worker_peak_rss
    mib = [round(n / 2**20) for n in (baseline, run.worker.peak, measured)]
    print("baseline, predicted and measured peak (MiB):", *mib)
    assert run.worker.peak == pytest.approx(measured, rel=0.3)
    assert run.worker.peak - baseline > 0.3 * (measured - baseline)  # the work itself, not only the runtime
