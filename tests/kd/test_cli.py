"""`understudy sft / kd / rouge` end to end on the quick presets and a tiny instruction file."""

import json
import random

import pytest
from typer.testing import CliRunner

from moe_understudy.cli import app

runner = CliRunner()
WORDS = "red blue green cat dog bird sun moon tree lake".split()
SMALL = "--max-prompt 24 --max-total 40 --max-new-tokens 4 --val-examples 4"


def _write_data(path, seed=0, n=60):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.choice(WORDS), rng.choice(WORDS)
        task = ("copy", "first")[i % 2]
        rows.append(
            {"task": task, "prompt": f"{task} {a} {b}", "response": f"{a} {b}" if task == "copy" else a}
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(command: str):
    """Invoke the CLI with a command line (paths here hold no spaces)."""
    return runner.invoke(app, command.split())


def _ok(command: str):
    result = _run(command)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kdcli")
    data = _write_data(tmp / "data.jsonl")
    out = tmp / "teacher"
    _ok(
        f"sft --data {data} --out {out} --model quick --vocab-size 300 --steps 3 --batch-size 4 --eval-every 3 {SMALL}"
    )
    return out


def _kd(teacher_dir, out, method, extra=""):
    data = teacher_dir.parent / "data.jsonl"
    return (
        f"kd --method {method} --data {data} --teacher {teacher_dir} --out {out} --steps 1 --batch-size 2 "
        f"--gen-max-new-tokens 3 {SMALL} {extra}"
    )


def test_sft_saves_the_model_its_tokenizer_and_a_log(teacher_dir):
    assert (teacher_dir / "model.safetensors").exists() and (teacher_dir / "tokenizer.json").exists()
    log = json.loads((teacher_dir / "sft_log.json").read_text())
    assert len(log["history"]) == 3 and "val_rouge_l" in log["history"][-1]


def test_kd_with_ka_then_rouge_over_two_seeds(teacher_dir, tmp_path):
    student = tmp_path / "ka"
    _ok(_kd(teacher_dir, student, "ka", "--student quick-student --steps 2 --eval-every 2"))
    log = json.loads((student / "kd_log.json").read_text())
    assert log["config"]["method"] == "ka" and len(log["history"]) == 2

    report = tmp_path / "rouge.json"
    data = teacher_dir.parent / "data.jsonl"
    _ok(f"rouge {student} --data {data} --limit 6 --seeds 10,20 --max-new-tokens 4 --out {report}")
    scores = json.loads(report.read_text())["datasets"]["data.jsonl"]
    assert len(scores["per_seed"]) == 2 and set(scores["tasks"]) == {"copy", "first"}
    assert 0.0 <= scores["mean"] <= 100.0


@pytest.mark.parametrize("method", ["kd", "gkd", "all", "sar"])
def test_each_dense_student_method_runs(method, teacher_dir, tmp_path):
    _ok(_kd(teacher_dir, tmp_path / method, method))
    history = json.loads((tmp_path / method / "kd_log.json").read_text())["history"]
    assert ("router_kl" in history[0]) == (method == "sar")


def test_bdistill_logs_its_router_terms_and_refuses_a_dense_student(teacher_dir, tmp_path):
    _ok(_kd(teacher_dir, tmp_path / "b", "bdistill", "--student quick-moe-student"))
    history = json.loads((tmp_path / "b" / "kd_log.json").read_text())["history"]
    assert {"router_kl", "entropy_floor", "distill"} <= set(history[0])
    refused = _run(_kd(teacher_dir, tmp_path / "d", "bdistill", "--student quick-student"))
    assert refused.exit_code == 2 and "MoE student" in refused.output


def test_a_student_with_another_tokenizer_is_refused(teacher_dir, tmp_path):
    other_data = _write_data(tmp_path / "other.jsonl", seed=5)
    other = tmp_path / "other"
    _ok(
        f"sft --data {other_data} --out {other} --model quick-student --vocab-size 280 --steps 1 --batch-size 2 {SMALL}"
    )
    result = _run(_kd(teacher_dir, tmp_path / "x", "kd", f"--student {other}"))
    assert result.exit_code == 2 and "different tokenizer" in result.output


def test_bad_options_are_one_sentence_errors(teacher_dir, tmp_path):
    bad_method = _run(_kd(teacher_dir, tmp_path / "y", "magic"))
    assert bad_method.exit_code == 2 and "method must be one of" in bad_method.output
    bad_seeds = _run(f"rouge {teacher_dir} --data {teacher_dir.parent / 'data.jsonl'} --seeds a,b")
    assert bad_seeds.exit_code == 2 and "--seeds" in bad_seeds.output


def test_kd_help_states_the_sar_kl_direction_and_the_b_distill_provenance():
    result = runner.invoke(app, ["kd", "--help"], env={"COLUMNS": "400", "TERM": "dumb"})
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.replace("│", " ").split())
    assert "KL(teacher || student)" in text and "finetune_sfr.py" in text
    assert "our formulation from B-Distill's public abstract" in text
    assert "averaged into one update" in text
