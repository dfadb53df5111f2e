"""`understudy teacher` and `understudy inspect`: train a small MoE teacher, look at its routing."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moe_understudy.cli.common import (
    RUN,
    TRAIN,
    BlockSizeOption,
    MaxCharsOption,
    ModelArgument,
    command,
    configure,
    console,
    model_data,
    write_replay,
)


@command(tail=TRAIN)
def teacher(
    ctx: typer.Context,
    out: Annotated[
        Path, typer.Option(help="Run folder: checkpoints, tokenizer and the final save_pretrained model.")
    ],
    preset: Annotated[
        str | None,
        typer.Option(
            help="Model preset from moe/presets.py: mixtral (default), qwen3_moe, fine (64 experts of 64, top-8) or quick."
        ),
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(
            help="Corpus: 'stdlib' (this Python's standard library, the default), 'python' (the stdlib documents "
            "under the same keys and splits, plus the source and docs of the installed pure-Python packages), "
            "a file, folder, .jsonl or a datasets name."
        ),
    ] = None,
    steps: Annotated[
        int | None, typer.Option(help="Optimiser steps (default 1400; 60 with --quick).")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Blocks per step (default 16).")] = None,
    block_size: BlockSizeOption = None,
    lr: Annotated[float | None, typer.Option(help="Peak AdamW learning rate (default 2e-3).")] = None,
    warmup: Annotated[int | None, typer.Option(help="Linear warm-up steps (default 50).")] = None,
    vocab_size: Annotated[
        int | None, typer.Option(help="BPE vocabulary size when training a tokenizer (default 4096).")
    ] = None,
    tokenizer: Annotated[
        str | None, typer.Option(help="Use this tokenizer (path or hub id) instead of training a BPE.")
    ] = None,
    max_chars: MaxCharsOption = None,
    eval_every: Annotated[
        int | None, typer.Option(help="Steps between held-out evaluations and checkpoints.")
    ] = None,
    joint_understudy: Annotated[
        str | None,
        typer.Option(
            help="Also train stand-ins of this arch (trunk, dense, shadows, ...) jointly, on a detached loss."
        ),
    ] = None,
    joint_in_loop_from: Annotated[
        int | None,
        typer.Option(
            help="From this step on, each step's overflow is served by the joint stand-ins in the loop "
            "(--joint-policy at a capacity factor drawn from [--joint-cf-min, --joint-cf-max], score priority), "
            "so the model learns to tolerate them."
        ),
    ] = None,
    joint_policy: Annotated[
        str | None, typer.Option(help="In-loop overflow policy (default shadow).")
    ] = None,
    joint_cf_min: Annotated[
        float | None, typer.Option(help="In-loop lowest capacity factor (default 1.0).")
    ] = None,
    joint_cf_max: Annotated[
        float | None, typer.Option(help="In-loop highest capacity factor (default 2.0).")
    ] = None,
    init_from: Annotated[
        str | None,
        typer.Option(help="Start from this saved model's weights (a continued phase of the same preset)."),
    ] = None,
    save_at: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated steps (e.g. 1000,2000) after which a full save_pretrained model + tokenizer "
            "and its held-out perplexity go to OUT/at-STEP/ (kept on --resume)."
        ),
    ] = None,
    quick: Annotated[
        bool, typer.Option("--quick", help="Seconds-long run on a tiny preset (for tests and smoke checks).")
    ] = False,
) -> None:
    """Train a small MoE teacher from scratch on the default corpus (about 8 minutes on 2 cores)."""
    from moe_understudy.config import TeacherConfig
    from moe_understudy.teacher import train_teacher

    start = TeacherConfig.quick() if quick else TeacherConfig()
    cfg = configure(TeacherConfig, ctx.params, start=start, ignore=("out", "quick"))
    result = train_teacher(cfg, out, resume=ctx.params["resume"], console=console)  # writes OUT/teacher.yaml
    console.print(
        f"[bold green]teacher saved to {result.out_dir}[/]: held-out perplexity {result.val_perplexity:.2f}, "
        f"{result.tokens_per_second:,.0f} tokens/s, {result.train_seconds / 60:.1f} min, "
        f"max/mean expert load per layer-batch {', '.join(f'{r:.2f}' for r in result.max_over_mean_per_batch)}"
    )


@command(lead=("data",), tail=("json", *RUN))
def inspect(
    ctx: typer.Context,
    model: ModelArgument = None,
    blocks: Annotated[
        int | None, typer.Option(help="Number of blocks of text to route (default 64).")
    ] = None,
    block_size: BlockSizeOption = None,
    batch_size: Annotated[
        int | None,
        typer.Option(help="Blocks per forward (the 'layer-batch' of the max/mean figure; default 8)."),
    ] = None,
    heatmap: Annotated[Path | None, typer.Option(help="Save a layer x expert load heatmap PNG here.")] = None,
) -> None:
    """Print per-layer expert load (tokens per expert, max/mean, entropy) of MODEL on some text."""
    from moe_understudy.config import InspectConfig
    from moe_understudy.inspect_routing import inspect_model

    cfg = configure(
        InspectConfig,
        ctx.params,
        start=InspectConfig(data=model_data(model, notice=ctx.params["data"] is None)),
    )
    inspect_model(cfg, console)
    beside = cfg.json_out or cfg.heatmap
    if beside:
        write_replay(cfg, Path(beside).with_name("inspect.yaml"))
