"""`understudy capture`, `distill`, `replace-eval`, `quantize`: record MoE-layer activity, distil stand-ins, store them in int8."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moe_understudy.cli.common import RUN, TEXT, ModelArgument, command, console, model_data, write_replay
from moe_understudy.cli.fields import Stage
from moe_understudy.config import (
    CaptureConfig,
    DistillConfig,
    EndToEndConfig,
    QuantizeConfig,
    ReplaceEvalConfig,
)

CAPTURE = Stage(
    CaptureConfig,
    {
        "out": "Store folder to write: manifest.json plus train/ and val/ safetensors shards.",
        "tokens": "Training tokens to capture.",
        "val_tokens": "Held-out tokens to capture from the corpus' validation split.",
        "batch_size": "Blocks per forward pass.",
        "shard_tokens": "Rows per shard file.",
        "store_dtype": "Stored dtype of x, y, logits, weights: float32, bfloat16 or float16 (default: --dtype).",
    },
    renames={"dtype": "model_dtype", "store_dtype": "dtype"},
    paths=("out",),
)


@command(lead=("data", "block_size", "max_chars"), stage=CAPTURE)
def capture(ctx: typer.Context, model: ModelArgument = None) -> None:
    """Record each MoE layer's input, routed output, router logits and top-k into a sharded store.

    A killed capture leaves no trusted store; rerun the same command and it starts again cleanly.
    """
    from moe_understudy.capture import run_capture

    params = {**ctx.params, "store_dtype": ctx.params["store_dtype"] or ctx.params["dtype"]}
    cfg = CAPTURE.configure(
        params, start=CaptureConfig(data=model_data(model, notice=params["data"] is None))
    )
    store = run_capture(cfg, console=console)  # writes OUT/capture.yaml
    console.print(
        f"[bold green]store written to {store.path}[/]: layers {store.layers}, {store.tokens('train'):,} train and "
        f"{store.tokens('val'):,} held-out tokens in {store.manifest['seconds']:.1f} s"
    )


DISTILL = Stage(
    DistillConfig,
    {
        "store": "Capture store folder (from `understudy capture`).",
        "out": "Output folder: understudies (safetensors + config.json + README.md), report.json, layer-wise copies.",
        "arch": "Token level: dense (SwiGLU), lowrank, merged (warm start from usage-weighted experts), small_moe; "
        "assignment level: shadows (one per expert) or trunk (one SwiGLU trunk for all experts, gated per "
        "expert; memory about half an expert).",
        "loss": "Layer-wise loss: mse, cosine or relative.",
        "intermediate": "Intermediate size of dense/merged/lowrank/small_moe (default: one expert's; small_moe half).",
        "rank": "lowrank: bottleneck rank (default hidden/8).",
        "num_experts": "small_moe: number of experts (default half the layer's).",
        "top_k": "small_moe: experts per token (default the layer's).",
        "width": "shadows: per-expert intermediate (swiglu) or rank (lowrank) (default expert intermediate / 4); "
        "trunk: shared hidden width (default expert intermediate / 2).",
        "film": "trunk: per-expert shifts of the hidden units beside the scales; --no-film serves a token's "
        "assignments with one mix of the scales instead, about 30% faster, slightly worse at cf 1.",
        "adapter_rank": "trunk: rank r of a per-expert low-rank correction B_e A_e x (2 H E r parameters; 0: none).",
        "width_per_pair": "trunk without FiLM or adapters: a row with n served pairs runs only the first "
        "min(width, n x this) hidden units, so a served pair costs at most this many at every cf; the prefixes "
        "are fitted together (0: every row runs the whole width).",
        "adapter_allocation": "trunk adapters: uniform (every expert rank r) or overflow (the same E x r ranks "
        "shared out by each expert's overflow mass in the store, under score priority at --focus-cfs or 1-2).",
        "adapter_max_rank": "overflow allocation: the largest rank an expert gets (default 2 r); the trunk's "
        "default width keeps a lone served assignment at this rank within half an expert's FLOPs.",
        "init": "trunk: merged (default), union or random; shadows: teacher (default) or random.",
        "objective": "auto: assignment-level stand-ins fit per-(token, expert) targets from the experts "
        "themselves; combined: fit the captured routed output.",
        "extra_experts": "Assignment objective: experts beyond the top-k drawn per token from its router.",
        "focus_cfs": "Assignment objective: weight routed pairs by how often they overflow under score priority at "
        "these capacity factors, e.g. 1,1.25,1.5,2 (default: by combine weight only).",
        "focus_batch_rows": "Assignment objective: the serving batch (in captured rows) over which --focus-cfs "
        "plans the overflow; smaller batches, like decode steps, overflow more and spread it over more pairs.",
        "pair_weight_power": "Assignment objective: a pair's error counts with its combine weight to this power; "
        "2 weighs it by its share of the layer's output error when served (2 and 0.5 measured worse than 1).",
        "kind": "shadows: swiglu or lowrank.",
        "steps": "Layer-wise steps per layer, an upper bound under early stopping.",
        "batch_tokens": "Captured rows per layer-wise step.",
        "lr": "Layer-wise peak AdamW learning rate.",
        "eval_every": "Steps between held-out relative-error checks.",
        "patience": "Stop a layer after this many checks without improvement.",
        "e2e_steps": "End-to-end KL steps through the frozen model after the layer-wise fit (0 = off; 1000 cut "
        "the layer-wise loss by 58% in the benchmark).",
        "e2e_lr": "End-to-end peak learning rate.",
        "e2e_blocks": "Pool of training blocks the end-to-end steps draw from.",
        "e2e_cache": "Cache the pool's teacher log-probs, or recompute them per step, which allows a large pool "
        "and avoids memorising it.",
        "e2e_batch_size": "Blocks per end-to-end step.",
        "e2e_fraction_min": "Lowest fraction of tokens substituted per end-to-end step (the substituted fraction "
        "is drawn per step from [min, max]).",
        "e2e_fraction_max": "Highest fraction of tokens substituted per end-to-end step.",
        "e2e_overflow": "End-to-end overflow: random (a random fraction substituted) or serving (the --e2e-policy "
        "decides what the stand-in serves at a capacity factor drawn per step from [--e2e-cf-min, --e2e-cf-max]).",
        "e2e_policy": "serving overflow: the runtime policy.",
        "e2e_priority": "serving overflow: position or score priority.",
        "e2e_cf_min": "serving overflow: lowest capacity factor.",
        "e2e_cf_max": "serving overflow: highest capacity factor.",
        "e2e_direction": "KL direction: forward KL(teacher||model) or reverse.",
        "e2e_hidden_weight": "Weight of a last-hidden-state matching term added to the KL.",
        "e2e_checkpoint_every": "Save a resumable end-to-end checkpoint every this many steps (0 = never).",
        "dtype": "The model's dtype in the end-to-end stage and the checks: float32, bfloat16 or float16; "
        "understudies keep fp32 master weights.",
    },
    renames={
        "e2e_cache": "e2e.cache_teacher",
        "data": "e2e.data.source",
        "block_size": "e2e.data.block_size",
    },
    prefixes={"e2e_": "e2e."},
    flags={"film": "--film/--no-film", "e2e_cache": "--e2e-cache/--no-e2e-cache"},
    paths=("store", "out"),
)


@command(tail=(*TEXT, "seed", "device", "config", "debug"), stage=DISTILL)
def distill(
    ctx: typer.Context,
    model: ModelArgument = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue a run in --out: finished layers are kept, the end-to-end stage continues from its "
            "last checkpoint (or is kept if finished).",
        ),
    ] = False,
) -> None:
    """Distil one understudy per MoE layer from a capture store (layer-wise, then optionally end-to-end)."""
    from moe_understudy.understudy.distill import run_distill

    e2e = EndToEndConfig(data=model_data(model, notice=ctx.params["data"] is None))
    cfg = DISTILL.configure(ctx.params, start=DistillConfig(e2e=e2e))
    if ctx.params["seed"] is not None:  # one seed retrains the whole run, the end-to-end draws included
        cfg = cfg.replace(e2e=cfg.e2e.replace(seed=cfg.seed))
    result = run_distill(cfg, resume=resume, console=console)  # writes OUT/distill.yaml
    console.print(f"[bold green]understudies saved to {result.out_dir}[/] (report.json holds the figures)")


REPLACE_EVAL = Stage(
    ReplaceEvalConfig,
    {
        "understudies": "Folder written by `understudy distill` (or a hub id).",
        "blocks": "Held-out blocks to score.",
    },
)


@command("replace-eval", lead=("data", "block_size"), tail=("json", *RUN), stage=REPLACE_EVAL)
def replace_eval(ctx: typer.Context, model: ModelArgument = None) -> None:
    """Reload saved understudies and compare perplexity with every MoE layer fully replaced against the model."""
    import json

    from moe_understudy.understudy.distill import run_replace_eval

    cfg = REPLACE_EVAL.configure(
        ctx.params, start=ReplaceEvalConfig(data=model_data(model, notice=ctx.params["data"] is None))
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


QUANTIZE = Stage(
    QuantizeConfig,
    {
        "understudies": "Folder written by `understudy distill` (or a hub id) holding --arch trunk stand-ins.",
        "out": "New folder for the int8 stand-ins; the float folder is kept.",
    },
    paths=("out",),
)


@command(lead=(), tail=("config", "debug"), stage=QUANTIZE)
def quantize(ctx: typer.Context, model: ModelArgument = None) -> None:
    """Store saved trunk stand-ins in int8 (one scale per output row): half their memory against experts held
    at 16 bits, for a stand-in twice as wide at the same memory; FLOPs are unchanged."""
    from moe_understudy.understudy.quantize import run_quantize

    cfg = QUANTIZE.configure(ctx.params)
    result = run_quantize(cfg, console=console)
    memory = ", ".join(
        f"layer {i} {result['memory_before'][i]:.2f} -> {m:.2f}" for i, m in result["memory_after"].items()
    )
    console.print(
        f"[bold green]int8 stand-ins saved to {result['out']}[/]; memory in routed experts: {memory}"
    )
    write_replay(cfg, Path(result["out"]) / "quantize.yaml")
