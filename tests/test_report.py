"""Reports: table, JSON and the quality-vs-bytes plot."""

from __future__ import annotations

import json

from rich.console import Console

from moe_understudy.report import _series, rows_table, write_report


def rows():
    base = dict(
        priority="position",
        batch_size=8,
        perplexity=10.0,
        kl=0.0,
        agreement=1.0,
        frac_expert=1.0,
        frac_understudy=0.0,
        frac_shadow=0.0,
        frac_dropped=0.0,
        frac_tokens_degraded=0.0,
        max_over_mean=2.5,
        max_served_over_mean=2.5,
        understudy_cost=None,
    )
    out = [
        {**base, "policy": "full", "capacity_factor": None, "ppl_delta_pct": 0.0, "bytes_per_token": 900.0}
    ]
    for policy, deltas in (("drop", (190.0, 40.0)), ("understudy", (5.0, 1.0))):
        for cf, delta, b in zip((0.5, 1.0), deltas, (300.0, 600.0), strict=True):
            out.append(
                {
                    **base,
                    "policy": policy,
                    "capacity_factor": cf,
                    "ppl_delta_pct": delta,
                    "bytes_per_token": b,
                }
            )
    return out


def test_one_plot_line_per_policy():
    series = _series(rows())
    assert list(series) == ["full", "drop", "understudy"]
    assert [r["capacity_factor"] for r in series["drop"]] == [0.5, 1.0]


def test_lines_split_by_batch_size_when_it_varies():
    r = rows()
    r[1] = {**r[1], "batch_size": 16}
    assert "drop batch_size=16" in _series(r)


def test_table_shows_every_row_with_signed_delta():
    console = Console(width=200, record=True)
    console.print(rows_table(rows()))
    text = console.export_text()
    assert text.count("│ drop ") == 2 and "+190.00" in text and "understudy" in text


def test_table_shows_the_interval_beside_the_delta_where_a_row_has_one():
    r = rows()
    r[1] = {**r[1], "ppl_delta_ci95": [150.0, 231.5]}
    console = Console(width=240, record=True)
    console.print(rows_table(r))
    assert "+150.00..+231.50" in console.export_text()


def test_write_report_saves_rows_meta_and_png(tmp_path):
    paths = write_report(rows(), tmp_path, meta={"command": "x"})
    data = json.loads(paths["json"].read_text())
    assert data["command"] == "x" and len(data["rows"]) == 5
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
