"""Reports of quality under load: a rich table, a JSON file, and a PNG of quality against bytes moved.

Rows are the dicts `eval.quality.evaluate_policies` returns (one per policy and capacity factor).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

_COLUMNS = [
    # (row key, header, format)
    ("policy", "policy", "{}"),
    ("capacity_factor", "cf", "{:g}"),
    ("perplexity", "ppl", "{:.3f}"),
    ("ppl_delta_pct", "Δppl %", "{:+.2f}"),
    ("ppl_delta_ci95", "95% interval", "{0[0]:+.2f}..{0[1]:+.2f}"),  # paired bootstrap over batches
    ("kl", "KL/token", "{:.4f}"),
    ("agreement", "top-1 agree", "{:.3f}"),
    ("frac_tokens_degraded", "tok degraded", "{:.3f}"),
    ("frac_dropped", "asg dropped", "{:.3f}"),
    ("frac_understudy", "asg understudy", "{:.3f}"),
    ("frac_shadow", "asg shadow", "{:.3f}"),
    ("bytes_per_token", "bytes/tok", "{:,.0f}"),
    ("max_over_mean", "max/mean load", "{:.2f}"),
    ("max_served_over_mean", "max/mean served", "{:.2f}"),
]


def _cell(value: Any, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def rows_table(rows: list[dict[str, Any]], title: str = "quality under load") -> Table:
    """A rich table of `rows`; batch size and scenario columns appear only when they vary."""
    extra = [k for k in ("scenario", "batch_size") if len({r.get(k) for r in rows}) > 1]
    table = Table(title=title)
    for key in extra:
        table.add_column(key)
    for _, header, _ in _COLUMNS:
        table.add_column(header, justify="left" if header == "policy" else "right")
    for r in rows:
        table.add_row(*[str(r.get(k)) for k in extra], *[_cell(r.get(k), fmt) for k, _, fmt in _COLUMNS])
    return table


def print_table(
    rows: list[dict[str, Any]], console: Console | None = None, title: str = "quality under load"
) -> None:
    console = console or Console()
    # A piped console is 80 wide and would squeeze fifteen columns into ellipses.
    width = console.width
    console.width = max(width, 200)
    try:
        console.print(rows_table(rows, title))
    finally:
        console.width = width


def _series(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Rows grouped into one line per policy (and per scenario / batch size when those vary)."""
    vary = [k for k in ("scenario", "batch_size") if len({r.get(k) for r in rows}) > 1]
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        label = " ".join([r["policy"], *[f"{k}={r.get(k)}" for k in vary]])
        out.setdefault(label, []).append(r)
    return out


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    """Write `fig` as a PNG at `path` (folders created), close it, return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    return path


def plot_quality_vs_bytes(
    rows: list[dict[str, Any]], path: str | Path, title: str = "quality under load"
) -> Path:
    """PNG: perplexity change vs full (y) against all-to-all bytes per token (x), one line per policy."""
    plt = pyplot()

    lines = _series(rows)
    fig, ax = plt.subplots(figsize=(11, 6))
    colours = plt.get_cmap("tab20" if len(lines) > 10 else "tab10")
    for i, (label, series) in enumerate(lines.items()):
        series = sorted(series, key=lambda r: r["bytes_per_token"])
        xs = [r["bytes_per_token"] for r in series]
        ys = [r["ppl_delta_pct"] for r in series]
        marker = "*" if label.startswith("full") else "o"
        ax.plot(
            xs,
            ys,
            marker=marker,
            markersize=12 if marker == "*" else 5,
            label=label,
            color=colours(i % colours.N),
        )
        for r in series:
            if r.get("capacity_factor") is not None:
                ax.annotate(
                    f"{r['capacity_factor']:g}",
                    (r["bytes_per_token"], r["ppl_delta_pct"]),
                    fontsize=7,
                    textcoords="offset points",
                    xytext=(3, 3),
                )
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_xlabel("all-to-all bytes per token (dispatch + combine, all MoE layers)")
    ax.set_ylabel("perplexity change vs full (%)")
    ax.set_title(f"{title}\n(labels: capacity factor)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: the lines stay visible
    fig.tight_layout()
    return save_figure(fig, path)


def write_report(
    rows: list[dict[str, Any]],
    out_dir: str | Path,
    meta: dict[str, Any] | None = None,
    title: str = "quality under load",
) -> dict[str, Path]:
    """report.json (rows + meta) and report.png in `out_dir`; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "report.json"
    json_path.write_text(json.dumps({**(meta or {}), "rows": rows}, indent=2, default=str))
    png = plot_quality_vs_bytes(rows, out / "report.png", title)
    return {"json": json_path, "png": png}
