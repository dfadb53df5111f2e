"""Quality under load: every policy x capacity factor, side by side on the same batches.

For each batch the model runs once with `full` (the reference) and once per (policy, capacity
factor); every run is compared with the reference on the same tokens, so all systems see the same
load. Rows report perplexity, its change vs full, KL(full || policy) per token, top-1 agreement,
the fraction of assignments served by experts / understudies / shadows / dropped, the fraction of
tokens degraded, all-to-all bytes per token for the expert placement, and the mean max/mean load.

`run_evaluation(EvalConfig)` is the `understudy evaluate` workflow: load model (+ understudies),
build the scenario, evaluate, write the report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from moe_understudy.config import EvalConfig
from moe_understudy.eval.metrics import (
    kl_per_token,
    next_token_view,
    paired_ppl_delta_interval,
    token_nll,
    top1_agreement,
)
from moe_understudy.moe.adapters import find_moe_layers
from moe_understudy.progress import stage_bar
from moe_understudy.runtime.layer import patch
from moe_understudy.runtime.ledger import LoadRecorder
from moe_understudy.runtime.scenarios import batches, build_scenario


@dataclass
class _Sums:
    """Running sums over predicted positions (exact means across batches of any size), and each
    batch's NLL sum and positions for the paired interval."""

    nll: float = 0.0
    kl: float = 0.0
    agree: float = 0.0
    count: int = 0
    batch_nll: list[float] = field(default_factory=list)
    batch_count: list[int] = field(default_factory=list)

    def add(self, reference: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        nll = float(token_nll(logits, targets).sum())
        self.nll += nll
        self.kl += float(kl_per_token(reference, logits).sum())
        self.agree += float(top1_agreement(reference, logits).sum())
        self.count += targets.numel()
        self.batch_nll.append(nll)
        self.batch_count.append(targets.numel())

    def ppl_delta_interval(self, reference: _Sums) -> tuple[float, float]:
        """95% interval of the perplexity change in % against `reference`, over the same batches."""
        per_batch = [self.batch_nll, reference.batch_nll, self.batch_count]
        return paired_ppl_delta_interval(*torch.tensor(per_batch, dtype=torch.float64))


def systems(
    policies: list[str] | tuple[str, ...], capacities: list[float] | tuple[float, ...]
) -> list[tuple[str, float | None]]:
    """(policy, capacity factor) pairs to run: `full` once (no capacity), every other policy at every factor."""
    out: list[tuple[str, float | None]] = [("full", None)]
    out += [(p, float(cf)) for p in policies if p != "full" for cf in capacities]
    return out


def stand_in_sizes(model: nn.Module, understudies: dict[int, nn.Module] | None) -> dict[str, float | None]:
    """Mean over layers of the stand-ins' cost (FLOPs per token / active routed-expert FLOPs) and
    memory per device (`memory_expert_equiv`, in routed experts); None without stand-ins."""
    layers = [m for m in find_moe_layers(model) if understudies and m.index in understudies]
    if not layers:
        return {"cost": None, "memory_expert_equiv": None, "expert_flops": None}
    cost = [understudies[m.index].flops_per_token() / m.active_expert_flops_per_token() for m in layers]
    memory = [understudies[m.index].memory_expert_equiv(m.expert_params()) for m in layers]
    return {
        "cost": sum(cost) / len(cost),
        "memory_expert_equiv": sum(memory) / len(memory),
        "expert_flops": layers[0].expert_flops_per_token(),
    }


@torch.no_grad()
def evaluate_policies(
    model: nn.Module,
    understudies: dict[int, nn.Module] | None,
    blocks: torch.Tensor,
    policies: list[str] | tuple[str, ...],
    capacities: list[float] | tuple[float, ...],
    priority: str = "position",
    batch_size: int = 8,
    num_devices: int = 4,
    logit_bias: torch.Tensor | None = None,
    runtime_options: dict[str, Any] | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """One row per (policy, capacity factor); blocks (N, S) token ids, evaluated in full batches."""
    device = next(model.parameters()).device
    runs = systems(policies, capacities)
    sums = {run: _Sums() for run in runs}
    recorders = {run: LoadRecorder() for run in runs}
    steps = batches(blocks, batch_size)
    handle = patch(
        model,
        understudies,
        policy="full",
        priority=priority,
        logit_bias=logit_bias,
        num_devices=num_devices,
        **(runtime_options or {}),
    )
    bar = stage_bar("[bold]evaluate[/] {task.description}", disable=not progress, transient=True)
    try:
        with bar:
            task = bar.add_task(
                f"{len(runs)} systems x {len(steps)} batches of {batch_size}", total=len(runs) * len(steps)
            )
            for ids in steps:
                ids = ids.to(device)
                reference = None
                for run in runs:
                    policy, cf = run
                    handle.configure(policy=policy, capacity_factor=cf or 1.0, recorder=recorders[run])
                    logits, targets = next_token_view(model(input_ids=ids).logits, ids)
                    reference = logits if reference is None else reference  # `full` runs first
                    sums[run].add(reference, logits, targets)
                    bar.advance(task)
    finally:
        handle.unpatch()
    return _rows(
        runs, sums, recorders, priority, batch_size, num_devices, stand_in_sizes(model, understudies)
    )


def _rows(runs, sums, recorders, priority, batch_size, num_devices, sizes) -> list[dict[str, Any]]:
    import math

    from moe_understudy.runtime.policies import NEEDS_SHADOWS, NEEDS_UNDERSTUDY

    base = math.exp(sums[runs[0]].nll / sums[runs[0]].count)
    rows = []
    for run in runs:
        s, load = sums[run], recorders[run].summary()
        ppl = math.exp(s.nll / s.count)
        uses_stand_in = run[0] in NEEDS_UNDERSTUDY + NEEDS_SHADOWS
        rows.append(
            {
                "policy": run[0],
                "capacity_factor": run[1],
                "priority": priority,
                "batch_size": batch_size,
                "positions": s.count,
                "perplexity": ppl,
                "ppl_delta_pct": 100.0 * (ppl / base - 1.0),
                "ppl_delta_ci95": list(s.ppl_delta_interval(sums[runs[0]])),
                # per batch, for paired comparisons between any two rows of one run
                "batch_nll": s.batch_nll,
                "batch_positions": s.batch_count,
                "kl": s.kl / s.count,
                "agreement": s.agree / s.count,
                "frac_expert": load["frac_expert"],
                "frac_understudy": load["frac_understudy"],
                "frac_shadow": load["frac_shadow"],
                "frac_dropped": load["frac_dropped"],
                "frac_tokens_degraded": load["frac_tokens_degraded"],
                "bytes_per_token": load["bytes_per_token"],
                "bytes_moved": load["bytes_moved"],
                "exchange_bytes": load["exchange_bytes"],
                "total_bytes": load["total_bytes"],
                "total_bytes_per_token": load["total_bytes_per_token"],
                "rank_work_imbalance": load["rank_work_imbalance"],
                "stand_in_flops_fraction": load["stand_in_flops_fraction"],
                # measured stand-in FLOPs per served assignment over one routed expert's per assignment
                "stand_in_cost_per_served": load["stand_in_flops_per_served"] / sizes["expert_flops"]
                if uses_stand_in and sizes["expert_flops"]
                else None,
                "max_over_mean": load["mean_max_over_mean"],
                "max_served_over_mean": load["mean_max_served_over_mean"],
                "num_devices": num_devices,
                "understudy_cost": sizes["cost"] if uses_stand_in else None,
                # memory per device per MoE layer beyond its own experts, in routed experts
                "memory_expert_equiv": (sizes["memory_expert_equiv"] or 0.0) if uses_stand_in else 0.0,
            }
        )
    return rows


BASELINES = ("full", "drop", "expanded_drop", "reroute")  # what needs no stand-in, strongest first


def default_policies(understudies: str | None) -> tuple[str, ...]:
    """`evaluate`'s policies when none are given: the baselines, then the policy that serves the saved
    stand-ins `understudies` (shadow for assignment-level ones, understudy for token-level ones)."""
    if not understudies:
        return BASELINES
    from moe_understudy.understudy.io import read_config, saved_folder
    from moe_understudy.understudy.modules import ASSIGNMENT_ARCHS

    archs = {spec["arch"] for spec in read_config(saved_folder(understudies))["layers"].values()}
    return (*BASELINES, "shadow" if archs <= set(ASSIGNMENT_ARCHS) else "understudy")


def run_evaluation(cfg: EvalConfig, console: Console | None = None) -> dict[str, Any]:
    """`understudy evaluate`: rows for every batch size of `cfg`, written as a report in `cfg.out`."""
    from moe_understudy.moe.loading import load_model_and_tokenizer
    from moe_understudy.report import print_table, write_report

    console = console or Console(stderr=True)
    model, tokenizer = load_model_and_tokenizer(cfg.model, cfg.device, cfg.dtype)
    understudies = None
    if cfg.understudies:
        from moe_understudy.understudy.io import load_understudies

        understudies = load_understudies(cfg.understudies, model)  # the model's dtype and device
    layers = find_moe_layers(model)
    scenario = build_scenario(
        cfg, layers[0].num_experts, tokenizer, notice=lambda m: console.print(f"[yellow]note:[/] {m}")
    )
    console.print(
        f"scenario [bold]{scenario.name}[/]: {len(scenario.blocks)} blocks of {scenario.blocks.shape[1]} tokens, "
        f"{len(layers)} MoE layers of {layers[0].num_experts} experts (top-{layers[0].top_k}), "
        f"{cfg.num_devices} devices"
    )
    policies = cfg.policies or default_policies(cfg.understudies)
    rows: list[dict[str, Any]] = []
    for batch_size in cfg.batch_sizes:
        for row in evaluate_policies(
            model,
            understudies,
            scenario.blocks,
            policies,
            cfg.capacities,
            priority=cfg.priority,
            batch_size=batch_size,
            num_devices=cfg.num_devices,
            logit_bias=scenario.logit_bias,
            runtime_options=dict(
                readmit=cfg.readmit,
                threshold=cfg.threshold,
                latency=cfg.latency,
                capacity_scope=cfg.capacity_scope,
                expanded_m=cfg.expanded_m,
            ),
        ):
            rows.append({"scenario": scenario.name, **row})
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg.to_yaml(out / "eval.yaml")
    paths = write_report(
        rows, out, meta={"config": cfg.to_dict()}, title=f"quality under load ({scenario.name})"
    )
    print_table(rows, console, title=f"quality under load: {scenario.name}, priority {cfg.priority}")
    console.print(f"report: [bold]{paths['json']}[/]  plot: [bold]{paths['png']}[/]")
    return {"rows": rows, **paths}
