"""Distributed evaluation against the source: the same numbers on 1 and 2 workers, KL 0 and
top-1 1 for the source against itself, a cached reference pass, the held-out check, and
the calibration QA that runs before any compute. On the 4-block copy of the fixture model
and its 4-bit artifact (tests/conftest.py), with the real tutorial text."""

from __future__ import annotations

import json
import logging
import math
import shutil

import numpy as np
import pytest
import torch

from pipeline.errors import LaminaError
from pipeline.evaluate import evaluate
from pipeline.plan import make_plan
from pipeline.recipe import Calibration, EvalData, Resources, parse
from tests.conftest import DOCS, small_recipe_doc
from workers.block import kl_and_top1, token_scores

TUTORIAL = {"source": str(DOCS / "tutorial"), "glob": "*.rst.txt"}
DATA = EvalData(**TUTORIAL, tokens=512, window=64, long_window=256)
ONE, TWO = Resources(workers=1), Resources(workers=2, cpus_per_worker=1)


def numbers(result) -> list[tuple]:
    return [
        (c.window, c.windows, c.tokens, c.perplexity, c.reference["perplexity"], c.kl, c.top1, c.rare_nll_increase)
        for c in result.contexts
    ] + [tuple(result.position["nll_increase"])]


@pytest.fixture(scope="module")
def evals(ray_cluster, small_reference, small_model, tmp_path_factory):
    """The 4-block artifact against its source on 1 and 2 workers (each computing the
    reference pass into a cache of its own), again on 1 worker from the first cache, and
    the source against itself."""
    tmp = tmp_path_factory.mktemp("evals")
    artifact, source = small_reference.output, str(small_model)
    run = {
        "one": evaluate(artifact, DATA, ONE, against=source, cache_uri=str(tmp / "c1"), progress=False),
        "two": evaluate(artifact, DATA, TWO, against=source, cache_uri=str(tmp / "c2"), progress=False),
        "cached": evaluate(artifact, DATA, ONE, against=source, cache_uri=str(tmp / "c1"), progress=False),
        "self": evaluate(source, DATA, TWO, against=source, cache_uri=str(tmp / "c3"), progress=False),
    }
    return run


def test_one_and_two_workers_give_the_same_numbers(evals) -> None:
    one, two = numbers(evals["one"]), numbers(evals["two"])
    assert [c.window for c in evals["one"].contexts] == [64, 256]
    assert [c.tokens for c in evals["one"].contexts] == [8 * 63, 2 * 255]
    for a, b in zip(one, two, strict=True):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-9)


def test_the_reference_pass_is_cached_by_source_and_tokens(evals, tmp_path) -> None:
    assert evals["one"].reference_cache == "computed" and evals["cached"].reference_cache == "hit"
    for a, b in zip(numbers(evals["cached"]), numbers(evals["one"]), strict=True):
        assert a == pytest.approx(b, rel=1e-9)


def test_the_source_against_itself_has_kl_0_and_top1_1(evals) -> None:
    for c in evals["self"].contexts:
        assert c.kl == pytest.approx(0, abs=1e-9) and c.top1 == 1.0
        assert c.ppl_increase == pytest.approx(0, abs=1e-12) and c.rare_nll_increase == pytest.approx(0, abs=1e-12)
    assert evals["self"].kernel == "none"


def test_the_quantized_model_measurably_differs_from_its_source(evals) -> None:
    result = evals["one"]
    assert result.kernel == "cpu"
    for c in result.contexts:
        assert c.kl > 1e-3 and 0.5 < c.top1 < 1.0
        # (the 4-block cut of the model predicts badly either way: its perplexity may go either way)
        assert abs(c.ppl_increase) > 1e-3
        assert c.rare_nll_increase != pytest.approx(c.nll - c.reference["nll"], rel=1e-3)  # a subset, not the mean
    position = result.position
    assert position["window"] == 256 and len(position["start"]) == len(position["nll_increase"]) == 32


def test_topk_kl_is_a_lower_bound_close_to_the_exact_kl() -> None:
    """KL over the reference's top k tokens plus the tail's mass never exceeds the KL over
    the whole vocabulary, and is close to it once k holds most of the mass."""
    g = torch.Generator().manual_seed(0)
    ref_logits = torch.randn(50, 4000, generator=g) * 3  # [rows, vocab]
    q_logits = ref_logits + torch.randn(50, 4000, generator=g) * 0.3
    ref, q = torch.log_softmax(ref_logits, -1), torch.log_softmax(q_logits, -1)
    target = torch.randint(0, 4000, (50,), generator=g)
    exact, _ = kl_and_top1(q, token_scores(ref, target, top_k=0, reference=None))
    coarse = {k: kl_and_top1(q, token_scores(ref, target, top_k=k, reference=None))[0] for k in (16, 256, 2048)}
    for kl in coarse.values():
        assert np.all(kl <= exact + 1e-9) and np.all(kl >= 0)
    assert coarse[16].mean() < coarse[256].mean() < coarse[2048].mean()
    assert coarse[2048].mean() == pytest.approx(exact.mean(), rel=0.05)


def test_a_long_window_longer_than_the_eval_tokens_is_refused(small_reference) -> None:
    data = DATA.model_copy(update={"long_window": 1024})
    with pytest.raises(LaminaError, match=r"eval.long_window: 1024 is longer than eval.tokens \(512\)"):
        evaluate(small_reference.output, data, ONE, progress=False)


def test_eval_text_that_is_not_held_out_is_refused_before_any_worker(small_reference, tmp_path) -> None:
    same = Calibration(**TUTORIAL, samples=2, seq_len=64)
    with pytest.raises(LaminaError, match=r"eval and calibration share \d+ file\(s\), e.g. .*tutorial/.*held out"):
        evaluate(small_reference.output, DATA, ONE, calibration=same, progress=False)
    copied = tmp_path / "copied"
    shutil.copytree(DOCS / "tutorial", copied)  # other files, the same text
    renamed = Calibration(source=str(copied), glob="*.rst.txt", samples=4, seq_len=256)
    with pytest.raises(LaminaError, match=r"eval text is not held out: \d+\.\d% of its 32-token spans occur"):
        evaluate(small_reference.output, DATA, ONE, calibration=renamed, progress=False)


def test_held_out_eval_records_its_overlap(evals, small_reference) -> None:
    library = Calibration(source=str(DOCS / "library"), glob="*.rst.txt", samples=8, seq_len=128)
    data = DATA.model_copy(update={"long_window": 64})
    result = evaluate(small_reference.output, data, ONE, calibration=library, progress=False)
    assert result.calibration["files_shared"] == 0 and result.calibration["ngram_overlap"] < 0.01
    assert [c.window for c in result.contexts] == [64] and result.position is None and result.contexts[0].kl is None
    assert result.perplexity == pytest.approx(evals["one"].contexts[0].perplexity, rel=1e-9)


# ---- calibration QA, before any compute -----------------------------------------------------
def test_a_calibration_source_shorter_than_requested_is_refused(small_model, tmp_path) -> None:
    doc = small_recipe_doc(tmp_path, small_model, calibration={**TUTORIAL, "samples": 4096, "seq_len": 512})
    with pytest.raises(LaminaError, match=r"calibration: .*tutorial \(\*\.rst\.txt\) holds \d+ tokens, 2097152 are"):
        make_plan(parse(doc))
    assert not (tmp_path / "artifact").exists()


def test_a_calibration_set_of_duplicates_is_refused(small_model, tmp_path) -> None:
    text = tmp_path / "same.txt"
    text.write_text("The same sentence, again and again. " * 2000)
    doc = small_recipe_doc(tmp_path, small_model, calibration={"source": str(text), "samples": 8, "seq_len": 64})
    with pytest.raises(LaminaError, match=r"calibration: \d+% of the 8 sequences of 64 tokens repeat another"):
        make_plan(parse(doc))


def test_calibration_and_eval_from_one_source_warn_and_shared_files_refuse(small_model, tmp_path, caplog) -> None:
    docs = str(DOCS)
    cal = {"source": docs, "glob": "library/*.rst.txt", "samples": 4, "seq_len": 64}
    doc = small_recipe_doc(tmp_path, small_model, calibration=cal)
    doc["eval"] = {"source": docs, "glob": "tutorial/*.rst.txt"}
    with caplog.at_level(logging.WARNING, logger="pipeline.plan"):
        plan = make_plan(parse(doc))
    assert "calibration and eval read the same source" in caplog.text
    assert plan.calibration_qa == {
        "requested_tokens": 256,
        "tokens": 256,
        "duplicate_ratio": 0.0,
        "same_source": True,
    }
    doc["eval"] = {"source": docs, "glob": "*/*.rst.txt"}
    with pytest.raises(LaminaError, match=r"calibration and eval share \d+ file\(s\)"):
        make_plan(parse(doc))
    assert math.isfinite(plan.calibration.sum())


def test_lamina_eval_prints_the_scores_and_writes_the_report(small_reference, small_model, tmp_path, capsys) -> None:
    from pipeline.cli import main

    report = tmp_path / "report"
    args = ["eval", small_reference.output, "--against", str(small_model), "--data", TUTORIAL["source"]]
    args += ["--glob", "*.rst.txt", "--tokens", "256", "--window", "64", "--long-window", "128", "--workers", "1"]
    assert main(["-q", *args, "--report", str(report)]) == 0
    out = capsys.readouterr().out
    assert "window 64" in out and "window 128" in out and "KL " in out and "top-1 " in out
    assert sorted(p.name for p in report.iterdir()) == [
        "eval-block-error.png",
        "eval-position.png",
        "eval.json",
        "eval.md",
    ]
    doc = json.loads((report / "eval.json").read_text())
    assert doc["format"] == "lamina-eval/1" and [c["window"] for c in doc["contexts"]] == [64, 128]
    # the artifact's recipe calibrated on library/: the eval text was checked to be held out from it
    assert doc["calibration"]["files_shared"] == 0 and doc["calibration"]["ngram_overlap"] < 0.01
    assert "![NLL increase by context position](eval-position.png)" in (report / "eval.md").read_text()
