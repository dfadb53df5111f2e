"""`understudy evaluate` and `understudy demo`: quality under load, and the whole pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moe_understudy.cli.common import app, console, given, split, user_errors
from moe_understudy.errors import UserError


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
            policies=split(policies, str, "policies"),
            capacities=split(capacity, float, "capacity factors"),
            priority=priority,
            scenario=scenario,
            hot_expert=hot_expert,
            hot_bias=hot_bias,
            max_blocks=blocks,
            batch_sizes=split(batch_size, int, "batch sizes"),
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
        **given(e2e_steps=e2e_steps, capacities=split(capacity, float, "capacity factors")),
    )
    run_demo(cfg, console=console)
