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
Step time is the sum over layers of (dispatch + slowest rank's compute + combine); attention and
other replicated work are the same for every policy and left out.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from moe_understudy.config import ClusterCost
from moe_understudy.runtime.placement import dispatch_traffic, plan_placement, replicate_hot_experts
from moe_understudy.runtime.policies import expert_capacity, plan_routing
from moe_understudy.runtime.replication import replicated_dispatch
from moe_understudy.runtime.speculative import estimate_affinity, predict_experts, speculate
from moe_understudy.sim.cost import (
    all_to_all_seconds,
    compute_seconds,
    expert_flops,
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
    step_ms: float  # sum over layers of dispatch + compute + combine
    dispatch_ms: float
    compute_ms: float
    combine_ms: float
    wire_bytes: float  # bytes crossing between ranks per step (dispatch + combine, + pre-dispatch)
    critical_bytes: float  # bytes moved on the critical path per step
    expert_imbalance: float  # max / mean over ranks of expert assignments computed
    work_imbalance: float  # max / mean over ranks of FLOPs (experts + understudy)
    degraded_fraction: float  # token-layer pairs not fully served by their experts
    speculation_accuracy: float | None  # speculative: fraction of off-rank rows already in place
    extra_slots: int  # expert slots per rank beyond ceil(E'/R) (replication's memory)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Acc:
    """Running sums over layers and steps for one policy."""

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
    src = torch.arange(T) * R // T  # (T,) home rank, rank-major
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
                if policy == "replication":
                    dest = replicated_dispatch(
                        plan.indices, replicated, layer, src, 1, plan.sent()
                    ).dest_rank.clamp(min=0)
                else:
                    dest = expert_rank[layer][plan.indices]
                _layer_cost(a, routing, plan, dest, src, R, cost, k)
                sent_all.append(plan.sent())
            if policy == "speculative":
                _speculation_cost(a, batch, predicted, expert_rank, src, R, cost, torch.stack(sent_all))
    return [_result(p, acc[p], R, E, T, steps, extra if p == "replication" else 0) for p in policies]


def _layer_cost(
    a: _Acc, routing, plan, dest: torch.Tensor, src: torch.Tensor, R: int, cost: ClusterCost, k: int
) -> None:
    """Add one layer's dispatch / compute / combine to `a`. dest: (T, k) rank of each assignment."""
    rb = row_bytes(cost)
    go = dispatch_traffic(src, dest, plan.sent(), R, rb)
    back = dispatch_traffic(src, dest, plan.expert_served, R, rb)  # combine returns served rows
    understudy_per_rank = torch.bincount(src[plan.understudy_tokens], minlength=R).double()
    served = torch.bincount(dest[plan.expert_served], minlength=R).double()
    work = served * expert_flops(cost) + understudy_per_rank * understudy_flops(cost, k)
    a.dispatch += all_to_all_seconds(go.send_bytes, go.recv_bytes, cost)
    a.combine += all_to_all_seconds(back.recv_bytes, back.send_bytes, cost)
    a.compute += compute_seconds(work, cost)
    a.wire += float(go.send_bytes.sum() + back.send_bytes.sum())
    a.critical += float(go.send_bytes.sum() + back.send_bytes.sum())
    a.expert_imb += _imbalance(served)
    a.work_imb += _imbalance(work)
    # degraded: any assignment not computed by the expert the router chose (rerouted ones included)
    rerouted = (plan.indices != routing.indices).any(-1)
    degraded = plan.understudy_tokens | (~plan.expert_served).any(-1) | rerouted
    a.degraded += float(degraded.float().mean())
    a.layers += 1


def _speculation_cost(a, batch, predicted, expert_rank, src, R, cost, sent) -> None:
    """Swap the dispatch just counted for `full` by speculative dispatch: early rows off the critical path."""
    rb = row_bytes(cost)
    rep = speculate(batch.indices, predicted, expert_rank, src, R, sent)
    full_dispatch = 0.0
    for layer in range(batch.num_layers):
        real = expert_rank[layer][batch.indices[layer]]
        go = dispatch_traffic(src, real, sent[layer], R, rb)
        full_dispatch += all_to_all_seconds(go.send_bytes, go.recv_bytes, cost)
        a.dispatch += all_to_all_seconds(rep.corrected_send[layer] * rb, rep.corrected_recv[layer] * rb, cost)
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
        step_ms=(a.dispatch + a.compute + a.combine) * ms,
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
