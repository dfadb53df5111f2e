"""`understudy simulate` and `understudy ep`: the cluster simulator and real expert parallelism."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moe_understudy.cli.common import (
    LOAD,
    RUN,
    TEXT,
    PriorityOption,
    command,
    configure,
    console,
    model_data,
)
from moe_understudy.cli.runtime import backend_of
from moe_understudy.errors import UserError

ModelOption = Annotated[
    str | None,
    typer.Option(help="Saved MoE model folder (from `understudy teacher`) or a transformers MoE checkpoint."),
]
# The cluster cost model's options are fields of SimConfig.cost (config.ClusterCost).
_COST = ("understudy_cost", "hidden_size", "expert_intermediate", "device_tflops", "link_gbps", "latency_us")


@command(tail=(*TEXT, *RUN))
def simulate(
    ctx: typer.Context,
    model: ModelOption = None,
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
    priority: PriorityOption = None,
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
        int | None, typer.Option(help="Hidden size of the simulated layer (default: config.ClusterCost).")
    ] = None,
    expert_intermediate: Annotated[
        int | None,
        typer.Option(help="Intermediate size of one simulated expert (default: config.ClusterCost)."),
    ] = None,
    device_tflops: Annotated[
        float | None,
        typer.Option(help="Sustained expert throughput per device, TFLOP/s (default: config.ClusterCost)."),
    ] = None,
    link_gbps: Annotated[
        float | None,
        typer.Option(help="All-to-all bandwidth per device, GB/s (default: config.ClusterCost)."),
    ] = None,
    latency_us: Annotated[
        float | None,
        typer.Option(help="Fixed latency of one all-to-all, microseconds (default: config.ClusterCost)."),
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
) -> None:
    """Replay routing over 8..256 simulated ranks per policy; print a table, plot step time and bytes against ranks.

    The trace comes from --trace, else from MODEL on --data (default: its own held-out text), else a
    synthetic Zipf trace.
    """
    from moe_understudy.config import SimConfig
    from moe_understudy.sim.workflow import run_simulation

    cfg = configure(
        SimConfig,
        ctx.params,
        renames={"experts": "synthetic_experts", **{name: f"cost.{name}" for name in _COST}},
        data_start=lambda: model_data(model, notice=ctx.params["data"] is None),
    )
    run_simulation(cfg, console=console)  # writes OUT/sim.yaml


@command("ep", lead=LOAD, tail=(*TEXT, *RUN))
def ep_evaluate(
    ctx: typer.Context,
    model: ModelOption = None,
    nproc: Annotated[
        int, typer.Option(help="Processes (ranks) to launch through torchrun; experts are spread over them.")
    ] = 2,
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
    calibration: Annotated[
        str | None,
        typer.Option(
            help="With --placement replicate: the text EPLB plans on: train (default; an earlier window, EPLB "
            "stale), eval (the served blocks, EPLB fresh) or a corpus source (another domain)."
        ),
    ] = None,
    expanded_m: Annotated[
        int | None,
        typer.Option(
            help="expanded_drop / expanded_shadow: candidates per token on its own rank (default 1)."
        ),
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
) -> None:
    """Evaluate policies under real expert parallelism over NPROC local processes (torchrun; gloo on CPU, nccl on GPU).

    --placement replicate measures expert load on the model folder's cached train blocks, else on
    the train split of --data (or of the model's own corpus).
    """
    from moe_understudy.config import EPConfig
    from moe_understudy.runtime.ep import launch_ep, runs_table

    params = dict(ctx.params)
    if params.get("backend") is None and params["device"] is not None:
        params["backend"] = backend_of(params["device"])
    cfg = configure(
        EPConfig,
        params,
        ignore=("nproc", "device"),
        data_start=lambda: model_data(model, notice=ctx.params["data"] is None),
    )
    if nproc < 1:
        raise UserError(f"--nproc must be at least 1, got {nproc}.")
    console.print(
        runs_table(launch_ep(cfg, nproc), title=f"expert parallelism over {nproc} ranks ({cfg.placement})")
    )
    console.print(f"wrote {cfg.out}/ep.json (replay with --config {cfg.out}/ep.yaml)")
