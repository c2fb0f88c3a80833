"""eval_report.render: eval.json, eval.md and the PNG plots, from hand-made results (no model, no Ray)."""

from __future__ import annotations

import copy
import io
import json

import pytest
from PIL import Image

from pipeline.eval_report import GATE_LABELS, render

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.down_proj")


def _context(window: int, ppl: float, ref_ppl: float) -> dict:
    return {
        "window": window,
        "windows": 16384 // window,
        "tokens": 16368,
        "perplexity": ppl,
        "nll": 2.611,
        "reference": {"perplexity": ref_ppl, "nll": 2.451},
        "ppl_increase": ppl / ref_ppl - 1,
        "kl": 0.121,
        "top1": 0.912,
        "rare_nll_increase": 0.41,
    }


def _gate(limit: float, value: float, passed: bool) -> dict:
    return {"limit": limit, "value": value, "passed": passed}


def quantized_result() -> dict:
    long = _context(8192, 12.345678, 11.0)
    long.update(kl=None, top1=None, rare_nll_increase=None)  # "–" cells
    return {
        "format": "lamina-eval/1",
        "model": "s3://reg/smollm2/w4g64",
        "against": "file:///models/smollm2",
        "kernel": "cpu",
        "data": {"source": "file:///docs/tutorial", "glob": "*.rst.txt", "tokens": 16384},
        "contexts": [_context(1024, 13.61, 11.60), long],
        "position": {
            "window": 8192,
            "bucket": 512,
            "start": list(range(0, 8192, 512)),
            "nll_increase": [0.12 + 0.002 * i for i in range(16)],
        },
        "calibration": {"files_shared": 0, "ngram": 32, "ngram_overlap": 0.0012},
        "gates": {
            "max_ppl_increase": _gate(0.03, 0.1733, False),
            "max_kl": _gate(0.2, 0.121, True),
            "min_top1": _gate(0.9, 0.912, True),
            "max_rare_nll_increase": _gate(0.5, 0.41, True),
        },
        "reference_cache": "hit",
        "seconds": 61.2,
    }


def source_result() -> dict:
    """An unquantized model evaluated alone: one context, no reference, no gates, no position."""
    ctx = {
        "window": 2048,
        "windows": 8,
        "tokens": 16376,
        "perplexity": 11.6,
        "nll": 2.451,
        "reference": None,
        "ppl_increase": None,
        "kl": None,
        "top1": None,
        "rare_nll_increase": None,
    }
    return {
        "format": "lamina-eval/1",
        "model": "file:///models/smollm2",
        "against": None,
        "kernel": "none",
        "data": {"source": "file:///docs/tutorial", "glob": "*.rst.txt", "tokens": 16384},
        "contexts": [ctx],
        "position": None,
        "calibration": None,
        "gates": None,
        "reference_cache": None,
        "seconds": 12.0,
    }


def block_events(n_blocks: int = 8) -> list[dict]:
    """A run log whose block b has errors growing with b, so the last blocks are the worst."""
    events: list[dict] = [{"event": "run_started"}]
    for b in range(n_blocks):
        error = {name: 0.001 * (b + 1) * (i + 1) for i, name in enumerate(LINEARS)}
        events += [{"event": "block_started", "block": b}, {"event": "block_finished", "block": b, "error": error}]
    return events


def _md(files: dict[str, bytes]) -> str:
    return files["eval.md"].decode("utf-8")


def _top_blocks(md: str) -> list[int]:
    """The block column of the top-5 table in eval.md."""
    section = md.split("## Quantization error by block", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and line[2].isdigit()]
    return [int(row.split("|")[1]) for row in rows]


@pytest.fixture(scope="module")
def files() -> dict[str, bytes]:
    return render(quantized_result(), block_events())


def test_files_present(files: dict[str, bytes]) -> None:
    assert set(files) == {"eval.json", "eval.md", "eval-block-error.png", "eval-position.png"}


def test_json_round_trips(files: dict[str, bytes]) -> None:
    text = files["eval.json"].decode("utf-8")
    assert json.loads(text) == quantized_result()
    assert text == json.dumps(quantized_result(), indent=2, sort_keys=True) + "\n"


def test_md_context_table(files: dict[str, bytes]) -> None:
    md = _md(files)
    assert md.startswith("# Evaluation of `s3://reg/smollm2/w4g64`")
    assert "`file:///models/smollm2`" in md and "kernel `cpu`" in md and "16,384 tokens" in md
    rows = [line for line in md.splitlines() if line.startswith("| 1,024 ") or line.startswith("| 8,192 ")]
    assert len(rows) == 2
    assert "| 13.610 | 11.600 | +17.33% | 0.1210 | 91.20% | +0.410 |" in rows[0]
    assert "| 12.346 | 11.000 | +12.23% | – | – | – |" in rows[1]


def test_md_gates_and_failing_verdict(files: dict[str, bytes]) -> None:
    md = _md(files)
    assert "## Release gates" in md
    gate_lines = {line for line in md.splitlines() if line.startswith("- ")}
    assert "- Perplexity increase 17.33% (limit ≤ 3.00%) — **FAIL**" in gate_lines
    assert "- KL divergence 0.1210 nats (limit ≤ 0.2000 nats) — PASS" in gate_lines
    assert "- Top-1 agreement 91.20% (limit ≥ 90.00%) — PASS" in gate_lines
    assert "- Rare-decile NLL increase 0.410 nats (limit ≤ 0.500 nats) — PASS" in gate_lines
    assert "**Verdict: FAILED: Perplexity increase 17.33% (limit ≤ 3.00%)**" in md
    assert "Calibration overlap: 0 eval file(s)" in md and "0.12% of 32-token n-grams" in md


def test_md_verdict_all_passed() -> None:
    result = quantized_result()
    result["gates"]["max_ppl_increase"] = _gate(0.2, 0.1733, True)
    md = _md(render(result, []))
    assert "**Verdict: all gates passed**" in md and "FAIL" not in md


def test_md_verdict_names_every_failing_gate() -> None:
    result = quantized_result()
    result["gates"]["min_top1"] = _gate(0.95, 0.912, False)
    verdict = next(line for line in _md(render(result, [])).splitlines() if line.startswith("**Verdict"))
    assert "Perplexity increase 17.33% (limit ≤ 3.00%)" in verdict
    assert "Top-1 agreement 91.20% (limit ≥ 95.00%)" in verdict
    assert "KL divergence" not in verdict


def test_gate_labels_cover_gate_names() -> None:
    from pipeline.recipe import Gates

    assert set(GATE_LABELS) == set(Gates.model_fields) >= set(quantized_result()["gates"])
    assert all(label.strip() for label in GATE_LABELS.values())


@pytest.mark.parametrize("name", ["eval-block-error.png", "eval-position.png"])
def test_png_decodes_at_800x400(files: dict[str, bytes], name: str) -> None:
    data = files[name]
    assert data.startswith(PNG_SIGNATURE)
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        assert im.size == (800, 400)
        assert "Software" not in im.info


def test_md_links_the_plots(files: dict[str, bytes]) -> None:
    md = _md(files)
    assert "](eval-block-error.png)" in md
    assert "## NLL increase by context position" in md and "](eval-position.png)" in md


def test_render_is_deterministic_and_pure() -> None:
    result, events = quantized_result(), block_events()
    before = copy.deepcopy((result, events))
    assert render(result, events) == render(copy.deepcopy(result), copy.deepcopy(events))
    assert (result, events) == before


def test_no_errors_no_block_plot() -> None:
    events = [{k: v for k, v in e.items() if k != "error"} for e in block_events()]
    events.append({"event": "error", "error": "worker lost"})  # an error event, not per-block errors
    files = render(quantized_result(), events)
    assert "eval-block-error.png" not in files
    md = _md(files)
    assert "holds no per-block errors" in md and "eval-block-error.png" not in md


def test_top_blocks_by_mean_error(files: dict[str, bytes]) -> None:
    assert _top_blocks(_md(files)) == [7, 6, 5, 4, 3]


def test_last_event_of_a_retried_block_wins() -> None:
    events = block_events()
    # Block 0 is retried: its first attempt was terrible, the retry is the best block of the run;
    # block 2 is retried the other way round and becomes the worst.
    events.insert(1, {"event": "block_finished", "block": 0, "error": dict.fromkeys(LINEARS, 9.0)})
    events.append({"event": "block_finished", "block": 2, "error": dict.fromkeys(LINEARS, 5.0)})
    md = _md(render(quantized_result(), events))
    assert _top_blocks(md) == [2, 7, 6, 5, 4]
    assert "| 2 | 5.00 |" in md and "| 9 |" not in md and "| 0 |" not in md


def test_unquantized_model_alone() -> None:
    files = render(source_result(), [])
    assert set(files) == {"eval.json", "eval.md"}
    md = _md(files)
    assert "alone (no reference model)" in md and "kernel `none`" in md
    assert "| 2,048 | 11.600 | – | – | – | – | – |" in md
    assert "Release gates" not in md and "Verdict" not in md
    assert "context position" not in md and "eval-position.png" not in md
    assert json.loads(files["eval.json"]) == source_result()
