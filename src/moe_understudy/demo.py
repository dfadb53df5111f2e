"""`understudy demo`: the main job end to end on the embedded default, each stage reused once done.

teacher (train, resume, or reuse) -> capture -> layer-wise (+ optional end-to-end) distillation of
the gated trunk -> quality under load beside score-priority token drop and expanded drop -> report
(table, JSON, plot). A rerun after an
interruption picks up where the last finished stage left off. `device` and `dtype` go to every
stage: the teacher trains on the device under autocast to the dtype (fp32 weights), capture runs
the model in the dtype and stores it (as `capture --dtype` does), distillation and the evaluation
run the model in it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.rule import Rule

from moe_understudy.config import (
    CaptureConfig,
    DemoConfig,
    DistillConfig,
    EndToEndConfig,
    EvalConfig,
    TeacherConfig,
)


def demo_teacher_config(cfg: DemoConfig) -> TeacherConfig:
    base = TeacherConfig.quick() if cfg.quick else TeacherConfig(steps=cfg.teacher_steps)
    return base.replace(device=cfg.device, dtype=cfg.dtype)


def _quick_e2e(data, steps: int) -> EndToEndConfig:
    return EndToEndConfig(steps=steps, data=data, blocks=8, eval_blocks=4, batch_size=4, warmup=1)


def _stage(console: Console, number: int, title: str) -> float:
    console.print(Rule(f"[bold]{number}/4 {title}"))
    return time.perf_counter()


def run_demo(cfg: DemoConfig, console: Console | None = None) -> dict[str, Any]:
    """Run (or resume) every stage of the pipeline into `cfg.out`; return the evaluation rows and paths."""
    from moe_understudy.capture import CaptureStore, run_capture
    from moe_understudy.eval.quality import run_evaluation
    from moe_understudy.moe.loading import resolve_device
    from moe_understudy.teacher import train_teacher
    from moe_understudy.understudy.distill import run_distill

    console = console or Console(stderr=True)
    resolve_device(cfg.device)  # an unknown device is one sentence before any stage starts
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg.to_yaml(out / "demo.yaml")
    timings: dict[str, float] = {}
    teacher_cfg = demo_teacher_config(cfg)
    data = teacher_cfg.data

    t = _stage(console, 1, "teacher")
    teacher_dir = Path(cfg.teacher) if cfg.teacher else out / "teacher"
    if (teacher_dir / "config.json").exists():
        console.print(f"reusing the teacher in {teacher_dir}")
    else:
        train_teacher(teacher_cfg, teacher_dir, resume=True, console=console)
    timings["teacher"] = time.perf_counter() - t

    t = _stage(console, 2, "capture")
    store_dir = out / "store"
    capture_tokens = 8 * data.block_size * 8 if cfg.quick else cfg.capture_tokens
    val_tokens = 4 * data.block_size if cfg.quick else 16_384
    if (store_dir / "manifest.json").exists():
        console.print(
            f"reusing the capture store in {store_dir} ({CaptureStore(store_dir).tokens('train'):,} tokens)"
        )
    else:
        run_capture(
            CaptureConfig(
                model=str(teacher_dir),
                out=str(store_dir),
                data=data,
                tokens=capture_tokens,
                val_tokens=val_tokens,
                device=cfg.device,
                model_dtype=cfg.dtype,
                dtype=cfg.dtype,
            ),
            console=console,
        )
    timings["capture"] = time.perf_counter() - t

    t = _stage(console, 3, "distil understudies")
    understudy_dir = out / "understudies"
    e2e_steps = min(cfg.e2e_steps, 5) if cfg.quick else cfg.e2e_steps
    distill_cfg = DistillConfig(
        model=str(teacher_dir),
        store=str(store_dir),
        out=str(understudy_dir),
        arch=cfg.arch,
        intermediate=cfg.intermediate,
        width=cfg.width,
        steps=min(cfg.distill_steps, 30) if cfg.quick else cfg.distill_steps,
        batch_tokens=512,
        eval_every=10 if cfg.quick else 100,
        e2e=_quick_e2e(data, e2e_steps) if cfg.quick else EndToEndConfig(steps=e2e_steps, data=data),
        device=cfg.device,
        dtype=cfg.dtype,
    )
    if (understudy_dir / "report.json").exists():
        console.print(f"reusing the understudies in {understudy_dir}")
    else:
        run_distill(distill_cfg, resume=True, console=console)
    timings["distill"] = time.perf_counter() - t

    t = _stage(console, 4, "quality under load")
    result = run_evaluation(
        EvalConfig(
            model=str(teacher_dir),
            understudies=str(understudy_dir),
            out=str(out / "eval"),
            policies=cfg.policies,
            capacities=cfg.capacities,
            priority=cfg.priority,
            num_devices=cfg.devices,
            data=data,
            max_blocks=8 if cfg.quick else cfg.eval_blocks,
            batch_sizes=(4,) if cfg.quick else (8,),
            device=cfg.device,
            dtype=cfg.dtype,
        ),
        console=console,
    )
    timings["evaluate"] = time.perf_counter() - t
    console.print(
        f"[bold green]demo done[/] in {sum(timings.values()) / 60:.1f} min "
        f"({', '.join(f'{k} {v / 60:.1f}' for k, v in timings.items())}). "
        f"Report: [bold]{result['json']}[/]  plot: [bold]{result['png']}[/]"
    )
    return {**result, "timings": timings}
