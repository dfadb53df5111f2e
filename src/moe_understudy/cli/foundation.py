"""`understudy teacher` and `understudy inspect`: train a small MoE teacher, look at its routing."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moe_understudy.cli.common import (
    RUN,
    TRAIN,
    ModelArgument,
    command,
    console,
    model_data,
    write_replay,
)
from moe_understudy.cli.fields import Stage
from moe_understudy.config import InspectConfig, TeacherConfig

TEACHER = Stage(
    TeacherConfig,
    {
        "preset": "Model preset from moe/presets.py: mixtral, qwen3_moe, fine (64 experts of 64, top-8) or quick.",
        "data": "Corpus: 'stdlib' (this Python's standard library, the default), 'python' (the stdlib documents "
        "under the same keys and splits, plus the source and docs of the installed pure-Python packages), "
        "a file, folder, .jsonl or a datasets name.",
        "steps": "Optimiser steps (default 1400; 60 with --quick).",
        "batch_size": "Blocks per step.",
        "lr": "Peak AdamW learning rate.",
        "warmup": "Linear warm-up steps.",
        "vocab_size": "BPE vocabulary size when training a tokenizer.",
        "tokenizer": "Use this tokenizer (path or hub id) instead of training a BPE.",
        "eval_every": "Steps between held-out evaluations and checkpoints.",
        "joint_understudy": "Also train stand-ins of this arch (trunk, dense, shadows, ...) jointly, on a detached loss.",
        "joint_in_loop_from": "From this step on, each step's overflow is served by the joint stand-ins in the loop "
        "(--joint-policy at a capacity factor drawn from [--joint-cf-min, --joint-cf-max], score priority), "
        "so the model learns to tolerate them.",
        "joint_policy": "In-loop overflow policy.",
        "joint_cf_min": "In-loop lowest capacity factor.",
        "joint_cf_max": "In-loop highest capacity factor.",
        "init_from": "Start from this saved model's weights (a continued phase of the same preset).",
        "save_at": "Comma-separated steps (e.g. 1000,2000) after which a full save_pretrained model + tokenizer "
        "and its held-out perplexity go to OUT/at-STEP/ (kept on --resume).",
    },
)


@command(lead=("block_size", "max_chars"), tail=TRAIN, stage=TEACHER)
def teacher(
    ctx: typer.Context,
    out: Annotated[
        Path, typer.Option(help="Run folder: checkpoints, tokenizer and the final save_pretrained model.")
    ],
    quick: Annotated[
        bool, typer.Option("--quick", help="Seconds-long run on a tiny preset (for tests and smoke checks).")
    ] = False,
) -> None:
    """Train a small MoE teacher from scratch on the default corpus (about 8 minutes on 2 cores)."""
    from moe_understudy.teacher import train_teacher

    start = TeacherConfig.quick() if quick else TeacherConfig()
    cfg = TEACHER.configure(ctx.params, start=start, ignore=("out", "quick"))
    result = train_teacher(cfg, out, resume=ctx.params["resume"], console=console)  # writes OUT/teacher.yaml
    console.print(
        f"[bold green]teacher saved to {result.out_dir}[/]: held-out perplexity {result.val_perplexity:.2f}, "
        f"{result.tokens_per_second:,.0f} tokens/s, {result.train_seconds / 60:.1f} min, "
        f"max/mean expert load per layer-batch {', '.join(f'{r:.2f}' for r in result.max_over_mean_per_batch)}"
    )


INSPECT = Stage(
    InspectConfig,
    {
        "blocks": "Number of blocks of text to route.",
        "batch_size": "Blocks per forward (the 'layer-batch' of the max/mean figure).",
        "heatmap": "Save a layer x expert load heatmap PNG here.",
    },
    paths=("heatmap",),
)


@command(lead=("data", "block_size"), tail=("json", *RUN), stage=INSPECT)
def inspect(ctx: typer.Context, model: ModelArgument = None) -> None:
    """Print per-layer expert load (tokens per expert, max/mean, entropy) of MODEL on some text."""
    from moe_understudy.inspect_routing import inspect_model

    cfg = INSPECT.configure(
        ctx.params,
        start=InspectConfig(data=model_data(model, notice=ctx.params["data"] is None)),
    )
    inspect_model(cfg, console)
    beside = cfg.json_out or cfg.heatmap
    if beside:
        write_replay(cfg, Path(beside).with_name("inspect.yaml"))
