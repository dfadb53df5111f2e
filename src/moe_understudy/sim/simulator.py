"""Trace-driven cluster simulator: replay routing over R ranks under each policy and a cost model.

For a cluster of R ranks:
  1. experts: a trace of E experts is expanded to E' = E * ceil(R / E) experts when R > E (see
     `traces.expand_trace`; `sibling` picks how: "random" keeps the captured skew, "token" keeps
     token-level predictability), laid out contiguously, E' / R per rank;
  2. tokens: each rank holds `tokens_per_rank` tokens per step (weak scaling), sampled whole from
     the replay part of the trace; token t lives on rank ``t * R // T`` (rank-major);
  3. per layer: capacity ``ceil(cf * T * k / E')`` over the global batch, the policy's plan
     (runtime.policies.plan_routing, the same code the runtime runs), dispatch to the rank of each
     sent assignment, expert compute, combine of the served ones; costs from `sim.cost`;
  4. baselines: `replication` runs `full` on a placement that replicates hot experts measured on
     the calibration part (a random half of the trace's tokens: stationary traffic, its best case), with as many spare slots per rank as one understudy weighs (equal
     memory); `speculative` runs `full` with pre-dispatch predicted from affinities fitted on the
     calibration part: only mispredicted rows stay on the critical path (pre-dispatched rows are
     assumed hidden behind the previous layer, an optimistic bound for the baseline).
Step time is the sum over layers of (routing exchange + dispatch + slowest rank's compute +
combine), charged by the runtime ledger and timed by `sim.cost` (as the shifting-load replay in
`sim.replay` is); attention and other replicated work are the same for every policy and left out.
Capacity here is per expert over a batch sampled at random from the trace (stationary load); the
step-by-step replay with capacity per rank, stale EPLB and drift is `sim.replay` / `sim.study`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from moe_understudy.config import ClusterCost
from moe_understudy.runtime import exchange as xchg
from moe_understudy.runtime.ledger import Topology
from moe_understudy.runtime.placement import dispatch_traffic, plan_placement, replicate_hot_experts
from moe_understudy.runtime.policies import expert_capacity, plan_routing
from moe_understudy.runtime.speculative import estimate_affinity, predict_experts, speculate
from moe_understudy.sim.cost import (
    TokenStandInCost,
    exchange_layout_bytes,
    flat_all_to_all_seconds,
    layer_cost,
    row_bytes,
    understudy_flops,
    understudy_slots,
)
from moe_understudy.sim.traces import RoutingTrace, expand_trace

# Policies that are a runtime plan on the contiguous placement; the baselines run `full`.
PLAN_OF = {
    "full": "full",
    "drop": "drop",
    "reroute": "reroute",
    "understudy": "understudy",
    "replication": "full",
    "speculative": "full",
}


@dataclass(frozen=True)
class SimResult:
    """One policy on one cluster size, averaged over simulated steps (times per MoE forward step)."""

    policy: str
    ranks: int
    experts: int  # experts per layer after expansion
    tokens: int  # global tokens per step
    step_ms: float  # sum over layers of exchange + dispatch + compute + combine
    exchange_ms: float  # routing exchange (all-gather of what the plan needs)
    dispatch_ms: float
    compute_ms: float
    combine_ms: float
    wire_bytes: float  # bytes crossing between ranks per step (exchange + dispatch + combine, + pre-dispatch)
    critical_bytes: float  # bytes moved on the critical path per step
    expert_imbalance: float  # max / mean over ranks of expert assignments computed
    work_imbalance: float  # (max - mean) / mean over ranks of all FLOPs (experts + understudy), the ledger's
    degraded_fraction: float  # token-layer pairs not fully served by their experts
    speculation_accuracy: float | None  # speculative: fraction of off-rank rows already in place
    extra_slots: int  # expert slots per rank beyond ceil(E'/R) (replication's memory)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Acc:
    """Running sums over layers and steps for one policy."""

    exchange: float = 0.0
    dispatch: float = 0.0
    compute: float = 0.0
    combine: float = 0.0
    wire: float = 0.0
    critical: float = 0.0
    expert_imb: float = 0.0
    work_imb: float = 0.0
    degraded: float = 0.0
    spec: float = 0.0
    layers: int = 0


def expansion_factor(num_ranks: int, num_experts: int) -> int:
    """How many siblings each expert gets so that every rank holds at least one expert."""
    return max(1, math.ceil(num_ranks / num_experts))


def simulate_cluster(
    trace: RoutingTrace,
    num_ranks: int,
    policies: tuple[str, ...],
    cost: ClusterCost,
    capacity_factor: float = 1.0,
    priority: str = "position",
    tokens_per_rank: int = 512,
    steps: int = 3,
    calibration_fraction: float = 0.5,
    seed: int = 0,
    sibling: str = "random",
) -> list[SimResult]:
    """Every policy of `policies` on `num_ranks` ranks, on the same sampled batches."""
    R = num_ranks
    f = expansion_factor(R, trace.num_experts)
    E = trace.num_experts * f
    L, k = trace.num_layers, trace.top_k
    T = R * tokens_per_rank
    calib, replay = trace.split(calibration_fraction, seed=seed)
    calib = expand_trace(calib, f, calib.num_tokens, seed=seed, sibling=sibling)
    base = plan_placement(L, E, R)
    expert_rank = base.expert_rank()  # [L, E]
    extra = understudy_slots(cost, k)
    replicated = (
        replicate_hot_experts(calib.expert_load(), R, base.slots_per_rank + extra)
        if "replication" in policies
        else None
    )
    affinity = estimate_affinity(calib.indices, E, calib.token_ids) if "speculative" in policies else None
    src = torch.arange(T) * R // T  # (T,) home rank, rank-major (as ledger.Topology.token_device)
    understudy = TokenStandInCost(understudy_slots(cost, k), understudy_flops(cost, k))
    topologies = {
        policy: [
            Topology.of_placement(replicated if policy == "replication" else base, layer)
            for layer in range(L)
        ]
        for policy in policies
    }
    acc = {p: _Acc() for p in policies}
    for step in range(steps):
        batch = expand_trace(replay, f, T, seed=seed + 1 + step, sibling=sibling)
        predicted = (
            predict_experts(affinity, batch.indices, batch.token_ids, k) if affinity is not None else None
        )
        for policy in policies:
            a = acc[policy]
            sent_all = []
            for layer in range(L):
                routing = batch.routing(layer)
                plan = plan_routing(
                    routing, PLAN_OF[policy], expert_capacity(T, k, E, capacity_factor), priority
                )
                _layer_cost(
                    a, routing, plan, topologies[policy][layer], cost, priority, understudy, PLAN_OF[policy]
                )
                sent_all.append(plan.sent())
            if policy == "speculative":
                _speculation_cost(a, batch, predicted, expert_rank, src, R, cost, torch.stack(sent_all))
    return [_result(p, acc[p], R, E, T, steps, extra if p == "replication" else 0) for p in policies]


def _layer_cost(
    a: _Acc, routing, plan, topology: Topology, cost: ClusterCost, priority: str, understudy, policy: str
) -> None:
    """Add one layer's exchange / dispatch / compute / combine, charged by the runtime ledger, to `a`."""
    mode = xchg.exchange_mode(policy, priority)
    E = routing.num_experts
    c = layer_cost(
        plan,
        topology,
        cost,
        stand_in=understudy,
        exchange_mode=mode,
        exchange_row_bytes=0 if mode == xchg.COUNTS else exchange_layout_bytes(policy, E, plan.top_k, cost),
        num_experts=E,
    )
    rows = torch.bincount(topology.destinations(plan)[plan.sent()], minlength=topology.num_devices).double()
    a.exchange += c.exchange_s
    a.dispatch += c.dispatch_s
    a.combine += c.combine_s
    a.compute += c.compute_s
    a.wire += float(c.total_bytes)
    a.critical += float(c.total_bytes)
    a.expert_imb += _imbalance(rows)
    a.work_imb += c.imbalance
    # degraded: any assignment not computed by the expert the router chose (rerouted ones included)
    rerouted = (plan.indices != routing.indices).any(-1)
    degraded = plan.understudy_tokens | (~plan.expert_served).any(-1) | rerouted
    a.degraded += float(degraded.float().mean())
    a.layers += 1


def _speculation_cost(a, batch, predicted, expert_rank, src, R, cost, sent) -> None:
    """Swap the dispatch just counted for `full` by speculative dispatch: early rows off the critical path.

    The swap is the difference of two flat all-to-all estimates (per-rank totals, no per-peer split),
    applied to the dispatch `layer_cost` charged."""
    rb = row_bytes(cost)
    rep = speculate(batch.indices, predicted, expert_rank, src, R, sent)
    full_dispatch = 0.0
    for layer in range(batch.num_layers):
        real = expert_rank[layer][batch.indices[layer]]
        go = dispatch_traffic(src, real, sent[layer], R, rb)
        full_dispatch += flat_all_to_all_seconds(go.send_bytes, go.recv_bytes, cost)
        a.dispatch += flat_all_to_all_seconds(
            rep.corrected_send[layer] * rb, rep.corrected_recv[layer] * rb, cost
        )
    a.dispatch -= full_dispatch
    a.wire += float(rep.predispatched_rows.sum() + rep.corrected_rows.sum() - rep.baseline_rows.sum()) * rb
    a.critical -= float(rep.avoided_rows.sum()) * rb
    a.spec += float(rep.rank_accuracy.sum())


def _imbalance(per_rank: torch.Tensor) -> float:
    mean = float(per_rank.mean())
    return float(per_rank.max()) / mean if mean > 0 else 1.0


def _result(policy: str, a: _Acc, R: int, E: int, T: int, steps: int, extra: int) -> SimResult:
    n = max(a.layers, 1)
    ms = 1e3 / steps
    return SimResult(
        policy=policy,
        ranks=R,
        experts=E,
        tokens=T,
        step_ms=(a.exchange + a.dispatch + a.compute + a.combine) * ms,
        exchange_ms=a.exchange * ms,
        dispatch_ms=a.dispatch * ms,
        compute_ms=a.compute * ms,
        combine_ms=a.combine * ms,
        wire_bytes=a.wire / steps,
        critical_bytes=a.critical / steps,
        expert_imbalance=a.expert_imb / n,
        work_imbalance=a.work_imb / n,
        degraded_fraction=a.degraded / n,
        speculation_accuracy=(a.spec / n) if policy == "speculative" else None,
        extra_slots=extra,
    )
