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


def test_demo_passes_its_device_and_dtype_to_every_stage(tmp_path, monkeypatch):
    from importlib import import_module

    from moe_understudy.config import DemoConfig
    from moe_understudy.demo import run_demo

    seen = {}

    def record(stage, result=None):
        def run(cfg, *args, **kwargs):
            seen[stage] = cfg
            return result

        return run

    # the modules themselves (the package also exports functions named like some of them)
    stages = {
        "teacher": ("moe_understudy.teacher", "train_teacher", None),
        "capture": ("moe_understudy.capture", "run_capture", None),
        "distill": ("moe_understudy.understudy.distill", "run_distill", None),
        "evaluate": ("moe_understudy.eval.quality", "run_evaluation", {"json": "r.json", "png": "r.png"}),
    }
    for stage, (module, name, result) in stages.items():
        monkeypatch.setattr(import_module(module), name, record(stage, result))
    cfg = DemoConfig(out=str(tmp_path / "demo"), quick=True, dtype="bf16", device="auto")
    run_demo(cfg)
    assert seen["teacher"].dtype == "bfloat16" and seen["teacher"].device == "auto"
    assert (seen["capture"].model_dtype, seen["capture"].dtype, seen["capture"].device) == (
        "bfloat16",
        "bfloat16",
        "auto",
    )
    for stage in ("distill", "evaluate"):
        assert (seen[stage].dtype, seen[stage].device) == ("bfloat16", "auto"), stage
    assert DemoConfig.from_yaml(tmp_path / "demo" / "demo.yaml") == cfg


def test_the_demo_teacher_is_the_default_preset_trained_for_the_demos_own_steps():
    from moe_understudy.config import DemoConfig, TeacherConfig
    from moe_understudy.demo import demo_teacher_config

    teacher = demo_teacher_config(DemoConfig(teacher_steps=700))
    assert teacher.steps == 700 and teacher.preset == TeacherConfig().preset
    assert demo_teacher_config(DemoConfig(quick=True, teacher_steps=700)).steps == TeacherConfig.quick().steps
