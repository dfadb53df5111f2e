"""`understudy teacher` and `understudy inspect`: train a small MoE teacher, look at its routing."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moe_understudy.cli.common import app, console, given, split, user_errors
from moe_understudy.errors import UserError


@app.command()
@user_errors
def teacher(
    out: Annotated[
        Path, typer.Option(help="Run folder: checkpoints, tokenizer and the final save_pretrained model.")
    ],
    preset: Annotated[
        str,
        typer.Option(
            help="Model preset from moe/presets.py: mixtral, qwen3_moe, fine (64 experts of 64, top-8) or quick."
        ),
    ] = "mixtral",
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
    block_size: Annotated[int | None, typer.Option(help="Tokens per block (default 128).")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak AdamW learning rate (default 2e-3).")] = None,
    vocab_size: Annotated[
        int | None, typer.Option(help="BPE vocabulary size when training a tokenizer (default 4096).")
    ] = None,
    tokenizer: Annotated[
        str | None, typer.Option(help="Use this tokenizer (path or hub id) instead of training a BPE.")
    ] = None,
    max_chars: Annotated[int | None, typer.Option(help="Cap on corpus characters read.")] = None,
    eval_every: Annotated[
        int | None, typer.Option(help="Steps between held-out evaluations and checkpoints.")
    ] = None,
    joint_understudy: Annotated[
        str | None,
        typer.Option(
            help="Also train understudies of this arch (dense, lowrank, ...) jointly, on a detached loss."
        ),
    ] = None,
    save_at: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated steps (e.g. 1000,2000) after which a full save_pretrained model + tokenizer "
            "and its held-out perplexity go to OUT/at-STEP/ (kept on --resume)."
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    quick: Annotated[
        bool, typer.Option("--quick", help="Seconds-long run on a tiny preset (for tests and smoke checks).")
    ] = False,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the last checkpoint in --out.")
    ] = False,
    config: Annotated[
        Path | None, typer.Option(help="Read options from a teacher.yaml (flags given here override it).")
    ] = None,
) -> None:
    """Train a small MoE teacher from scratch on the default corpus (about 8 minutes on 2 cores)."""
    from moe_understudy.config import TeacherConfig
    from moe_understudy.teacher import train_teacher

    base = (
        TeacherConfig.from_yaml(config) if config else (TeacherConfig.quick() if quick else TeacherConfig())
    )
    data_cfg = base.data.replace(
        **given(
            source=data,
            block_size=block_size,
            vocab_size=vocab_size,
            tokenizer=tokenizer,
            max_chars=max_chars,
        ),
    )
    try:
        cfg = base.replace(
            data=data_cfg,
            preset="quick" if quick and preset == "mixtral" else preset,
            seed=seed,
            **given(
                steps=steps,
                batch_size=batch_size,
                lr=lr,
                eval_every=eval_every,
                joint_understudy=joint_understudy,
                save_at=split(save_at, int, "--save-at steps"),
            ),
        )
    except ValueError as err:
        raise UserError(f"{err} Pass values that fit the run.") from err
    result = train_teacher(cfg, out, resume=resume, console=console)
    console.print(
        f"[bold green]teacher saved to {result.out_dir}[/]: held-out perplexity {result.val_perplexity:.2f}, "
        f"{result.tokens_per_second:,.0f} tokens/s, {result.train_seconds / 60:.1f} min, "
        f"max/mean expert load per layer-batch {', '.join(f'{r:.2f}' for r in result.max_over_mean_per_batch)}"
    )


@app.command()
@user_errors
def inspect(
    model: Annotated[
        str, typer.Argument(help="Model folder (from `understudy teacher`) or a transformers MoE checkpoint.")
    ],
    data: Annotated[
        str,
        typer.Option(
            help="Text to route: 'stdlib' validation split, a file, folder, .jsonl or datasets name."
        ),
    ] = "stdlib",
    blocks: Annotated[int, typer.Option(help="Number of blocks of text to route.")] = 64,
    block_size: Annotated[int, typer.Option(help="Tokens per block.")] = 128,
    batch_size: Annotated[
        int, typer.Option(help="Blocks per forward (the 'layer-batch' of the max/mean figure).")
    ] = 8,
    heatmap: Annotated[Path | None, typer.Option(help="Save a layer x expert load heatmap PNG here.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Save the figures as JSON here.")] = None,
) -> None:
    """Print per-layer expert load (tokens per expert, max/mean, entropy) of MODEL on some text."""
    from moe_understudy.inspect_routing import inspect_model

    inspect_model(model, data, blocks, block_size, batch_size, heatmap, json_out, console)
