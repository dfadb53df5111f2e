import json

from typer.testing import CliRunner

from moe_understudy.cli import app


def test_quick_demo_runs_every_stage_and_reuses_them_on_rerun(tmp_path, monkeypatch):
    # The quick teacher reads 400k characters of the stdlib: small, but the real default corpus path.
    runner = CliRunner()
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--quick", "--out", str(out), "--capacity", "0.5,1"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "eval" / "report.json").read_text())
    rows = report["rows"]
    policies = {row["policy"] for row in rows}
    assert {"full", "drop", "expanded_drop", "shadow"} <= policies
    assert all(row["priority"] == "score" for row in rows)
    assert (out / "eval" / "report.png").stat().st_size > 1000
    for stage in ["teacher/config.json", "store/manifest.json", "understudies/config.json"]:
        assert (out / stage).exists(), stage

    again = runner.invoke(app, ["demo", "--quick", "--out", str(out), "--capacity", "1"])
    assert again.exit_code == 0, again.output
    text = " ".join(again.output.split())
    assert (
        "reusing the teacher" in text
        and "reusing the capture store" in text
        and "reusing the understudies" in text
    )
