"""`understudy capture`, `distill`, `replace-eval`: record MoE-layer activity and distil stand-ins from it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moe_understudy.cli.common import app, console, given, user_errors


def _understudy_data(model: str, data: str | None, block_size: int | None, max_chars: int | None):
    """The model's own training DataConfig (teacher.yaml) with any given overrides."""
    from moe_understudy.capture import default_data_config

    return default_data_config(model).replace(
        **given(source=data, block_size=block_size, max_chars=max_chars)
    )


@app.command()
@user_errors
def capture(
    model: Annotated[
        str, typer.Argument(help="Model folder (from `understudy teacher`) or a transformers MoE checkpoint.")
    ],
    out: Annotated[
        Path,
        typer.Option(help="Store folder to write: manifest.json plus train/ and val/ safetensors shards."),
    ],
    data: Annotated[
        str | None,
        typer.Option(
            help="Text to run through the model (default: the corpus the teacher was trained on, else 'stdlib')."
        ),
    ] = None,
    tokens: Annotated[int | None, typer.Option(help="Training tokens to capture (default 65536).")] = None,
    val_tokens: Annotated[
        int | None,
        typer.Option(help="Held-out tokens to capture from the corpus' validation split (default 8192)."),
    ] = None,
    block_size: Annotated[int | None, typer.Option(help="Tokens per block (default: the teacher's).")] = None,
    max_chars: Annotated[int | None, typer.Option(help="Cap on corpus characters read.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Blocks per forward pass (default 8).")] = None,
    shard_tokens: Annotated[int | None, typer.Option(help="Rows per shard file (default 16384).")] = None,
    dtype: Annotated[
        str | None, typer.Option(help="Stored dtype: float32, float16 or bfloat16 (default float32).")
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="Read options from a capture.yaml (flags given here override it).")
    ] = None,
) -> None:
    """Record each MoE layer's input, routed output, router logits and top-k into a sharded store."""
    from moe_understudy.capture import run_capture
    from moe_understudy.config import CaptureConfig

    base = (
        CaptureConfig.from_yaml(config)
        if config
        else CaptureConfig(data=_understudy_data(model, data, block_size, max_chars))
    )
    if config:
        base = base.replace(
            data=base.data.replace(**given(source=data, block_size=block_size, max_chars=max_chars))
        )
    cfg = base.replace(
        model=model,
        out=str(out),
        **given(
            tokens=tokens,
            val_tokens=val_tokens,
            batch_size=batch_size,
            shard_tokens=shard_tokens,
            dtype=dtype,
        ),
    )
    store = run_capture(cfg, console=console)
    console.print(
        f"[bold green]store written to {store.path}[/]: layers {store.layers}, {store.tokens('train'):,} train and "
        f"{store.tokens('val'):,} held-out tokens in {store.manifest['seconds']:.1f} s"
    )


@app.command()
@user_errors
def distill(
    model: Annotated[str, typer.Argument(help="The model the store was captured from.")],
    store: Annotated[Path, typer.Option(help="Capture store folder (from `understudy capture`).")],
    out: Annotated[
        Path,
        typer.Option(
            help="Output folder: understudies (safetensors + config.json), report.json, layer-wise copies."
        ),
    ],
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
    data: Annotated[
        str | None,
        typer.Option(
            help="Text for end-to-end training and the perplexity check (default: the teacher's corpus)."
        ),
    ] = None,
    block_size: Annotated[
        int | None,
        typer.Option(help="Tokens per block for end-to-end and evaluation (default: the teacher's)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue a run in --out: finished layers are kept, the end-to-end stage continues from its last checkpoint (or is kept if finished).",
        ),
    ] = False,
    config: Annotated[
        Path | None, typer.Option(help="Read options from a distill.yaml (flags given here override it).")
    ] = None,
) -> None:
    """Distil one understudy per MoE layer from a capture store (layer-wise, then optionally end-to-end)."""
    from moe_understudy.config import DistillConfig, EndToEndConfig
    from moe_understudy.understudy.distill import run_distill

    base = (
        DistillConfig.from_yaml(config)
        if config
        else DistillConfig(e2e=EndToEndConfig(data=_understudy_data(model, None, None, None)))
    )
    e2e = base.e2e.replace(
        data=base.e2e.data.replace(**given(source=data, block_size=block_size)),
        **given(
            steps=e2e_steps,
            lr=e2e_lr,
            blocks=e2e_blocks,
            cache_teacher=e2e_cache,
            batch_size=e2e_batch_size,
            fraction_min=e2e_fraction_min,
            fraction_max=e2e_fraction_max,
            overflow=e2e_overflow,
            policy=e2e_policy,
            priority=e2e_priority,
            cf_min=e2e_cf_min,
            cf_max=e2e_cf_max,
            direction=e2e_direction,
            hidden_weight=e2e_hidden_weight,
            checkpoint_every=e2e_checkpoint_every,
        ),
    )
    cfg = base.replace(
        model=model,
        store=str(store),
        out=str(out),
        e2e=e2e,
        seed=seed,
        **given(
            arch=arch,
            loss=loss,
            intermediate=intermediate,
            rank=rank,
            num_experts=num_experts,
            top_k=top_k,
            width=width,
            kind=kind,
            film=film,
            init=init,
            objective=objective,
            extra_experts=extra_experts,
            steps=steps,
            batch_tokens=batch_tokens,
            lr=lr,
            eval_every=eval_every,
            patience=patience,
        ),
    )
    result = run_distill(cfg, resume=resume, console=console)
    console.print(f"[bold green]understudies saved to {result.out_dir}[/] (report.json holds the figures)")


@app.command("replace-eval")
@user_errors
def replace_eval(
    model: Annotated[str, typer.Argument(help="The model the understudies were distilled for.")],
    understudies: Annotated[Path, typer.Option(help="Folder written by `understudy distill`.")],
    data: Annotated[
        str | None, typer.Option(help="Held-out text (default: the teacher's corpus, validation split).")
    ] = None,
    blocks: Annotated[int, typer.Option(help="Held-out blocks to score.")] = 32,
    block_size: Annotated[int | None, typer.Option(help="Tokens per block (default: the teacher's).")] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the figures as JSON here.")
    ] = None,
) -> None:
    """Reload saved understudies and compare perplexity with every MoE layer fully replaced against the model."""
    import json

    from moe_understudy.understudy.distill import run_replace_eval

    result = run_replace_eval(
        model, str(understudies), _understudy_data(model, data, block_size, None), blocks=blocks
    )
    console.print(
        f"perplexity {result['ppl_teacher']:.3f} -> {result['ppl_replaced']:.3f} with every MoE layer replaced "
        f"({result['increase_pct']:+.2f}%), understudy cost per layer {result['cost']}"
    )
    if json_out:
        json_out.write_text(json.dumps(result, indent=2))
