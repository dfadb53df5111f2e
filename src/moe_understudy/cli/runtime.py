"""`understudy evaluate` and `understudy demo`: quality under load, and the whole pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moe_understudy.cli.common import (
    LOAD,
    TEXT,
    ModelArgument,
    command,
    configure,
    console,
    model_data,
)
from moe_understudy.errors import UserError


@command(lead=(*LOAD, *TEXT))
def evaluate(
    ctx: typer.Context,
    model: ModelArgument = None,
    scenario: Annotated[
        str | None,
        typer.Option(
            help="Load scenario: natural (held-out text, the default), domain_shift (prose unlike the training code) or hot_expert."
        ),
    ] = None,
    hot_expert: Annotated[
        int | None,
        typer.Option(
            help="hot_expert scenario: the expert whose router logit is raised in every layer (default 0)."
        ),
    ] = None,
    hot_bias: Annotated[
        float | None, typer.Option(help="hot_expert scenario: logit bias added to that expert (default 2).")
    ] = None,
    blocks: Annotated[
        int | None,
        typer.Option(
            help="Evaluation blocks of text (default 64; held-out blocks cached with the teacher when present)."
        ),
    ] = None,
    batch_size: Annotated[
        str | None,
        typer.Option(
            help="Blocks per forward step; capacity is per step. Comma-separated for a batch-size sweep (default 8)."
        ),
    ] = None,
    devices: Annotated[
        int | None,
        typer.Option(
            help="Devices the experts are spread over (contiguously) when counting all-to-all bytes (default 4)."
        ),
    ] = None,
    readmit: Annotated[
        bool | None,
        typer.Option(
            help="understudy policy: give capacity freed by understudy tokens back to overflow tokens that fit (default on)."
        ),
    ] = None,
    threshold: Annotated[
        float | None,
        typer.Option(
            help="layer policy: max/mean expert load above which a layer uses its understudy (default: when any expert overflows)."
        ),
    ] = None,
    latency: Annotated[
        float | None,
        typer.Option(
            help="deadline policy: fixed dispatch + combine latency, in units of one expert assignment (default 0)."
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Report folder: report.json, report.png and the eval.yaml that replays the run (default runs/eval)."
        ),
    ] = None,
    ep: Annotated[
        int,
        typer.Option(
            help="Run under real expert parallelism over this many local processes (torchrun, gloo on CPU); 0 = one process."
        ),
    ] = 0,
    capacity_scope: Annotated[
        str | None,
        typer.Option(
            help="expert (capacity per expert, default) or rank (ceil(cf * tokens * k / ranks) per rank over all its "
            "experts: the --ep ranks, or --devices simulated devices in one process)."
        ),
    ] = None,
    expanded_m: Annotated[
        int | None,
        typer.Option(help="expanded_drop / expanded_shadow: local candidates per token (default 1)."),
    ] = None,
) -> None:
    """Quality under load: perplexity, KL to full, agreement, bytes moved and load for each policy x capacity factor."""
    from moe_understudy.config import EvalConfig
    from moe_understudy.eval.quality import run_evaluation

    cfg = configure(
        EvalConfig,
        ctx.params,
        renames={"blocks": "max_blocks", "batch_size": "batch_sizes", "devices": "num_devices"},
        ignore=("ep",),
        data_start=lambda: model_data(model, notice=ctx.params["data"] is None),
    )
    if ep > 0:
        _evaluate_expert_parallel(cfg, ep, cfg.capacity_scope, ctx.params["device"])
    else:
        run_evaluation(cfg, console)  # writes OUT/eval.yaml


def _evaluate_expert_parallel(cfg, nproc: int, capacity_scope: str, device: str | None) -> None:
    """`evaluate --ep N`: the same sweep on natural held-out text under real expert parallelism."""
    from moe_understudy.config import EPConfig
    from moe_understudy.eval.quality import default_policies
    from moe_understudy.runtime.ep import launch_ep, runs_table

    if cfg.scenario != "natural":
        raise UserError(f"--ep runs the natural scenario only; drop --scenario {cfg.scenario} or --ep.")
    ep_cfg = EPConfig(
        model=cfg.model,
        understudies=cfg.understudies,
        policies=cfg.policies or default_policies(cfg.understudies),
        capacities=cfg.capacities,
        priority=cfg.priority,
        capacity_scope=capacity_scope,
        data=cfg.data,
        max_blocks=cfg.max_blocks,
        blocks_per_rank=max(1, cfg.batch_sizes[0] // nproc),
        out=f"{cfg.out}/ep",
        dtype=cfg.dtype,
        backend=backend_of(device),
    )
    console.print(runs_table(launch_ep(ep_cfg, nproc)))


def backend_of(device: str | None) -> str:
    """The EP backend a --device asks for: cpu -> gloo, cuda -> nccl; none or auto: nccl with CUDA, else gloo."""
    if device is None or device == "auto":
        return "auto"
    return "nccl" if str(device).startswith("cuda") else "gloo"


@command(tail=("device", "config", "debug"))
def demo(
    ctx: typer.Context,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Run folder (default runs/demo); every finished stage in it is reused, so a rerun resumes."
        ),
    ] = None,
    teacher: Annotated[
        Path | None, typer.Option(help="Use this trained teacher instead of training one in OUT/teacher.")
    ] = None,
    teacher_steps: Annotated[
        int | None,
        typer.Option(help="Training steps of the demo's teacher (default 1000; `understudy teacher`: 1400)."),
    ] = None,
    arch: Annotated[
        str | None,
        typer.Option(
            help="Stand-in architecture: trunk (default), shadows, dense, lowrank, merged or small_moe."
        ),
    ] = None,
    intermediate: Annotated[
        int | None, typer.Option(help="Understudy intermediate size (default: one expert's).")
    ] = None,
    e2e_steps: Annotated[
        int | None, typer.Option(help="End-to-end KL steps after layer-wise distillation (0 skips).")
    ] = None,
    capacity: Annotated[
        str | None, typer.Option(help="Comma-separated capacity factors (default 1,1.5,2).")
    ] = None,
    quick: Annotated[
        bool | None, typer.Option("--quick", help="Seconds-long smoke run on the quick preset.")
    ] = None,
    dtype: Annotated[
        str | None,
        typer.Option(
            help="Every stage's dtype: float32 (default), bfloat16 or float16; the teacher trains under autocast "
            "to it (fp32 weights), capture, distil and evaluate run the model in it."
        ),
    ] = None,
) -> None:
    """The whole pipeline on the default corpus: teacher, capture, distil the trunk, evaluate it beside token drop
    and expanded drop (score priority), report (about 6 min on 2 quiet cores)."""
    from moe_understudy.config import DemoConfig
    from moe_understudy.demo import run_demo

    cfg = configure(DemoConfig, ctx.params, renames={"capacity": "capacities"})
    run_demo(cfg, console=console)  # writes OUT/demo.yaml
