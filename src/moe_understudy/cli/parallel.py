"""`understudy simulate` and `understudy ep`: the cluster simulator and real expert parallelism."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moe_understudy.cli.common import app, console, given, split, user_errors
from moe_understudy.errors import UserError


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
            **given(
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
            **given(
                model=model,
                trace=None if trace is None else str(trace),
                zipf=zipf,
                synthetic_experts=experts,
                ranks=split(ranks, int, "rank counts"),
                policies=split(policies, str, "policies"),
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
            **given(
                model=model,
                understudies=understudies,
                policies=split(policies, str, "policies"),
                capacities=split(capacities, float, "capacity factors"),
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
