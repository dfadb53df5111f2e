"""EPLB against stand-ins under shifting load, at 8-256 ranks: the workflow behind benchmarks/sim_eplb.py.

1. Traces: the teacher's routing captured per layer on natural blocks (its held-out blocks, topped
   up with train blocks evenly spaced over the corpus) and on prose blocks (domain shift), every
   token's k choices together (co-activation kept). Cached in `out`/trace.safetensors.
2. Where ranks exceed experts, experts split into siblings by an `Expansion` fitted to the captured
   skew, co-activation and burstiness (`traces.fit_expansion`); the fit is reported.
3. Every scenario x cluster size is replayed step by step (`replay.replay`) through every system
   at equal memory (`systems.build_systems`), costs from `sim.cost` (constants: `ClusterCost`).
4. Rows per (system, ranks, scenario): step time p50 / p99, rank work imbalance, bytes, memory;
   plus the time series of step time per system. Quality is not simulated: `ppl_delta_pct` is
   left for a measured run of the same teacher, policy and capacity to fill (None until then).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from rich.console import Console

from moe_understudy.config import ShiftSimConfig
from moe_understudy.sim.cost import AssignmentStandInCost, expert_flops
from moe_understudy.sim.expansion import (
    Expansion,
    ExpansionFit,
    SiblingSplit,
    expansion_dict,
    fit_expansion,
    mean_stats,
)
from moe_understudy.sim.replay import replay, summarize
from moe_understudy.sim.stream import Source, StreamConfig
from moe_understudy.sim.systems import build_systems
from moe_understudy.sim.traces import RoutingTrace, capture_trace

# Systems whose outputs are the full model's: they only move work (replicas are copies).
EXACT = ("full", "eplb_fresh", "eplb_stale")


def study_blocks(model_dir: str | Path, tokenizer, max_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(natural, prose) token blocks: held-out (+ evenly spaced train) blocks, and prose unlike the corpus."""
    from moe_understudy.config import DataConfig
    from moe_understudy.runtime.scenarios import domain_shift_blocks, model_data_config, natural_blocks

    data = model_data_config(model_dir, DataConfig())
    natural = natural_blocks(model_dir, data, tokenizer, max_blocks)
    cache = Path(model_dir) / "blocks.pt"
    if len(natural) < max_blocks and cache.is_file():
        train = torch.load(cache)["train"]
        pick = torch.linspace(0, len(train) - 1, max_blocks - len(natural)).long()
        natural = torch.cat([natural, train[pick]])
    prose = domain_shift_blocks(tokenizer, natural.shape[1], max_blocks)
    return natural, prose


def load_source(cfg: ShiftSimConfig, model, tokenizer, console: Console) -> Source:
    """The captured natural + prose trace, from `cfg.out`/trace.safetensors when it was made for this model."""
    path = Path(cfg.out) / "trace.safetensors"
    key = f"{cfg.model} natural+prose max_blocks={cfg.max_blocks}"
    if path.is_file():
        trace = RoutingTrace.load(path)
        if trace.source.startswith(key):
            _, counts = trace.source.rsplit(" blocks=", 1)
            n, p, s = (int(x) for x in counts.split(","))
            return Source(trace, s, n, p)
    natural, prose = study_blocks(cfg.model, tokenizer, cfg.max_blocks)
    with console.status(f"capturing routing of {len(natural)} natural + {len(prose)} prose blocks"):
        trace = capture_trace(model, torch.cat([natural, prose]), batch_size=16)
    S = natural.shape[1]
    trace = RoutingTrace(
        trace.logits,
        trace.weights,
        trace.indices,
        trace.token_ids,
        f"{key} blocks={len(natural)},{len(prose)},{S}",
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    trace.save(path)
    return Source(trace, S, len(natural), len(prose))


def stand_in_costs(cfg: ShiftSimConfig, model, top_k: int) -> tuple[list[AssignmentStandInCost], dict]:
    """One cost-model stand-in per layer: read from `cfg.stand_in` (its memory, `token_flops`), else the config's."""
    from moe_understudy.moe.adapters import find_moe_layers

    layers = find_moe_layers(model)
    there = expert_flops(cfg.cost)
    if not cfg.stand_in:
        costs = [
            AssignmentStandInCost.per_assignment(cfg.stand_in_memory, cfg.stand_in_flops, top_k, there)
            for _ in layers
        ]
        return costs, {
            "source": "defaults (no stand-in folder given)",
            "memory_expert_equiv": cfg.stand_in_memory,
            "flops_per_served_assignment": cfg.stand_in_flops,
        }
    from moe_understudy.understudy.io import load_understudies

    modules = load_understudies(cfg.stand_in, model)
    costs = [
        AssignmentStandInCost.like(
            modules[m.index], m.expert_params(), float(m.expert_flops_per_token()), there, top_k
        )
        for m in layers
    ]
    return costs, {
        "source": str(cfg.stand_in),
        "arch": sorted({getattr(modules[m.index], "arch", "?") for m in layers}),
        "memory_expert_equiv": max(c.memory for c in costs),
        "flops_per_served_assignment": max(c.flops_per_assignment() / there for c in costs),
        "flops_by_served_assignments": [(c.table / there).tolist() for c in costs][0],
    }


def fits_for(cfg: ShiftSimConfig, source: Source, console: Console) -> dict[int, ExpansionFit | Expansion]:
    """The expansion used at every factor ranks / experts > 1: fitted, or plain random siblings."""
    E = source.trace.num_experts
    natural = source.trace.select(slice(0, source.natural_blocks * source.block_size))
    out: dict[int, ExpansionFit | Expansion] = {}
    for R in cfg.ranks:
        f = R // E if R > E else 1
        if f <= 1 or f in out:
            continue
        if R % E:
            raise ValueError(f"{R} ranks do not hold the {E} experts' siblings evenly; use multiples of {E}.")
        if cfg.expansion == "random":
            out[f] = Expansion(f, math.inf, 0.0, cfg.seed)
            continue
        with console.status(f"fitting the x{f} expansion"):
            out[f] = fit_expansion(natural, f, source.block_size, seed=cfg.seed)
    return out


def run_study(cfg: ShiftSimConfig, console: Console | None = None, model=None, tokenizer=None) -> dict:
    """Every scenario x ranks x system; returns the payload (rows, time series, fits, cost model)."""
    console = console or Console(stderr=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many small ops: threads only contend
    try:
        return _run(cfg, console, model, tokenizer)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: ShiftSimConfig, console: Console, model, tokenizer) -> dict:
    from moe_understudy.moe.loading import load_model_and_tokenizer

    if model is None:
        model, tokenizer = load_model_and_tokenizer(cfg.model)
    source = load_source(cfg, model, tokenizer, console)
    trace = source.trace
    E, k = trace.num_experts, trace.top_k
    stand_ins, stand_in_info = stand_in_costs(cfg, model, k)
    stand_in_memory = stand_in_info["memory_expert_equiv"]
    systems = build_systems(cfg.systems, cfg.memory_budget, stand_in_memory)
    fits = fits_for(cfg, source, console)
    rows, series = [], []
    for scenario in cfg.scenarios:
        for R in cfg.ranks:
            f = R // E if R > E else 1
            expansion = None if f == 1 else fits[f]
            split = None
            if expansion is not None:
                exp = expansion.expansion if isinstance(expansion, ExpansionFit) else expansion
                split = SiblingSplit(exp, trace.num_layers, E)
            steps = cfg.steps
            stride = 1 if cfg.rank_step_budget == 0 else max(1, math.ceil(R * steps / cfg.rank_step_budget))
            stream_cfg = StreamConfig(
                scenario=scenario,
                num_ranks=R,
                tokens_per_rank=cfg.tokens_per_rank,
                steps=steps,
                warmup_steps=cfg.warmup_steps,
                phase=cfg.phase,
                sequence_tokens=cfg.sequence_tokens,
                shift_at=cfg.shift_at,
                burst_every=cfg.burst_every,
                burst_len=cfg.burst_len,
                seed=cfg.seed,
            )
            with console.status(
                f"{scenario}: {R} ranks, {steps} steps (every {stride}), {len(systems)} systems"
            ):
                result = replay(
                    source,
                    stream_cfg,
                    systems,
                    cfg.cost,
                    capacity_factor=cfg.capacity_factor,
                    priority=cfg.priority,
                    split=split,
                    stand_ins=stand_ins,
                    window=cfg.window,
                    refresh_every=cfg.refresh_every,
                    fresh_window=cfg.fresh_window,
                    burst_bias=cfg.burst_bias,
                    cycle_layers=cfg.cycle_layers,
                    stride=stride,
                )
            for system in systems:
                summary = summarize(result.records[system.name])
                rows.append(
                    {
                        "system": system.name,
                        "ranks": R,
                        "scenario": scenario,
                        "step_ms_p50": summary["step_ms_p50"],
                        "step_ms_p99": summary["step_ms_p99"],
                        "rank_work_imbalance": summary["rank_work_imbalance"],
                        "total_bytes": summary["total_bytes"],
                        "memory_expert_equiv": system.memory(stand_in_memory),
                        "ppl_delta_pct": 0.0 if system.name in EXACT else None,
                        "quality_source": "exact (every assignment served by its expert)"
                        if system.name in EXACT
                        else None,
                        "policy": system.policy,
                        "placement": system.placement,
                        "extra_slots": system.extra_slots,
                        "memory_budget": cfg.memory_budget,
                        "experts": result.num_experts,
                        "charged_steps": len(result.records[system.name]),
                        "step_stride": stride,
                        "layers_per_record": 1 if cfg.cycle_layers else trace.num_layers,
                        "capacity_factor": None
                        if system.policy == "full"
                        else (system.capacity_factor or cfg.capacity_factor),
                        **{key: v for key, v in summary.items() if key not in ("step_ms_p50", "step_ms_p99")},
                    }
                )
            records = result.records
            first = records[systems[0].name]
            series.append(
                {
                    "scenario": scenario,
                    "ranks": R,
                    "steps": [r.step for r in first],
                    "burst": [r.burst for r in first],
                    "prose_fraction": [round(r.prose_fraction, 4) for r in first],
                    "stale_refreshes": result.refreshes,
                    "step_ms": {s.name: [round(r.step_ms, 5) for r in records[s.name]] for s in systems},
                }
            )
            console.log(
                f"{scenario} at {R} ranks ({steps} steps): "
                + ", ".join(f"{r['system']} {r['step_ms_p50']:.3f}" for r in rows[-len(systems) :])
            )
    return {
        "trace": {
            "source": trace.source,
            "layers": trace.num_layers,
            "experts": E,
            "top_k": k,
            "natural_blocks": source.natural_blocks,
            "prose_blocks": source.prose_blocks,
            "block_size": source.block_size,
            "natural_stats": mean_stats(
                trace.indices[:, : source.natural_blocks * source.block_size], E, source.block_size
            ),
            "prose_stats": mean_stats(
                trace.indices[:, source.natural_blocks * source.block_size :], E, source.block_size
            )
            if source.prose_blocks
            else None,
        },
        "expansion": {
            str(f): (fit.to_dict() if isinstance(fit, ExpansionFit) else {"expansion": expansion_dict(fit)})
            for f, fit in fits.items()
        },
        "expanded_stats": {
            str(f): mean_stats(_expanded(source, fit), E * f, source.block_size) for f, fit in fits.items()
        },
        "stand_in": stand_in_info,
        "systems": [vars(s) for s in systems],
        "config": cfg.to_dict(),
        "rows": rows,
        "series": series,
    }


def _expanded(source: Source, fit) -> torch.Tensor:
    """[L, T, k] the natural trace's choices split into siblings by the expansion used."""
    exp = fit.expansion if isinstance(fit, ExpansionFit) else fit
    trace = source.trace
    n = min(source.natural_blocks * source.block_size, 32768 // source.block_size * source.block_size)
    split = SiblingSplit(exp, trace.num_layers, trace.num_experts)
    rows = torch.arange(n)
    return torch.stack(
        [
            split.children(ly, trace.indices[ly, :n], trace.weights[ly, :n], rows)
            for ly in range(trace.num_layers)
        ]
    )


def plot_study(payload: dict, path: Path, ranks: int = 64) -> None:
    """Step time per system along the steps at `ranks` (one panel per scenario), and p50 against ranks."""
    from moe_understudy.report import pyplot, save_figure

    plt = pyplot()
    scenarios = list(dict.fromkeys(r["scenario"] for r in payload["rows"]))
    fig, axes = plt.subplots(1, len(scenarios) + 1, figsize=(5 * (len(scenarios) + 1), 4))
    for ax, scenario in zip(axes, scenarios, strict=False):
        s = next((x for x in payload["series"] if x["scenario"] == scenario and x["ranks"] == ranks), None)
        if s is None:
            continue
        for name, ms in s["step_ms"].items():
            ax.plot(s["steps"], ms, label=name, lw=1)
        for step in s["stale_refreshes"]:
            ax.axvline(step, color="grey", ls=":", lw=0.8)
        if any(s["burst"]):
            for step, b in zip(s["steps"], s["burst"], strict=True):
                if b:
                    ax.axvspan(step - 0.5, step + 0.5, color="orange", alpha=0.08, lw=0)
        ax.set_title(f"{scenario}, {ranks} ranks", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("MoE step time (ms, simulated)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    ax = axes[-1]
    target = "domain_shift" if "domain_shift" in scenarios else scenarios[0]
    for name in dict.fromkeys(r["system"] for r in payload["rows"]):
        mine = [r for r in payload["rows"] if r["system"] == name and r["scenario"] == target]
        ax.plot([r["ranks"] for r in mine], [r["step_ms_p50"] for r in mine], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("ranks")
    ax.set_ylabel(f"p50 step time, {target} (ms)")
    ax.grid(alpha=0.3)
    fig.suptitle(payload["trace"]["source"].split(" natural")[0] + " routing, simulated", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
