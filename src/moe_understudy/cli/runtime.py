"""`understudy evaluate` and `understudy demo`: quality under load, and the whole pipeline."""

from __future__ import annotations

from typing import Annotated

import typer

from moe_understudy.cli.common import (
    LOAD,
    TEXT,
    ModelArgument,
    command,
    console,
    model_data,
)
from moe_understudy.cli.fields import Stage
from moe_understudy.config import DemoConfig, EvalConfig
from moe_understudy.errors import UserError

EVALUATE = Stage(
    EvalConfig,
    {
        "scenario": "Load scenario: natural (held-out text), domain_shift (prose unlike the training code) or "
        "hot_expert.",
        "hot_expert": "hot_expert scenario: the expert whose router logit is raised in every layer.",
        "hot_bias": "hot_expert scenario: logit bias added to that expert.",
        "blocks": "Evaluation blocks of text (held-out blocks cached with the teacher when present).",
        "batch_size": "Blocks per forward step; capacity is per step. Comma-separated for a batch-size sweep.",
        "devices": "Devices the experts are spread over (contiguously) when counting all-to-all bytes.",
        "readmit": "understudy policy: give capacity freed by understudy tokens back to overflow tokens that fit.",
        "threshold": "layer policy: max/mean expert load above which a layer uses its understudy (default: when "
        "any expert overflows).",
        "latency": "deadline policy: fixed dispatch + combine latency, in units of one expert assignment.",
        "out": "Report folder: report.json, report.png and the eval.yaml that replays the run.",
        "capacity_scope": "expert (capacity per expert) or rank (ceil(cf * tokens * k / ranks) per rank over all "
        "its experts: the --ep ranks, or --devices simulated devices in one process).",
        "expanded_m": "expanded_drop / expanded_shadow: local candidates per token.",
    },
    renames={"blocks": "max_blocks", "batch_size": "batch_sizes", "devices": "num_devices"},
    paths=("out",),
)


@command(lead=(*LOAD, *TEXT), stage=EVALUATE)
def evaluate(
    ctx: typer.Context,
    model: ModelArgument = None,
    ep: Annotated[
        int,
        typer.Option(
            help="Run under real expert parallelism over this many local processes (torchrun, gloo on CPU); 0 = one process."
        ),
    ] = 0,
) -> None:
    """Quality under load: perplexity, KL to full, agreement, bytes moved and load for each policy x capacity factor."""
    from moe_understudy.eval.quality import run_evaluation

    cfg = EVALUATE.configure(
        ctx.params,
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


DEMO = Stage(
    DemoConfig,
    {
        "out": "Run folder; every finished stage in it is reused, so a rerun resumes.",
        "teacher": "Use this trained teacher instead of training one in OUT/teacher.",
        "teacher_steps": "Training steps of the demo's teacher (`understudy teacher` takes 1400).",
        "arch": "Stand-in architecture: trunk, shadows, dense, lowrank, merged or small_moe.",
        "intermediate": "Understudy intermediate size (default: one expert's).",
        "e2e_steps": "End-to-end KL steps after layer-wise distillation (0 skips).",
        "capacity": "Comma-separated capacity factors.",
        "quick": "Seconds-long smoke run on the quick preset.",
        "dtype": "Every stage's dtype: float32, bfloat16 or float16; the teacher trains under autocast to it "
        "(fp32 weights), capture, distil and evaluate run the model in it.",
    },
    renames={"capacity": "capacities"},
    flags={"quick": "--quick"},
    paths=("out", "teacher"),
)


@command(tail=("device", "config", "debug"), stage=DEMO)
def demo(ctx: typer.Context) -> None:
    """The whole pipeline on the default corpus: teacher, capture, distil the trunk, evaluate it beside token drop
    and expanded drop (score priority), report (about 6 min on 2 quiet cores)."""
    from moe_understudy.demo import run_demo

    cfg = DEMO.configure(ctx.params)
    run_demo(cfg, console=console)  # writes OUT/demo.yaml
