"""Render an evaluation result as eval.json, eval.md and PNG plots.

`render` only turns a result dict (the `lamina-eval/1` JSON form) and the quantization run's
event log into file bytes; the caller writes them next to the artifact. matplotlib is imported
inside the plot functions, so importing this module costs nothing.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

GATE_LABELS: dict[str, str] = {
    "max_ppl_increase": "Perplexity increase",
    "max_kl": "KL divergence",
    "min_top1": "Top-1 agreement",
    "max_rare_nll_increase": "Rare-decile NLL increase",
    "max_long_ppl_increase": "Long-context perplexity increase",
}

DASH = "–"
BLOCK_PNG = "eval-block-error.png"
POSITION_PNG = "eval-position.png"
FIGSIZE = (8.0, 4.0)  # inches; at DPI this gives 800x400 pixels
DPI = 100
TOP_BLOCKS = 5


def render(result: dict, events: list[dict]) -> dict[str, bytes]:
    """File name -> bytes for one evaluation: eval.json, eval.md, and the plots that have data.

    The block-error plot is drawn only when some block_finished event carries per-linear
    errors; the position plot only when `result["position"]` is not None.
    """
    errors = block_errors(events)
    files = {
        "eval.json": (json.dumps(result, indent=2, sort_keys=True) + "\n").encode("utf-8"),
        "eval.md": markdown(result, errors).encode("utf-8"),
    }
    if errors:
        files[BLOCK_PNG] = block_error_png(errors)
    if result.get("position") is not None:
        files[POSITION_PNG] = position_png(result["position"])
    return files


def block_errors(events: list[dict]) -> dict[int, dict[str, float]]:
    """Block index -> {linear name: relative error}, from the last block_finished event of each
    block (a retried or resumed run may finish a block twice); blocks without errors are left out."""
    last: dict[int, dict] = {}
    for e in events:
        if e.get("event") == "block_finished":
            last[int(e["block"])] = e
    return {b: dict(e["error"]) for b, e in sorted(last.items()) if isinstance(e.get("error"), dict) and e["error"]}


# ---- number formats -------------------------------------------------------------------------


def _num(x: float | None, digits: int) -> str:
    return DASH if x is None else f"{x:.{digits}f}"


def _signed(x: float | None, digits: int) -> str:
    return DASH if x is None else f"{x:+.{digits}f}"


def _pct(x: float | None, digits: int = 2, sign: bool = False) -> str:
    if x is None:
        return DASH
    return f"{x:+.{digits}%}" if sign else f"{x:.{digits}%}"


def _err(x: float) -> str:
    return f"{x:#.3g}"


def _nats(x: float | None, digits: int) -> str:
    return DASH if x is None else f"{x:.{digits}f} nats"


GATE_FORMATS: dict[str, Callable[[float | None], str]] = {
    "max_ppl_increase": _pct,
    "max_kl": lambda x: _nats(x, 4),
    "min_top1": _pct,
    "max_rare_nll_increase": lambda x: _nats(x, 3),
    "max_long_ppl_increase": _pct,
}


def _gate_value(name: str, x: float | None) -> str:
    if name in GATE_FORMATS:
        return GATE_FORMATS[name](x)
    return DASH if x is None else f"{x:.4g}"


# ---- eval.md --------------------------------------------------------------------------------


def markdown(result: dict, errors: dict[int, dict[str, float]]) -> str:
    """The whole eval.md: header, context table, gates, calibration overlap, plots."""
    parts = [_header(result), _context_table(result["contexts"])]
    if result.get("gates") is not None:
        parts.append(_gates_section(result["gates"]))
    if result.get("calibration") is not None:
        parts.append(_calibration_line(result["calibration"]))
    parts.append(_blocks_section(errors))
    if result.get("position") is not None:
        parts.append(_position_section(result["position"]))
    return "\n\n".join(parts) + "\n"


def _header(result: dict) -> str:
    data = result["data"]
    against = f"against `{result['against']}`" if result.get("against") else "alone (no reference model)"
    text = f"`{data['source']}`" + (f" (`{data['glob']}`)" if data.get("glob") else "")
    line = f"Evaluated {against} · kernel `{result['kernel']}` · text {text}, {data['tokens']:,} tokens"
    if result.get("reference_cache"):
        line += f" · reference cache {result['reference_cache']}"
    if result.get("seconds") is not None:
        line += f" · {result['seconds']:.1f} s"
    return f"# Evaluation of `{result['model']}`\n\n{line}"


def _context_table(contexts: list[dict]) -> str:
    head = "| Context | Perplexity | Reference | Increase | KL (nats) | Top-1 | Rare-decile ΔNLL (nats) |"
    rows = [head, "|---:|---:|---:|---:|---:|---:|---:|"]
    rows += [_context_row(c) for c in contexts]
    return "\n".join(rows)


def _context_row(c: dict) -> str:
    ref = c.get("reference") or {}
    cells = [
        f"{c['window']:,}",
        _num(c["perplexity"], 3),
        _num(ref.get("perplexity"), 3),
        _pct(c.get("ppl_increase"), sign=True),
        _num(c.get("kl"), 4),
        _pct(c.get("top1")),
        _signed(c.get("rare_nll_increase"), 3),
    ]
    return "| " + " | ".join(cells) + " |"


def _gate_limit(name: str, limit: float) -> str:
    bound = "≥" if name.startswith("min_") else "≤"
    return f"{bound} {_gate_value(name, limit)}"


def _gate_text(name: str, gate: dict) -> str:
    """'Label value (limit ≤ x)' for one gate."""
    label = GATE_LABELS.get(name, name)
    return f"{label} {_gate_value(name, gate.get('value'))} (limit {_gate_limit(name, gate['limit'])})"


def _gates_section(gates: dict[str, dict]) -> str:
    lines = ["## Release gates", ""]
    if not gates:
        return "\n".join([*lines, "No gates were set."])
    for name, gate in gates.items():
        lines.append(f"- {_gate_text(name, gate)} — {'PASS' if gate.get('passed') else '**FAIL**'}")
    lines += ["", _verdict(gates)]
    return "\n".join(lines)


def _verdict(gates: dict[str, dict]) -> str:
    failed = [_gate_text(n, g) for n, g in gates.items() if not g.get("passed")]
    return "**Verdict: all gates passed**" if not failed else "**Verdict: FAILED: " + "; ".join(failed) + "**"


def _calibration_line(cal: dict) -> str:
    return (
        f"Calibration overlap: {cal['files_shared']} eval file(s) also in the calibration set; "
        f"{_pct(cal['ngram_overlap'])} of {cal['ngram']}-token n-grams shared."
    )


def _blocks_section(errors: dict[int, dict[str, float]]) -> str:
    title = "## Quantization error by block"
    if not errors:
        return f"{title}\n\nThe run's event log holds no per-block errors, so there is no plot."
    rows = [
        f"![Hessian-weighted relative error by block and linear]({BLOCK_PNG})",
        "",
        f"Largest mean relative error (tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)), {len(errors)} blocks:",
        "",
        "| Block | Mean error | Worst linear | Its error |",
        "|---:|---:|---|---:|",
    ]
    for block, errs in _worst_blocks(errors, TOP_BLOCKS):
        worst = max(errs, key=errs.__getitem__)
        rows.append(f"| {block} | {_err(_mean(errs.values()))} | `{worst}` | {_err(errs[worst])} |")
    return title + "\n\n" + "\n".join(rows)


def _mean(values: Iterable[float]) -> float:
    vals = list(values)
    return sum(vals) / len(vals)


def _worst_blocks(errors: dict[int, dict[str, float]], n: int) -> list[tuple[int, dict[str, float]]]:
    """The n blocks with the largest mean error, largest first (ties by block index)."""
    return sorted(errors.items(), key=lambda kv: (-_mean(kv[1].values()), kv[0]))[:n]


def _position_section(position: dict) -> str:
    inc = position["nll_increase"]
    line = (
        f"Window {position['window']:,} tokens in buckets of {position['bucket']:,}; NLL increase "
        f"{_signed(inc[0], 3)} nats in the first bucket, {_signed(inc[-1], 3)} in the last."
        if inc
        else f"Window {position['window']:,} tokens; no buckets."
    )
    return f"## NLL increase by context position\n\n![NLL increase by context position]({POSITION_PNG})\n\n{line}"


# ---- plots ----------------------------------------------------------------------------------


def _figure() -> tuple[Figure, Axes]:
    """A fresh Agg figure and its axes, outside pyplot's global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _png(fig: Figure) -> bytes:
    """PNG bytes at exactly FIGSIZE * DPI pixels, without the version string in the metadata."""
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def block_error_png(errors: dict[int, dict[str, float]]) -> bytes:
    """One line per linear name over block index (log y), the mean across linears in bold black."""
    from matplotlib.ticker import MaxNLocator

    fig, ax = _figure()
    blocks = sorted(errors)
    names = sorted({name for errs in errors.values() for name in errs})
    for name in names:
        ax.plot(blocks, [errors[b].get(name, math.nan) for b in blocks], marker=".", linewidth=1, label=name)
    ax.plot(blocks, [_mean(errors[b].values()) for b in blocks], color="black", linewidth=2.5, label="mean")
    if any(v > 0 for errs in errors.values() for v in errs.values()):
        ax.set_yscale("log", nonpositive="mask")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("block")
    ax.set_ylabel("relative error")
    ax.set_title("Hessian-weighted relative quantization error")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize="x-small", ncol=2, loc="best")
    return _png(fig)


def position_png(position: dict) -> bytes:
    """NLL increase (nats) over token position (bucket start), with a line at zero."""
    fig, ax = _figure()
    ax.plot(position["start"], position["nll_increase"], marker=".", linewidth=1.5)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xlabel("token position (bucket start)")
    ax.set_ylabel("NLL increase (nats)")
    ax.set_title(f"NLL increase by position, window {position['window']:,}, buckets of {position['bucket']:,}")
    ax.grid(True, alpha=0.3)
    return _png(fig)
