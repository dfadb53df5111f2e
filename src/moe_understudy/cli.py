"""`understudy ...`: the command line. This module only parses options and calls a workflow.

Each command maps its options onto the fields of its stage's frozen config dataclass and hands the
config to one workflow function; errors meant for users are `UserError`s printed as one sentence.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from moe_understudy.errors import UserError

app = typer.Typer(
    name="understudy",
    help="Distil compact understudies for MoE layers, serve overflow tokens with them, and distil whole MoEs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)


def user_errors(fn):
    """Print a UserError as one red sentence and exit 2 instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # our own rich progress bars say what is happening
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            console.print(f"[bold red]error:[/] {err}")
            sys.exit(2)
        except KeyboardInterrupt:
            console.print(
                "[yellow]interrupted; saved checkpoints are kept, rerun with --resume to continue.[/]"
            )
            sys.exit(130)

    return wrapper


# ---- section: foundation (teacher, inspect) ----------------------------------------------------
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
        **_given(
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
            **_given(
                steps=steps,
                batch_size=batch_size,
                lr=lr,
                eval_every=eval_every,
                joint_understudy=joint_understudy,
                save_at=_split(save_at, int, "--save-at steps"),
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


def _given(**options):
    """The options the user actually passed (None means: keep the config's value)."""
    return {k: v for k, v in options.items() if v is not None}


def _split(text: str | None, kind=str, what: str = "list") -> tuple | None:
    """'0.5,0.75,1' -> (0.5, 0.75, 1.0); None stays None; a bad item is a UserError naming it."""
    if text is None:
        return None
    try:
        return tuple(kind(x.strip()) for x in text.split(",") if x.strip())
    except ValueError as err:
        raise UserError(
            f"Could not read {what} {text!r} ({err}); pass comma-separated values like 0.5,1."
        ) from err


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


# ---- end section: foundation -------------------------------------------------------------------


# ---- section: understudies (capture, distill) --------------------------------------------------
def _understudy_data(model: str, data: str | None, block_size: int | None, max_chars: int | None):
    """The model's own training DataConfig (teacher.yaml) with any given overrides."""
    from moe_understudy.capture import default_data_config

    return default_data_config(model).replace(
        **_given(source=data, block_size=block_size, max_chars=max_chars)
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
            data=base.data.replace(**_given(source=data, block_size=block_size, max_chars=max_chars))
        )
    cfg = base.replace(
        model=model,
        out=str(out),
        **_given(
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
            help="dense (SwiGLU), lowrank, merged (warm start from usage-weighted experts), small_moe or shadows (default dense)."
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
            help="shadows: per-expert intermediate (swiglu) or rank (lowrank) (default expert intermediate / 4)."
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
        data=base.e2e.data.replace(**_given(source=data, block_size=block_size)),
        **_given(
            steps=e2e_steps,
            lr=e2e_lr,
            blocks=e2e_blocks,
            cache_teacher=e2e_cache,
            batch_size=e2e_batch_size,
            fraction_min=e2e_fraction_min,
            fraction_max=e2e_fraction_max,
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
        **_given(
            arch=arch,
            loss=loss,
            intermediate=intermediate,
            rank=rank,
            num_experts=num_experts,
            top_k=top_k,
            width=width,
            kind=kind,
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


# ---- end section: understudies -----------------------------------------------------------------


# ---- section: runtime (evaluate, demo) ---------------------------------------------------------
@app.command()
@user_errors
def evaluate(
    model: Annotated[
        str, typer.Argument(help="Saved MoE model folder (from `understudy teacher`) with its tokenizer.")
    ],
    understudies: Annotated[
        str | None,
        typer.Option(
            help="Understudies folder from `understudy distill`; needed by understudy, layer, deadline and shadow."
        ),
    ] = None,
    policies: Annotated[
        str,
        typer.Option(
            help="Comma-separated from full, drop, drop_renorm, reroute, understudy, shadow, layer, deadline."
        ),
    ] = "full,drop,reroute,understudy",
    capacity: Annotated[
        str,
        typer.Option(
            help="Capacity factors to sweep, comma-separated: capacity = ceil(cf * tokens * k / experts) per layer and step."
        ),
    ] = "0.5,0.75,1,1.25",
    priority: Annotated[
        str,
        typer.Option(
            help="Which assignments overflow first: position (arrival, first choices before second) or score (lowest router weight)."
        ),
    ] = "position",
    scenario: Annotated[
        str,
        typer.Option(
            help="Load scenario: natural (held-out text), domain_shift (prose unlike the training code) or hot_expert."
        ),
    ] = "natural",
    hot_expert: Annotated[
        int, typer.Option(help="hot_expert scenario: the expert whose router logit is raised in every layer.")
    ] = 0,
    hot_bias: Annotated[
        float, typer.Option(help="hot_expert scenario: logit bias added to that expert.")
    ] = 2.0,
    blocks: Annotated[
        int,
        typer.Option(
            help="Evaluation blocks of text (held-out blocks cached with the teacher when present)."
        ),
    ] = 64,
    batch_size: Annotated[
        str,
        typer.Option(
            help="Blocks per forward step; capacity is per step. Comma-separated for a batch-size sweep."
        ),
    ] = "8",
    devices: Annotated[
        int,
        typer.Option(
            help="Devices the experts are spread over (contiguously) when counting all-to-all bytes."
        ),
    ] = 4,
    readmit: Annotated[
        bool,
        typer.Option(
            help="understudy policy: give capacity freed by understudy tokens back to overflow tokens that fit."
        ),
    ] = True,
    threshold: Annotated[
        float | None,
        typer.Option(
            help="layer policy: max/mean expert load above which a layer uses its understudy (default: when any expert overflows)."
        ),
    ] = None,
    latency: Annotated[
        float,
        typer.Option(
            help="deadline policy: fixed dispatch + combine latency, in units of one expert assignment."
        ),
    ] = 0.0,
    out: Annotated[
        Path,
        typer.Option(
            help="Report folder: report.json, report.png and the eval.yaml that reproduces the run."
        ),
    ] = Path("runs/eval"),
    device: Annotated[str, typer.Option(help="Torch device.")] = "cpu",
    ep: Annotated[
        int,
        typer.Option(
            help="Run under real expert parallelism over this many local processes (torchrun, gloo on CPU); 0 = one process."
        ),
    ] = 0,
    capacity_scope: Annotated[
        str,
        typer.Option(
            help="With --ep: expert (capacity per expert) or rank (ceil(cf * tokens * k / ranks) per rank over all its experts)."
        ),
    ] = "expert",
) -> None:
    """Quality under load: perplexity, KL to full, agreement, bytes moved and load for each policy x capacity factor."""
    from moe_understudy.config import EvalConfig
    from moe_understudy.eval.quality import run_evaluation

    try:
        cfg = EvalConfig(
            model=model,
            understudies=understudies,
            out=str(out),
            policies=_split(policies, str, "policies"),
            capacities=_split(capacity, float, "capacity factors"),
            priority=priority,
            scenario=scenario,
            hot_expert=hot_expert,
            hot_bias=hot_bias,
            max_blocks=blocks,
            batch_sizes=_split(batch_size, int, "batch sizes"),
            num_devices=devices,
            readmit=readmit,
            threshold=threshold,
            latency=latency,
            device=device,
        )
    except ValueError as err:
        raise UserError(str(err)) from err
    if capacity_scope != "expert" and ep == 0:
        raise UserError(f"--capacity-scope {capacity_scope} needs expert parallelism: add --ep N.")
    if ep > 0:
        _evaluate_expert_parallel(cfg, ep, capacity_scope)
    else:
        run_evaluation(cfg, console)


def _evaluate_expert_parallel(cfg, nproc: int, capacity_scope: str) -> None:
    """`evaluate --ep N`: the same sweep on natural held-out text under real expert parallelism."""
    from moe_understudy.config import EPConfig
    from moe_understudy.runtime.ep import launch_ep, runs_table

    if cfg.scenario != "natural":
        raise UserError(f"--ep runs the natural scenario only; drop --scenario {cfg.scenario} or --ep.")
    ep_cfg = EPConfig(
        model=cfg.model,
        understudies=cfg.understudies,
        policies=cfg.policies,
        capacities=cfg.capacities,
        priority=cfg.priority,
        capacity_scope=capacity_scope,
        data=cfg.data,
        max_blocks=cfg.max_blocks,
        blocks_per_rank=max(1, cfg.batch_sizes[0] // nproc),
        out=f"{cfg.out}/ep",
    )
    console.print(runs_table(launch_ep(ep_cfg, nproc)))


@app.command()
@user_errors
def demo(
    out: Annotated[
        Path, typer.Option(help="Run folder; every finished stage in it is reused, so a rerun resumes.")
    ] = Path("runs/demo"),
    teacher: Annotated[
        Path | None, typer.Option(help="Use this trained teacher instead of training one in OUT/teacher.")
    ] = None,
    arch: Annotated[
        str, typer.Option(help="Understudy architecture: dense, lowrank, merged, small_moe or shadows.")
    ] = "dense",
    intermediate: Annotated[
        int | None, typer.Option(help="Understudy intermediate size (default: one expert's).")
    ] = None,
    e2e_steps: Annotated[
        int | None, typer.Option(help="End-to-end KL steps after layer-wise distillation (0 skips).")
    ] = None,
    capacity: Annotated[
        str | None, typer.Option(help="Comma-separated capacity factors (default 0.5,0.75,1,1.25).")
    ] = None,
    quick: Annotated[
        bool, typer.Option("--quick", help="Seconds-long smoke run on the quick preset.")
    ] = False,
) -> None:
    """The whole pipeline on the default corpus: teacher, capture, distil, evaluate, report (~15 min on 2 cores)."""
    from moe_understudy.config import DemoConfig
    from moe_understudy.demo import run_demo

    cfg = DemoConfig(
        out=str(out),
        teacher=str(teacher) if teacher else None,
        quick=quick,
        arch=arch,
        intermediate=intermediate,
        **_given(e2e_steps=e2e_steps, capacities=_split(capacity, float, "capacity factors")),
    )
    run_demo(cfg, console=console)


# ---- end section: runtime ----------------------------------------------------------------------


# ---- section: parallel (simulate, ep) ----------------------------------------------------------
@app.command()
@user_errors
def simulate(
    model: Annotated[
        str | None,
        typer.Option(
            help="Capture the routing trace from this saved MoE model folder (its held-out blocks)."
        ),
    ] = None,
    trace: Annotated[
        Path | None,
        typer.Option(
            help="Replay a saved trace (.safetensors, e.g. trace.safetensors of an earlier run) instead."
        ),
    ] = None,
    zipf: Annotated[
        float | None,
        typer.Option(
            help="Without --model/--trace: Zipf exponent of the synthetic expert popularity (0 = uniform)."
        ),
    ] = None,
    experts: Annotated[int | None, typer.Option(help="Synthetic trace: experts per layer.")] = None,
    ranks: Annotated[
        str | None,
        typer.Option(
            help="Cluster sizes, comma-separated (default 8,16,32,64,128,256); experts are tiled when ranks > experts."
        ),
    ] = None,
    policies: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated from full, drop, reroute, understudy, replication, speculative (default all)."
        ),
    ] = None,
    capacity_factor: Annotated[
        float | None,
        typer.Option(
            help="Capacity factor of drop / reroute / understudy: capacity = ceil(cf * tokens * k / experts)."
        ),
    ] = None,
    priority: Annotated[
        str | None, typer.Option(help="Which assignments overflow first: position or score.")
    ] = None,
    tokens_per_rank: Annotated[
        int | None, typer.Option(help="Tokens each rank holds per step (weak scaling).")
    ] = None,
    steps: Annotated[
        int | None, typer.Option(help="Simulated steps per cluster size (fresh token sample each).")
    ] = None,
    expansion: Annotated[
        str | None,
        typer.Option(
            help="When ranks > experts, split experts into siblings chosen per assignment (random: keeps the captured skew) or per token id (token: keeps predictability)."
        ),
    ] = None,
    understudy_cost: Annotated[
        float | None,
        typer.Option(
            help="Understudy FLOPs / active routed-expert FLOPs; also sets replication's equal-memory budget."
        ),
    ] = None,
    hidden_size: Annotated[
        int | None, typer.Option(help="Hidden size of the simulated layer (default 4096).")
    ] = None,
    expert_intermediate: Annotated[
        int | None, typer.Option(help="Intermediate size of one simulated expert (default 14336).")
    ] = None,
    device_tflops: Annotated[
        float | None, typer.Option(help="Sustained expert throughput per device, TFLOP/s (default 400).")
    ] = None,
    link_gbps: Annotated[
        float | None, typer.Option(help="All-to-all bandwidth per device, GB/s (default 50).")
    ] = None,
    latency_us: Annotated[
        float | None, typer.Option(help="Fixed latency of one all-to-all, microseconds (default 10).")
    ] = None,
    quality: Annotated[
        str | None,
        typer.Option(
            help="JSON with measured quality per policy and capacity (default benchmarks/results/quality_under_load.json)."
        ),
    ] = None,
    out: Annotated[
        str | None, typer.Option(help="Output folder: sim.json, sim.png, sim.yaml, trace.safetensors.")
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Random seed (token sampling, synthetic trace, expansion).")
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="Read options from a sim.yaml (flags given here override it).")
    ] = None,
) -> None:
    """Replay routing over 8..256 simulated ranks per policy; print a table, plot step time and bytes against ranks."""
    from moe_understudy.config import SimConfig
    from moe_understudy.sim.workflow import run_simulation

    try:
        base = SimConfig.from_yaml(config) if config else SimConfig()
        cost = base.cost.replace(
            **_given(
                understudy_cost=understudy_cost,
                hidden_size=hidden_size,
                expert_intermediate=expert_intermediate,
                device_tflops=device_tflops,
                link_gbps=link_gbps,
                latency_us=latency_us,
            )
        )
        cfg = base.replace(
            cost=cost,
            **_given(
                model=model,
                trace=None if trace is None else str(trace),
                zipf=zipf,
                synthetic_experts=experts,
                ranks=_split(ranks, int, "rank counts"),
                policies=_split(policies, str, "policies"),
                capacity_factor=capacity_factor,
                priority=priority,
                tokens_per_rank=tokens_per_rank,
                steps=steps,
                expansion=expansion,
                quality=quality,
                out=out,
                seed=seed,
            ),
        )
    except ValueError as err:
        raise UserError(str(err)) from err
    run_simulation(cfg, console=console)


@app.command("ep")
@user_errors
def ep_evaluate(
    model: Annotated[str | None, typer.Option(help="Saved MoE model folder (default runs/teacher).")] = None,
    nproc: Annotated[
        int, typer.Option(help="Processes (ranks) to launch through torchrun; experts are spread over them.")
    ] = 2,
    understudies: Annotated[
        str | None,
        typer.Option(help="Folder from `understudy distill`; needed by understudy/layer/deadline/shadow."),
    ] = None,
    policies: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated policies run in one launch: full, drop, drop_renorm, reroute, understudy, shadow, layer, deadline."
        ),
    ] = None,
    capacities: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated capacity factors (every policy but full), over the GLOBAL batch: ceil(cf * tokens of all ranks * k / experts)."
        ),
    ] = None,
    priority: Annotated[
        str | None, typer.Option(help="Which assignments overflow first: position or score.")
    ] = None,
    capacity_scope: Annotated[
        str | None,
        typer.Option(
            help="expert: capacity per expert; rank: ceil(cf * tokens * k / ranks) per rank over all its experts, which evens out rank load (not with --placement replicate)."
        ),
    ] = None,
    placement: Annotated[
        str | None,
        typer.Option(
            help="contiguous, replicate (hot experts, measured on train blocks) or a JSON file with expert_to_rank."
        ),
    ] = None,
    extra_slots: Annotated[
        int | None,
        typer.Option(help="With --placement replicate: expert slots per rank beyond ceil(experts / ranks)."),
    ] = None,
    max_blocks: Annotated[int | None, typer.Option(help="Held-out blocks evaluated over all ranks.")] = None,
    blocks_per_rank: Annotated[
        int | None, typer.Option(help="Blocks each rank feeds per step (global batch = ranks x this).")
    ] = None,
    timeout_s: Annotated[
        float | None,
        typer.Option(help="Collective timeout in seconds: a dead rank makes the others fail after this."),
    ] = None,
    backend: Annotated[
        str | None, typer.Option(help="auto (nccl with CUDA, else gloo), gloo or nccl.")
    ] = None,
    out: Annotated[
        str | None,
        typer.Option(help="Output folder: ep.json (summary + per-rank, per-step records), ep.yaml."),
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="Read options from an ep.yaml (flags given here override it).")
    ] = None,
) -> None:
    """Evaluate policies under real expert parallelism over NPROC local processes (torchrun; gloo on CPU, nccl on GPU)."""
    from moe_understudy.config import EPConfig
    from moe_understudy.runtime.ep import launch_ep

    try:
        base = EPConfig.from_yaml(config) if config else EPConfig()
        cfg = base.replace(
            **_given(
                model=model,
                understudies=understudies,
                policies=_split(policies, str, "policies"),
                capacities=_split(capacities, float, "capacity factors"),
                priority=priority,
                capacity_scope=capacity_scope,
                placement=placement,
                extra_slots=extra_slots,
                max_blocks=max_blocks,
                blocks_per_rank=blocks_per_rank,
                timeout_s=timeout_s,
                backend=backend,
                out=out,
            )
        )
    except ValueError as err:
        raise UserError(str(err)) from err
    if nproc < 1:
        raise UserError(f"--nproc must be at least 1, got {nproc}.")
    from moe_understudy.runtime.ep import runs_table

    console.print(
        runs_table(launch_ep(cfg, nproc), title=f"expert parallelism over {nproc} ranks ({cfg.placement})")
    )
    console.print(f"wrote {cfg.out}/ep.json")


# ---- end section: parallel ---------------------------------------------------------------------


# ---- section: kd (sft, kd, rouge) --------------------------------------------------------------
# Options that sft, kd and rouge share (one declaration, one help text).
FmtOption = Annotated[str | None, typer.Option(help="Instruction format of the files (default auto-detect).")]
ValDataOption = Annotated[
    str | None,
    typer.Option(
        help="Validation file for checkpoint selection (default: hold out --val-examples rows of --data)."
    ),
]
MaxExamplesOption = Annotated[int | None, typer.Option(help="Use at most this many training examples.")]
MaxPromptOption = Annotated[
    int | None, typer.Option(help="Prompt tokens kept, cut from the left (default 256).")
]
MaxTotalOption = Annotated[int | None, typer.Option(help="Prompt + response tokens kept (default 512).")]
EvalEveryOption = Annotated[
    int | None,
    typer.Option(help="Steps between validation ROUGE-L checks and checkpoints (default 100)."),
]
MaxNewTokensOption = Annotated[
    int | None, typer.Option(help="Generated tokens per validation response (default 64).")
]
SeedOption = Annotated[int | None, typer.Option(help="Random seed (default 0).")]
ResumeOption = Annotated[bool, typer.Option("--resume", help="Continue from the checkpoint in --out.")]


@app.command()
@user_errors
def sft(
    data: Annotated[
        str,
        typer.Option(
            help="Instruction file (.jsonl/.json, optionally .gz): Dolly, Alpaca, prompt/response, prompt/completion or Self-Instruct rows."
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            help="Run folder: the model chosen by validation ROUGE-L (save_pretrained + tokenizer), checkpoint/, sft_log.json."
        ),
    ],
    model: Annotated[
        str | None,
        typer.Option(
            help="Preset name to train from scratch (e.g. mixtral, quick, quick-student) or a saved model folder to fine-tune (default quick)."
        ),
    ] = None,
    tokenizer: Annotated[
        str | None, typer.Option(help="Tokenizer folder for a preset model (default: train a BPE on --data).")
    ] = None,
    vocab_size: Annotated[
        int | None, typer.Option(help="BPE vocabulary when a tokenizer is trained here (default 4096).")
    ] = None,
    fmt: FmtOption = None,
    val_data: ValDataOption = None,
    val_examples: Annotated[
        int | None,
        typer.Option(
            help="Validation examples scored by greedy ROUGE-L (default 64; 0 keeps the last model)."
        ),
    ] = None,
    max_examples: MaxExamplesOption = None,
    max_prompt: MaxPromptOption = None,
    max_total: MaxTotalOption = None,
    steps: Annotated[int | None, typer.Option(help="Optimiser steps (default 500).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Examples per step (default 16).")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak AdamW learning rate (default 1e-3).")] = None,
    warmup: Annotated[int | None, typer.Option(help="Linear warm-up steps (default 20).")] = None,
    eval_every: EvalEveryOption = None,
    max_new_tokens: MaxNewTokensOption = None,
    seed: SeedOption = None,
    resume: ResumeOption = False,
    config: Annotated[
        Path | None, typer.Option(help="Read options from an sft.yaml (flags given here override it).")
    ] = None,
) -> None:
    """Fine-tune a model on instruction data with the prompt masked from the loss (teacher or student)."""
    from moe_understudy.config import SFTConfig
    from moe_understudy.kd.sft import run_sft

    base = SFTConfig.from_yaml(config) if config else SFTConfig()
    cfg = _kd_config(
        base,
        data=data,
        model=model,
        tokenizer=tokenizer,
        vocab_size=vocab_size,
        fmt=fmt,
        val_data=val_data,
        val_examples=val_examples,
        max_examples=max_examples,
        max_prompt=max_prompt,
        max_total=max_total,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        warmup=warmup,
        eval_every=eval_every,
        max_new_tokens=max_new_tokens,
        seed=seed,
    )
    summary = run_sft(cfg, out, resume=resume, console=console)
    console.print(
        f"[bold green]model saved to {out}[/]: best validation ROUGE-L {_fmt_rouge(summary['best_val_rouge_l'])}"
    )


@app.command()
@user_errors
def kd(
    data: Annotated[
        str,
        typer.Option(
            help="Instruction file with the prompts (and responses, for --method kd or --off-policy)."
        ),
    ],
    teacher: Annotated[
        str,
        typer.Option(
            help="Saved MoE teacher folder (e.g. from `understudy sft --model mixtral`); its tokenizer is used."
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(help="Run folder: the student chosen by validation ROUGE-L, checkpoint/, kd_log.json."),
    ],
    method: Annotated[
        str | None,
        typer.Option(
            help="kd (forward KL on dataset responses), gkd (reverse KL on student samples), all (teacher runs every expert), ka (Knowledge Augmentation: --ka-passes teacher passes per input, losses averaged into one update), sar (Student-Aware Router: a teacher-router step minimising KL(teacher || student) through the routers, the direction of EEM's finetune_sfr.py, mode-seeking toward what the student can fit, + load balancing under the router's own scores; then the student step), bdistill (MoE student: MC exploration + router distillation; our formulation from B-Distill's public abstract). Default kd."
        ),
    ] = None,
    student: Annotated[
        str | None,
        typer.Option(
            help="Student: a preset (quick-student, llama-student, quick-moe-student, moe-student) or a saved folder sharing the teacher's tokenizer (default quick-student)."
        ),
    ] = None,
    divergence: Annotated[
        str | None, typer.Option(help="fkl, rkl, skew_fkl or skew_rkl (default: fkl for kd, rkl otherwise).")
    ] = None,
    off_policy: Annotated[
        bool,
        typer.Option(
            "--off-policy",
            help="Distil on the dataset's responses instead of student samples (non-kd methods).",
        ),
    ] = False,
    fmt: FmtOption = None,
    val_data: ValDataOption = None,
    val_examples: Annotated[
        int | None, typer.Option(help="Validation examples scored by greedy ROUGE-L (default 64).")
    ] = None,
    max_examples: MaxExamplesOption = None,
    max_prompt: MaxPromptOption = None,
    max_total: MaxTotalOption = None,
    gen_max_new_tokens: Annotated[
        int | None, typer.Option(help="Length of student-sampled responses (default 64).")
    ] = None,
    steps: Annotated[
        int | None, typer.Option(help="Optimiser steps, one student update each, every method (default 300).")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Prompts per step (default 8).")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak student learning rate (default 5e-4).")] = None,
    warmup: Annotated[int | None, typer.Option(help="Linear warm-up steps (default 10).")] = None,
    ka_experts: Annotated[
        int | None, typer.Option(help="KA: experts the teacher activates per layer (default N-1).")
    ] = None,
    ka_lambda: Annotated[
        float | None,
        typer.Option(
            help="KA: per-token probability of sampling experts instead of taking the top ones (default 0.05)."
        ),
    ] = None,
    ka_passes: Annotated[
        int | None,
        typer.Option(help="KA: teacher passes per input per step, averaged into one update (default 2)."),
    ] = None,
    sar_lr: Annotated[
        float | None, typer.Option(help="SAR: learning rate of the teacher-router optimiser (default 1e-4).")
    ] = None,
    sar_beta: Annotated[
        float | None, typer.Option(help="SAR: weight of the load-balancing loss (default 0.01).")
    ] = None,
    explore_eps: Annotated[
        float | None,
        typer.Option(help="B-Distill: uniform mixing of router probabilities for exploration (default 0.1)."),
    ] = None,
    router_kl_weight: Annotated[
        float | None, typer.Option(help="B-Distill: weight of the router KL (default 0.1).")
    ] = None,
    entropy_floor: Annotated[
        float | None,
        typer.Option(help="B-Distill: router entropy floor as a fraction of log(experts) (default 0.5)."),
    ] = None,
    entropy_weight: Annotated[
        float | None, typer.Option(help="B-Distill: weight of the entropy-floor penalty (default 0.1).")
    ] = None,
    eval_every: EvalEveryOption = None,
    max_new_tokens: MaxNewTokensOption = None,
    seed: SeedOption = None,
    resume: ResumeOption = False,
    config: Annotated[
        Path | None,
        typer.Option(
            help="Read options from a kd.yaml (flags given here override it); e.g. teacher_passes: M gives kd/gkd M x batch-size examples per step, KA's teacher forwards."
        ),
    ] = None,
) -> None:
    """Distil a whole MoE teacher into a dense or smaller MoE student (KD, GKD, ALL, KA, SAR, B-Distill)."""
    from moe_understudy.config import KDConfig
    from moe_understudy.kd.trainer import run_kd

    base = KDConfig.from_yaml(config) if config else KDConfig()
    cfg = _kd_config(
        base,
        data=data,
        teacher=teacher,
        method=method,
        student=student,
        divergence=divergence,
        on_policy=False if off_policy else None,
        fmt=fmt,
        val_data=val_data,
        val_examples=val_examples,
        max_examples=max_examples,
        max_prompt=max_prompt,
        max_total=max_total,
        gen_max_new_tokens=gen_max_new_tokens,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        warmup=warmup,
        ka_experts=ka_experts,
        ka_lambda=ka_lambda,
        ka_passes=ka_passes,
        sar_lr=sar_lr,
        sar_beta=sar_beta,
        explore_eps=explore_eps,
        router_kl_weight=router_kl_weight,
        entropy_floor=entropy_floor,
        entropy_weight=entropy_weight,
        eval_every=eval_every,
        max_new_tokens=max_new_tokens,
        seed=seed,
    )
    summary = run_kd(cfg, out, resume=resume, console=console)
    console.print(
        f"[bold green]student saved to {out}[/] ({cfg.method}): best validation ROUGE-L {_fmt_rouge(summary['best_val_rouge_l'])}"
    )


@app.command()
@user_errors
def rouge(
    model: Annotated[str, typer.Argument(help="Saved model folder (with its tokenizer).")],
    data: Annotated[
        list[str], typer.Option(help="Instruction file to score; repeat --data for several datasets.")
    ],
    fmt: FmtOption = None,
    seeds: Annotated[
        str | None, typer.Option(help="Comma-separated sampling seeds (default 10,20,30,40,50).")
    ] = None,
    greedy: Annotated[
        bool, typer.Option("--greedy", help="Greedy decoding, one pass, instead of sampling over seeds.")
    ] = False,
    temperature: Annotated[float | None, typer.Option(help="Sampling temperature (default 1.0).")] = None,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling mass (default 1.0 = off).")] = None,
    top_k: Annotated[int | None, typer.Option(help="Top-k sampling (default 0 = off).")] = None,
    max_new_tokens: Annotated[
        int | None,
        typer.Option(help="Generated tokens per response, cut earlier at end-of-text (default 128)."),
    ] = None,
    max_prompt: MaxPromptOption = None,
    batch_size: Annotated[
        int | None,
        typer.Option(help="Prompts generated together with left padding and the KV cache (default 16)."),
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Score at most this many examples per file.")] = None,
    out: Annotated[
        Path | None, typer.Option(help="Write the report (per dataset, per task, per seed) as JSON here.")
    ] = None,
) -> None:
    """Generate responses and score ROUGE-L F1 x100 per dataset and task, mean and std over seeds."""
    from moe_understudy.config import RougeConfig
    from moe_understudy.eval.rouge import run_rouge

    if seeds is not None:
        try:
            seed_list = tuple(int(s) for s in seeds.split(",") if s.strip())
        except ValueError as err:
            raise UserError(
                f"--seeds {seeds!r} is not a comma-separated list of integers; pass e.g. 10,20,30."
            ) from err
    cfg = _kd_config(
        RougeConfig(data=tuple(data)),
        model=model,
        fmt=fmt,
        seeds=seed_list if seeds is not None else None,
        greedy=greedy,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        max_new_tokens=max_new_tokens,
        max_prompt=max_prompt,
        batch_size=batch_size,
        limit=limit,
        out=str(out) if out else None,
    )
    run_rouge(cfg, console=console)


def _kd_config(base, **options):
    """`base` with the given options applied; invalid values become one-sentence UserErrors."""
    try:
        return base.replace(**{k: v for k, v in options.items() if v is not None})
    except ValueError as err:
        raise UserError(f"{err} Fix the option and rerun.") from err


def _fmt_rouge(value) -> str:
    return "n/a (no validation examples)" if value is None else f"{value:.2f}"


# ---- end section: kd ---------------------------------------------------------------------------


if __name__ == "__main__":
    app()
