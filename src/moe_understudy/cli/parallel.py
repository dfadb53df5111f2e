"""`understudy simulate` and `understudy ep`: the cluster simulator and real expert parallelism."""

from __future__ import annotations

from typing import Annotated

import typer

from moe_understudy.cli.common import LOAD, RUN, TEXT, command, console, model_data
from moe_understudy.cli.fields import Stage
from moe_understudy.cli.runtime import backend_of
from moe_understudy.config import EPConfig, SimConfig
from moe_understudy.errors import UserError

ModelOption = Annotated[
    str | None,
    typer.Option(help="Saved MoE model folder (from `understudy teacher`) or a transformers MoE checkpoint."),
]
# The cluster cost model's options are fields of SimConfig.cost (config.ClusterCost).
_COST = ("understudy_cost", "hidden_size", "expert_intermediate", "device_tflops", "link_gbps", "latency_us")
SIMULATE = Stage(
    SimConfig,
    {
        "trace": "Replay a saved trace (.safetensors, e.g. trace.safetensors of an earlier run) instead.",
        "zipf": "Without --model/--trace: Zipf exponent of the synthetic expert popularity (0 = uniform).",
        "experts": "Synthetic trace: experts per layer.",
        "ranks": "Cluster sizes, comma-separated; experts are tiled when ranks > experts.",
        "policies": "Comma-separated from full, drop, reroute, understudy, replication, speculative.",
        "capacity_factor": "Capacity factor of drop / reroute / understudy: capacity = ceil(cf * tokens * k / experts).",
        "tokens_per_rank": "Tokens each rank holds per step (weak scaling).",
        "steps": "Simulated steps per cluster size (fresh token sample each).",
        "expansion": "When ranks > experts, split experts into siblings chosen per assignment (random: keeps the "
        "captured skew) or per token id (token: keeps predictability).",
        "understudy_cost": "Understudy FLOPs / active routed-expert FLOPs; also sets replication's equal-memory budget.",
        "hidden_size": "Hidden size of the simulated layer.",
        "expert_intermediate": "Intermediate size of one simulated expert.",
        "device_tflops": "Sustained expert throughput per device, TFLOP/s.",
        "link_gbps": "All-to-all bandwidth per device, GB/s.",
        "latency_us": "Fixed latency of one all-to-all, microseconds.",
        "quality": "JSON with measured quality per policy and capacity.",
        "out": "Output folder: sim.json, sim.png, sim.yaml, trace.safetensors.",
        "seed": "Random seed (token sampling, synthetic trace, expansion).",
    },
    renames={"experts": "synthetic_experts", **{name: f"cost.{name}" for name in _COST}},
    paths=("trace",),
)


@command(lead=("priority",), tail=(*TEXT, *RUN), stage=SIMULATE)
def simulate(ctx: typer.Context, model: ModelOption = None) -> None:
    """Replay routing over 8..256 simulated ranks per policy; print a table, plot step time and bytes against ranks.

    The trace comes from --trace, else from MODEL on --data (default: its own held-out text), else a
    synthetic Zipf trace.
    """
    from moe_understudy.sim.workflow import run_simulation

    cfg = SIMULATE.configure(
        ctx.params,
        data_start=lambda: model_data(model, notice=ctx.params["data"] is None),
    )
    run_simulation(cfg, console=console)  # writes OUT/sim.yaml


EP = Stage(
    EPConfig,
    {
        "capacity_scope": "expert: capacity per expert; rank: ceil(cf * tokens * k / ranks) per rank over all its "
        "experts, which evens out rank load (not with --placement replicate).",
        "placement": "contiguous, replicate (hot experts, measured on train blocks) or a JSON file with expert_to_rank.",
        "extra_slots": "With --placement replicate: expert slots per rank beyond ceil(experts / ranks).",
        "calibration": "With --placement replicate: the text EPLB plans on: train (an earlier window, EPLB "
        "stale), eval (the served blocks, EPLB fresh) or a corpus source (another domain).",
        "expanded_m": "expanded_drop / expanded_shadow: candidates per token on its own rank.",
        "max_blocks": "Held-out blocks evaluated over all ranks.",
        "blocks_per_rank": "Blocks each rank feeds per step (global batch = ranks x this).",
        "timeout_s": "Collective timeout in seconds: a dead rank makes the others fail after this.",
        "backend": "auto (nccl with CUDA, else gloo), gloo or nccl.",
        "out": "Output folder: ep.json (summary + per-rank, per-step records), ep.yaml.",
    },
)


@command("ep", lead=LOAD, tail=(*TEXT, *RUN), stage=EP)
def ep_evaluate(
    ctx: typer.Context,
    model: ModelOption = None,
    nproc: Annotated[
        int, typer.Option(help="Processes (ranks) to launch through torchrun; experts are spread over them.")
    ] = 2,
) -> None:
    """Evaluate policies under real expert parallelism over NPROC local processes (torchrun; gloo on CPU, nccl on GPU).

    --placement replicate measures expert load on the model folder's cached train blocks, else on
    the train split of --data (or of the model's own corpus).
    """
    from moe_understudy.runtime.ep import launch_ep, runs_table

    params = dict(ctx.params)
    if params.get("backend") is None and params["device"] is not None:
        params["backend"] = backend_of(params["device"])
    cfg = EP.configure(
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
