import json
import sysconfig
from pathlib import Path

from typer.testing import CliRunner

from moe_understudy.cli import app

runner = CliRunner()


def text(result) -> str:
    """Output with rich's line wrapping undone."""
    return " ".join(result.output.split())


def small_corpus(root: Path) -> Path:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ["textwrap.py", "bisect.py", "heapq.py", "colorsys.py", "shlex.py"]:
        (root / name).write_text((stdlib / name).read_text())
    return root


def test_teacher_quick_then_inspect_prints_load_and_writes_heatmap(tmp_path):
    (tmp_path / "corpus").mkdir()
    data = small_corpus(tmp_path / "corpus")
    out = tmp_path / "teacher"
    result = runner.invoke(
        app,
        [
            "teacher",
            "--quick",
            "--out",
            str(out),
            "--data",
            str(data),
            "--steps",
            "12",
            "--vocab-size",
            "300",
            "--block-size",
            "32",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "held-out perplexity" in text(result)
    assert (out / "config.json").exists() and (out / "teacher.yaml").exists()

    heatmap, figures = tmp_path / "load.png", tmp_path / "load.json"
    result = runner.invoke(
        app,
        [
            "inspect",
            str(out),
            "--data",
            str(data),
            "--blocks",
            "8",
            "--block-size",
            "32",
            "--batch-size",
            "4",
            "--heatmap",
            str(heatmap),
            "--json",
            str(figures),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "max/mean" in text(result)
    assert heatmap.stat().st_size > 1000
    load = json.loads(figures.read_text())
    assert sum(load["tokens_per_expert"][0]) == 8 * 32 * 2  # every token of every block, top-2


def test_teacher_into_an_existing_run_without_resume_is_one_clear_error(tmp_path):
    data = small_corpus(tmp_path)
    out = tmp_path / "teacher"
    args = [
        "teacher",
        "--quick",
        "--out",
        str(out),
        "--data",
        str(data),
        "--steps",
        "4",
        "--vocab-size",
        "300",
        "--block-size",
        "32",
    ]
    assert runner.invoke(app, args).exit_code == 0
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert "--resume" in text(result)
    assert "Traceback" not in result.output


def test_inspect_of_a_missing_model_names_the_fix(tmp_path):
    result = runner.invoke(app, ["inspect", str(tmp_path / "missing"), "--data", str(tmp_path)])
    assert result.exit_code == 2
    assert "understudy teacher" in text(result)


def test_help_lists_the_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ["teacher", "inspect"]:
        assert command in result.output
