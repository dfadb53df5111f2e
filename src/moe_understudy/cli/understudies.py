"""`understudy capture`, `distill`, `replace-eval`: record MoE-layer activity and distil stand-ins from it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moe_understudy.cli.common import (
    RUN,
    TEXT,
    BlockSizeOption,
    MaxCharsOption,
    ModelArgument,
    command,
    configure,
    console,
    model_data,
    write_replay,
)


@command(lead=("data",))
def capture(
    ctx: typer.Context,
    model: ModelArgument = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Store folder to write: manifest.json plus train/ and val/ safetensors shards (default runs/store)."
        ),
    ] = None,
    tokens: Annotated[int | None, typer.Option(help="Training tokens to capture (default 65536).")] = None,
    val_tokens: Annotated[
        int | None,
        typer.Option(help="Held-out tokens to capture from the corpus' validation split (default 8192)."),
    ] = None,
    block_size: BlockSizeOption = None,
    max_chars: MaxCharsOption = None,
    batch_size: Annotated[int | None, typer.Option(help="Blocks per forward pass (default 8).")] = None,
    shard_tokens: Annotated[int | None, typer.Option(help="Rows per shard file (default 16384).")] = None,
    store_dtype: Annotated[
        str | None,
        typer.Option(
            help="Stored dtype of x, y, logits, weights: float32, bfloat16 or float16 (default: --dtype)."
        ),
    ] = None,
) -> None:
    """Record each MoE layer's input, routed output, router logits and top-k into a sharded store.

    A killed capture leaves no trusted store; rerun the same command and it starts again cleanly.
    """
    from moe_understudy.capture import run_capture
    from moe_understudy.config import CaptureConfig

    params = {**ctx.params, "store_dtype": store_dtype or ctx.params["dtype"]}
    cfg = configure(
        CaptureConfig,
        params,
        start=CaptureConfig(data=model_data(model, notice=params["data"] is None)),
        renames={"dtype": "model_dtype", "store_dtype": "dtype"},
    )
    store = run_capture(cfg, console=console)  # writes OUT/capture.yaml
    console.print(
        f"[bold green]store written to {store.path}[/]: layers {store.layers}, {store.tokens('train'):,} train and "
        f"{store.tokens('val'):,} held-out tokens in {store.manifest['seconds']:.1f} s"
    )


@command(tail=(*TEXT, "seed", "device", "config", "debug"))
def distill(
    ctx: typer.Context,
    model: ModelArgument = None,
    store: Annotated[
        Path | None,
        typer.Option(help="Capture store folder (from `understudy capture`; default runs/store)."),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Output folder: understudies (safetensors + config.json + README.md), report.json, layer-wise "
            "copies (default runs/understudies)."
        ),
    ] = None,
    arch: Annotated[
        str | None,
        typer.Option(
            help="Token level: dense (SwiGLU), lowrank, merged (warm start from usage-weighted experts), small_moe; "
            "assignment level: shadows (one per expert) or trunk (one SwiGLU trunk for all experts, gated per "
            "expert; memory about half an expert) (default dense)."
        ),
    ] = None,
    loss: Annotated[
        str | None, typer.Option(help="Layer-wise loss: mse, cosine or relative (default mse).")
    ] = None,
    intermediate: Annotated[
        int | None,
        typer.Option(
            help="Intermediate size of dense/merged/lowrank/small_moe (default: one expert's; small_moe half)."
        ),
    ] = None,
    rank: Annotated[int | None, typer.Option(help="lowrank: bottleneck rank (default hidden/8).")] = None,
    num_experts: Annotated[
        int | None, typer.Option(help="small_moe: number of experts (default half the layer's).")
    ] = None,
    top_k: Annotated[
        int | None, typer.Option(help="small_moe: experts per token (default the layer's).")
    ] = None,
    width: Annotated[
        int | None,
        typer.Option(
            help="shadows: per-expert intermediate (swiglu) or rank (lowrank) (default expert intermediate / 4); "
            "trunk: shared hidden width (default expert intermediate / 2)."
        ),
    ] = None,
    film: Annotated[
        bool | None,
        typer.Option(
            "--film/--no-film",
            help="trunk: per-expert shifts of the hidden units beside the scales (default on).",
        ),
    ] = None,
    adapter_rank: Annotated[
        int | None,
        typer.Option(
            help="trunk: rank r of a per-expert low-rank correction B_e A_e x (2 H E r parameters; default 0: none)."
        ),
    ] = None,
    adapter_allocation: Annotated[
        str | None,
        typer.Option(
            help="trunk adapters: uniform (every expert rank r, default) or overflow (the same E x r ranks shared "
            "out by each expert's overflow mass in the store, under score priority at --focus-cfs or 1-2)."
        ),
    ] = None,
    adapter_max_rank: Annotated[
        int | None,
        typer.Option(
            help="overflow allocation: the largest rank an expert gets (default 2 r); the trunk's default width "
            "keeps a lone served assignment at this rank within half an expert's FLOPs."
        ),
    ] = None,
    init: Annotated[
        str | None,
        typer.Option(help="trunk: merged (default), union or random; shadows: teacher (default) or random."),
    ] = None,
    objective: Annotated[
        str | None,
        typer.Option(
            help="auto (default): assignment-level stand-ins fit per-(token, expert) targets from the experts "
            "themselves; combined: fit the captured routed output."
        ),
    ] = None,
    extra_experts: Annotated[
        int | None,
        typer.Option(
            help="Assignment objective: experts beyond the top-k drawn per token from its router (default 2)."
        ),
    ] = None,
    focus_cfs: Annotated[
        str | None,
        typer.Option(
            help="Assignment objective: weight routed pairs by how often they overflow under score priority at "
            "these capacity factors, e.g. 1,1.25,1.5,2 (default: by combine weight only)."
        ),
    ] = None,
    kind: Annotated[str | None, typer.Option(help="shadows: swiglu or lowrank (default swiglu).")] = None,
    steps: Annotated[
        int | None,
        typer.Option(help="Layer-wise steps per layer, an upper bound under early stopping (default 1500)."),
    ] = None,
    batch_tokens: Annotated[
        int | None, typer.Option(help="Captured rows per layer-wise step (default 1024).")
    ] = None,
    lr: Annotated[
        float | None, typer.Option(help="Layer-wise peak AdamW learning rate (default 3e-3).")
    ] = None,
    eval_every: Annotated[
        int | None, typer.Option(help="Steps between held-out relative-error checks (default 100).")
    ] = None,
    patience: Annotated[
        int | None, typer.Option(help="Stop a layer after this many checks without improvement (default 5).")
    ] = None,
    e2e_steps: Annotated[
        int | None,
        typer.Option(
            help="End-to-end KL steps through the frozen model after the layer-wise fit (default 0 = off; 1000 cut the layer-wise loss by 58% in the benchmark)."
        ),
    ] = None,
    e2e_lr: Annotated[
        float | None, typer.Option(help="End-to-end peak learning rate (default 1e-3).")
    ] = None,
    e2e_blocks: Annotated[
        int | None,
        typer.Option(help="Pool of training blocks the end-to-end steps draw from (default 2048)."),
    ] = None,
    e2e_cache: Annotated[
        bool | None,
        typer.Option(
            "--e2e-cache/--no-e2e-cache",
            help="Cache the pool's teacher log-probs, or recompute them per step (default), which allows a large pool and avoids memorising it.",
        ),
    ] = None,
    e2e_batch_size: Annotated[
        int | None, typer.Option(help="Blocks per end-to-end step (default 8).")
    ] = None,
    e2e_fraction_min: Annotated[
        float | None,
        typer.Option(
            help="Lowest fraction of tokens substituted per end-to-end step (default 1.0; the substituted fraction is drawn per step from [min, max])."
        ),
    ] = None,
    e2e_fraction_max: Annotated[
        float | None,
        typer.Option(help="Highest fraction of tokens substituted per end-to-end step (default 1.0)."),
    ] = None,
    e2e_overflow: Annotated[
        str | None,
        typer.Option(
            help="End-to-end overflow: random (a random fraction substituted, default) or serving (the --e2e-policy "
            "decides what the stand-in serves at a capacity factor drawn per step from [--e2e-cf-min, --e2e-cf-max])."
        ),
    ] = None,
    e2e_policy: Annotated[
        str | None, typer.Option(help="serving overflow: the runtime policy (default shadow).")
    ] = None,
    e2e_priority: Annotated[
        str | None, typer.Option(help="serving overflow: position or score priority (default score).")
    ] = None,
    e2e_cf_min: Annotated[
        float | None, typer.Option(help="serving overflow: lowest capacity factor (default 1.0).")
    ] = None,
    e2e_cf_max: Annotated[
        float | None, typer.Option(help="serving overflow: highest capacity factor (default 2.0).")
    ] = None,
    e2e_direction: Annotated[
        str | None,
        typer.Option(help="KL direction: forward KL(teacher||model) or reverse (default forward)."),
    ] = None,
    e2e_hidden_weight: Annotated[
        float | None,
        typer.Option(help="Weight of a last-hidden-state matching term added to the KL (default 1.0)."),
    ] = None,
    e2e_checkpoint_every: Annotated[
        int | None,
        typer.Option(
            help="Save a resumable end-to-end checkpoint every this many steps (default 100; 0 = never)."
        ),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue a run in --out: finished layers are kept, the end-to-end stage continues from its last checkpoint (or is kept if finished).",
        ),
    ] = False,
    dtype: Annotated[
        str | None,
        typer.Option(
            help="The model's dtype in the end-to-end stage and the checks: float32 (default), bfloat16 or "
            "float16; understudies keep fp32 master weights."
        ),
    ] = None,
) -> None:
    """Distil one understudy per MoE layer from a capture store (layer-wise, then optionally end-to-end)."""
    from moe_understudy.config import DistillConfig, EndToEndConfig
    from moe_understudy.understudy.distill import run_distill

    cfg = configure(
        DistillConfig,
        ctx.params,
        start=DistillConfig(e2e=EndToEndConfig(data=model_data(model, notice=ctx.params["data"] is None))),
        renames={
            "e2e_cache": "e2e.cache_teacher",
            "data": "e2e.data.source",
            "block_size": "e2e.data.block_size",
        },
        prefixes={"e2e_": "e2e."},
    )
    result = run_distill(cfg, resume=resume, console=console)  # writes OUT/distill.yaml
    console.print(f"[bold green]understudies saved to {result.out_dir}[/] (report.json holds the figures)")


@command("replace-eval", lead=("data",), tail=("json", *RUN))
def replace_eval(
    ctx: typer.Context,
    model: ModelArgument = None,
    understudies: Annotated[
        str | None,
        typer.Option(help="Folder written by `understudy distill` (or a hub id; default runs/understudies)."),
    ] = None,
    blocks: Annotated[int | None, typer.Option(help="Held-out blocks to score (default 32).")] = None,
    block_size: BlockSizeOption = None,
) -> None:
    """Reload saved understudies and compare perplexity with every MoE layer fully replaced against the model."""
    import json

    from moe_understudy.config import ReplaceEvalConfig
    from moe_understudy.understudy.distill import run_replace_eval

    cfg = configure(
        ReplaceEvalConfig,
        ctx.params,
        start=ReplaceEvalConfig(data=model_data(model, notice=ctx.params["data"] is None)),
    )
    result = run_replace_eval(
        cfg.model, cfg.understudies, cfg.data, blocks=cfg.blocks, device=cfg.device, dtype=cfg.dtype
    )
    console.print(
        f"perplexity {result['ppl_teacher']:.3f} -> {result['ppl_replaced']:.3f} with every MoE layer replaced "
        f"({result['increase_pct']:+.2f}%), understudy cost per layer {result['cost']}"
    )
    if cfg.json_out:
        Path(cfg.json_out).write_text(json.dumps(result, indent=2))
        write_replay(cfg, Path(cfg.json_out).with_name("replace_eval.yaml"))
