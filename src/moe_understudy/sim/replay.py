"""Replay a token stream step by step through every system: never averaged loads.

Each step, every MoE layer routes the step's tokens as captured (a burst adds its router bias), the
experts are split into siblings where ranks outnumber them (`traces.SiblingSplit`), and every system
plans that very routing on the placement in force at that step (`systems.plan_layer`); the plan is
charged by the runtime ledger and timed by `sim.cost`. A stale EPLB is planned on the past window's
mean load and refreshed on its schedule (`systems.EPLBSchedule`), so what it leaves is each step's
fluctuation around that mean plus the drift since it was planned.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from moe_understudy.config import ClusterCost
from moe_understudy.runtime import exchange as xchg
from moe_understudy.runtime.policies import expanded_candidates
from moe_understudy.runtime.scenarios import hot_expert_bias
from moe_understudy.sim.cost import exchange_layout_bytes, layer_cost
from moe_understudy.sim.expansion import SiblingSplit
from moe_understudy.sim.stream import Source, StreamConfig, stream
from moe_understudy.sim.systems import (
    FRESH,
    STALE,
    EPLBSchedule,
    SimRouting,
    System,
    base_slots,
    exchange_of,
    placement_for,
    plan_layer,
    topologies,
)
from moe_understudy.sim.traces import biased_routing, renormalises


@dataclass(frozen=True)
class StepRecord:
    """One system at one step, summed over the MoE layers charged (imbalance: mean over them)."""

    step: int
    layers: int  # MoE layers charged in this record (1 when cycling through them)
    step_ms: float
    exchange_ms: float
    dispatch_ms: float
    compute_ms: float
    combine_ms: float
    a2a_bytes: int
    exchange_bytes: int
    rank_work_imbalance: float
    assignments: int
    expert: int
    shadow: int
    dropped: int
    tokens: int
    degraded_tokens: int
    burst: bool
    prose_fraction: float
    plan_age: int | None  # steps since a stale EPLB plan was made (None for other placements)

    @property
    def total_bytes(self) -> int:
        return self.a2a_bytes + self.exchange_bytes


@dataclass(frozen=True)
class Replay:
    records: dict[str, list[StepRecord]]
    refreshes: list[int]  # steps where the stale EPLB re-planned
    num_experts: int  # experts per layer replayed (after any split)


def layer_routing(
    source: Source,
    layer: int,
    rows: torch.Tensor,
    hot: torch.Tensor | None,
    bias: float,
    split: SiblingSplit | None,
    renorm: bool,
    with_logits: bool = True,
):
    """(routing over the replayed experts, parent (weights, indices, logits)) of `layer` for `rows`."""
    trace = source.trace
    logits = trace.logits[layer, rows] if (with_logits or hot is not None) else None
    if hot is None:
        weights, indices = trace.weights[layer, rows], trace.indices[layer, rows]
    else:
        logits = logits + hot_expert_bias(trace.num_experts, int(hot[layer]), bias)
        weights, indices = biased_routing(logits, torch.zeros(()), trace.top_k, renorm)
    if split is None:
        routing = SimRouting(indices, weights, trace.num_experts, logits)
    else:
        routing = SimRouting(split.children(layer, indices, weights, rows), weights, split.num_experts)
    return routing, (weights, indices, logits)


def replay(
    source: Source,
    stream_cfg: StreamConfig,
    systems: list[System],
    cost: ClusterCost,
    *,
    capacity_factor: float,
    priority: str,
    split: SiblingSplit | None,
    stand_ins: list[torch.nn.Module],
    window: int,
    refresh_every: int,
    fresh_window: int = 16,
    burst_bias: float = 2.0,
    cycle_layers: bool = False,
    stride: int = 1,
) -> Replay:
    """Every system over the steps of `stream_cfg` (stand_ins: one cost-model stand-in per layer).

    Two passes: the first routes every step of every layer to know its load (EPLB fresh is planned
    on the mean load of the `fresh_window` steps it then serves; the stale schedule sees every
    step), the second plans, charges and times them. To bound the cost at many ranks, only every
    `stride`-th step is charged, and with `cycle_layers` a charged step charges one MoE layer, the
    next one each time (so a record is one layer step); the stream and the plans still see every
    step and layer.
    """
    trace = source.trace
    L, R = trace.num_layers, stream_cfg.num_ranks
    E = trace.num_experts if split is None else split.num_experts
    renorm = renormalises(trace)
    steps = list(stream(source, stream_cfg))

    def load_of(st) -> torch.Tensor:
        out = []
        for layer in range(L):
            routing, _ = layer_routing(source, layer, st.rows, st.hot, burst_bias, split, renorm, False)
            out.append(torch.bincount(routing.indices.reshape(-1), minlength=E))
        return torch.stack(out).double()

    loads = [load_of(st) for st in steps]
    timed = [i for i, st in enumerate(steps) if st.step >= 0]
    fresh_load = {}
    for w in range(0, len(timed), fresh_window):
        chunk = timed[w : w + fresh_window]
        mean = torch.stack([loads[i] for i in chunk]).mean(0)
        for i in chunk:
            fresh_load[steps[i].step] = mean
    stale_slots = tuple(base_slots(E, R) + s.extra_slots for s in systems if s.placement == STALE)
    schedule = EPLBSchedule(R, window, refresh_every, stale_slots)
    placed: dict[str, tuple] = {}  # system -> (plan key, placement, its topologies)
    records: dict[str, list[StepRecord]] = {s.name: [] for s in systems}
    row_bytes = {
        s.name: (
            exchange_layout_bytes(s.policy, E, trace.top_k, cost)
            if exchange_of(s, priority) == xchg.ROWS
            else 0
        )
        for s in systems
    }
    needs_logits = split is None and any(s.policy == "expanded_drop" for s in systems)
    for st, load in zip(steps, loads, strict=True):
        schedule.tick(st.step)
        if st.step < 0 or st.step % stride:
            schedule.observe(load)
            continue
        layers = [(st.step // stride) % L] if cycle_layers else list(range(L))
        with_logits = needs_logits or (
            split is not None and any(s.policy == "expanded_drop" for s in systems)
        )
        routings = {
            layer: layer_routing(source, layer, st.rows, st.hot, burst_bias, split, renorm, with_logits)
            for layer in layers
        }
        T = st.rows.numel()
        home = torch.arange(T) * R // T
        shared: dict[int, dict] = {layer: {} for layer in layers}
        for system in systems:
            # a new plan at each fresh window, at each stale refresh, once for contiguous experts
            key = {FRESH: id(fresh_load[st.step]), STALE: schedule.last_due(st.step)}.get(system.placement, 0)
            if placed.get(system.name, (None,))[0] != key:
                new = placement_for(system, L, E, R, st.step, fresh_load[st.step], schedule)
                placed[system.name] = (key, new, topologies(new))
            _, placement, topos = placed[system.name]
            acc = dict(exchange=0.0, dispatch=0.0, compute=0.0, combine=0.0, a2a=0, xb=0, imb=0.0)
            fates = dict(assignments=0, expert=0, shadow=0, dropped=0, tokens=0, degraded_tokens=0)
            for layer, (routing, (weights, indices, logits)) in routings.items():
                candidates = None
                if system.policy == "expanded_drop":
                    if split is None:
                        candidates = expanded_candidates(routing, 1, home, topos[layer].expert_device)
                    else:
                        candidates = split.local_candidates(
                            layer, logits, indices, weights, routing.indices, home
                        )
                plan = plan_layer(
                    system,
                    routing,
                    topos[layer],
                    system.capacity_factor or capacity_factor,
                    priority,
                    candidates,
                    shared=shared[layer],
                )
                c = layer_cost(
                    plan,
                    topos[layer],
                    cost,
                    stand_in=stand_ins[layer] if system.stand_in else None,
                    exchange_mode=exchange_of(system, priority),
                    exchange_row_bytes=row_bytes[system.name],
                    num_experts=E,
                )
                acc["exchange"] += c.exchange_s
                acc["dispatch"] += c.dispatch_s
                acc["compute"] += c.compute_s
                acc["combine"] += c.combine_s
                acc["a2a"] += c.a2a_bytes
                acc["xb"] += c.exchange_bytes
                acc["imb"] += c.imbalance
                for key in fates:
                    fates[key] += c.counts[key]
            seconds = acc["exchange"] + acc["dispatch"] + acc["compute"] + acc["combine"]
            records[system.name].append(
                StepRecord(
                    step=st.step,
                    layers=len(layers),
                    step_ms=seconds * 1e3,
                    exchange_ms=acc["exchange"] * 1e3,
                    dispatch_ms=acc["dispatch"] * 1e3,
                    compute_ms=acc["compute"] * 1e3,
                    combine_ms=acc["combine"] * 1e3,
                    a2a_bytes=acc["a2a"],
                    exchange_bytes=acc["xb"],
                    rank_work_imbalance=acc["imb"] / len(layers),
                    burst=st.hot is not None,
                    prose_fraction=st.prose_fraction,
                    plan_age=(st.step - schedule.refreshes[-1]) if system.placement == STALE else None,
                    **fates,
                )
            )
        schedule.observe(load)
    return Replay(records, list(schedule.refreshes), E)


def summarize(records: list[StepRecord]) -> dict:
    """Percentiles of step time and means of everything else over the replayed steps."""
    ms = torch.tensor([r.step_ms for r in records], dtype=torch.float64)
    n = len(records)
    total = lambda key: sum(getattr(r, key) for r in records)  # noqa: E731
    assignments = max(total("assignments"), 1)
    return {
        "step_ms_p50": float(torch.quantile(ms, 0.5)),
        "step_ms_p99": float(torch.quantile(ms, 0.99)),
        "step_ms_mean": float(ms.mean()),
        "exchange_ms": total("exchange_ms") / n,
        "dispatch_ms": total("dispatch_ms") / n,
        "compute_ms": total("compute_ms") / n,
        "combine_ms": total("combine_ms") / n,
        "rank_work_imbalance": total("rank_work_imbalance") / n,
        "total_bytes": (total("a2a_bytes") + total("exchange_bytes")) / n,
        "a2a_bytes": total("a2a_bytes") / n,
        "exchange_bytes": total("exchange_bytes") / n,
        "frac_stand_in": total("shadow") / assignments,
        "frac_dropped": total("dropped") / assignments,
        "frac_tokens_degraded": total("degraded_tokens") / max(total("tokens"), 1),
        "steps": n,
    }


def record_dicts(records: list[StepRecord]) -> list[dict]:
    return [asdict(r) for r in records]
