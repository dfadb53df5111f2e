"""Cost model of one MoE layer step on a GPU cluster: seconds from the runtime ledger's bytes and FLOPs.

What is charged comes from the runtime's own ledger, never recounted here: `ledger.traffic` gives
dispatch / combine bytes per rank, `ledger.rank_work` FLOPs per rank (expert rows + stand-in work),
`exchange.exchange_bytes` the routing exchange. This module turns them into time:

  exchange  latency + max over ranks of its all-gather payload to the peers in its node over NVLink
            and to the others over RDMA, both at once
  dispatch  latency + max over ranks of max(intra-node bytes / NVLink, inter-node bytes / RDMA),
            sent and received alike (links are full duplex)
  compute   max over ranks of FLOPs / grouped-GEMM throughput (the straggler)
  combine   as dispatch, with the computed rows coming back

A layer step is the sum of the four (no overlap of communication and compute: the conservative case,
the same for every system). Ranks ``r // ranks_per_node`` share a node. Every constant lives in
`config.ClusterCost` with its source.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from moe_understudy.config import ClusterCost
from moe_understudy.moe.standins import AssignmentStandIn, TokenStandIn
from moe_understudy.runtime import exchange as xchg
from moe_understudy.runtime import ledger
from moe_understudy.runtime.plan import Plan


def expert_flops(cost: ClusterCost) -> float:
    """FLOPs of one assignment (one token through one SwiGLU expert): 3 matmuls of H x I, x2."""
    return 6.0 * cost.hidden_size * cost.expert_intermediate


def expert_params(cost: ClusterCost) -> int:
    """Parameters of one routed SwiGLU expert (gate, up, down): 3 H I."""
    return 3 * cost.hidden_size * cost.expert_intermediate


def understudy_flops(cost: ClusterCost, top_k: int) -> float:
    """FLOPs of one understudy token: `understudy_cost` x the token's k routed experts."""
    return cost.understudy_cost * top_k * expert_flops(cost)


def understudy_slots(cost: ClusterCost, top_k: int) -> int:
    """Expert-sized weight slots one dense understudy occupies (a dense SwiGLU has params = FLOPs / 2).

    This is the memory budget replication gets for a fair comparison ("equal memory").
    """
    return int(cost.understudy_cost * top_k + 1e-9)


def row_bytes(cost: ClusterCost) -> int:
    """Bytes of one token's hidden vector on the wire."""
    return cost.hidden_size * cost.dtype_bytes


def weight_dtype(cost: ClusterCost) -> torch.dtype:
    """The dtype of combine weights in the routing exchange rows (the model's dtype)."""
    return {2: torch.bfloat16, 4: torch.float32}.get(cost.dtype_bytes, torch.bfloat16)


def node_of(num_ranks: int, cost: ClusterCost) -> torch.Tensor:
    """(R,) node of each rank."""
    return torch.arange(num_ranks) // cost.ranks_per_node


def link_seconds(intra_bytes: torch.Tensor, inter_bytes: torch.Tensor, cost: ClusterCost) -> torch.Tensor:
    """(R,) seconds each rank needs to move `intra_bytes` over NVLink and `inter_bytes` over RDMA, at once."""
    nvlink = intra_bytes.double() / (cost.nvlink_gbps * 1e9)
    rdma = inter_bytes.double() / (cost.link_gbps * 1e9)
    return torch.maximum(nvlink, rdma)


def all_to_all_seconds(intra: ledger.Traffic, inter: ledger.Traffic, cost: ClusterCost) -> float:
    """One all-to-all: latency + the busiest rank's send or receive time (0 when nothing crosses ranks).

    intra / inter: `ledger.traffic` of the rows that stay inside a node / cross nodes.
    """
    moved = intra.dispatch_bytes + inter.dispatch_bytes
    if intra.send_bytes.numel() <= 1 or moved == 0:
        return 0.0
    send = link_seconds(intra.send_bytes, inter.send_bytes, cost)
    recv = link_seconds(intra.recv_bytes, inter.recv_bytes, cost)
    return cost.latency_us * 1e-6 + float(torch.maximum(send, recv).max())


def flat_all_to_all_seconds(send_bytes: torch.Tensor, recv_bytes: torch.Tensor, cost: ClusterCost) -> float:
    """All-to-all of (R,) bytes with no per-peer split: NVLink within one node, else every byte at RDMA rate."""
    R = send_bytes.numel()
    if R <= 1:
        return 0.0
    gbps = cost.nvlink_gbps if R <= cost.ranks_per_node else cost.link_gbps
    busiest = float(torch.maximum(send_bytes, recv_bytes).max())
    return cost.latency_us * 1e-6 + busiest / (gbps * 1e9)


def exchange_seconds(per_rank_bytes: Sequence[int], cost: ClusterCost) -> float:
    """The routing all-gather: each rank's payload goes to every peer (`exchange.exchange_bytes` per rank)."""
    R = len(per_rank_bytes)
    if R <= 1 or max(per_rank_bytes) == 0:
        return 0.0
    node = node_of(R, cost)
    same = torch.bincount(node)[node] - 1  # (R,) peers in the rank's node
    payload = torch.tensor(per_rank_bytes, dtype=torch.float64) / (R - 1)
    return cost.latency_us * 1e-6 + float(link_seconds(payload * same, payload * (R - 1 - same), cost).max())


def compute_seconds(flops_per_rank: torch.Tensor, cost: ClusterCost) -> float:
    """(R,) FLOPs per rank -> time until the slowest rank finishes."""
    return float(flops_per_rank.max()) / (cost.device_tflops * 1e12)


def split_by_node(
    home: torch.Tensor, dest: torch.Tensor, num_ranks: int, cost: ClusterCost
) -> tuple[ledger.Traffic, ledger.Traffic]:
    """`ledger.traffic` of the sent assignments that stay in their token's node, and of those that leave it."""
    node = node_of(num_ranks, cost)
    sent = dest >= 0
    same = node[home][:, None] == node[dest.clamp(min=0)]
    none = torch.full_like(dest, -1)
    rb = row_bytes(cost)
    intra = ledger.traffic(home, torch.where(sent & same, dest, none), num_ranks, rb)
    inter = ledger.traffic(home, torch.where(sent & ~same, dest, none), num_ranks, rb)
    return intra, inter


@dataclass(frozen=True)
class LayerCost:
    """One layer of one step of one system: its times, bytes and work."""

    exchange_s: float
    dispatch_s: float
    compute_s: float
    combine_s: float
    a2a_bytes: int  # dispatch + combine, all ranks
    exchange_bytes: int  # routing exchange, all ranks
    work: torch.Tensor  # (R,) FLOPs per rank (expert rows + stand-in)
    counts: dict  # Plan.counts(): assignments by fate

    @property
    def seconds(self) -> float:
        return self.exchange_s + self.dispatch_s + self.compute_s + self.combine_s

    @property
    def total_bytes(self) -> int:
        return self.a2a_bytes + self.exchange_bytes

    @property
    def imbalance(self) -> float:
        """(max - mean) / mean of all work per rank (`ledger.imbalance`)."""
        return ledger.imbalance(self.work)


def layer_cost(
    plan: Plan,
    topology: ledger.Topology,
    cost: ClusterCost,
    *,
    stand_in: torch.nn.Module | None,
    exchange_mode: str,
    exchange_row_bytes: int,
    num_experts: int,
) -> LayerCost:
    """Time, bytes and work of one layer step of `plan` over `topology`, charged by the runtime ledger."""
    R, T = topology.num_devices, plan.num_tokens
    home = topology.token_device(T)
    dest = topology.destinations(plan)
    intra, inter = split_by_node(home, dest, R, cost)
    a2a = all_to_all_seconds(intra, inter, cost)  # combine mirrors dispatch: each computed row returns
    work = ledger.rank_work(plan, home, dest, R, expert_flops(cost), stand_in)
    tokens_per_rank = torch.bincount(home, minlength=R).tolist()
    exchange = xchg.exchange_bytes(
        exchange_mode, tokens_per_rank, num_experts, plan.top_k, exchange_row_bytes
    )
    return LayerCost(
        exchange_s=exchange_seconds(exchange, cost),
        dispatch_s=a2a,
        compute_s=compute_seconds(work, cost),
        combine_s=a2a,
        a2a_bytes=intra.dispatch_bytes + inter.dispatch_bytes + intra.combine_bytes + inter.combine_bytes,
        exchange_bytes=sum(exchange),
        work=work,
        counts=plan.counts(),
    )


def exchange_layout_bytes(
    policy: str, num_experts: int, top_k: int, cost: ClusterCost, candidates: int = 1
) -> int:
    """Bytes of one token's row in the ``rows`` routing exchange of `policy` (`exchange.row_layout`)."""
    return xchg.row_bytes(xchg.row_layout(policy, num_experts, top_k, weight_dtype(cost), candidates))


# ---- stand-ins the ledger can charge without weights ----------------------------------------------------


class AssignmentStandInCost(AssignmentStandIn):
    """An assignment-level stand-in as the ledger sees it: memory and FLOPs, no weights, never run.

    memory: per device per MoE layer, in routed experts (`memory_expert_equiv`).
    flops_by_served: FLOPs of a token with n stand-in-served assignments, n = 0..k, in units of one
    routed expert's FLOPs (per-assignment stand-ins: n x a; a shared trunk: one pass for all n).
    expert_flops: one routed expert's FLOPs per assignment in the simulated layer.
    """

    arch = "cost-model"

    def __init__(self, memory: float, flops_by_served: Sequence[float], expert_flops: float):
        super().__init__(hidden_size=0)
        self.memory = float(memory)
        self.table = torch.tensor([float(f) for f in flops_by_served], dtype=torch.float64) * expert_flops
        self.top_k = len(flops_by_served) - 1

    @classmethod
    def per_assignment(
        cls, memory: float, flops: float, top_k: int, expert_flops: float
    ) -> AssignmentStandInCost:
        """`flops` x one expert's FLOPs for every served assignment."""
        return cls(memory, [n * flops for n in range(top_k + 1)], expert_flops)

    @classmethod
    def like(
        cls,
        stand_in: AssignmentStandIn,
        expert_params: int,
        expert_flops_here: float,
        expert_flops_there: float,
        top_k: int,
    ) -> AssignmentStandInCost:
        """The cost of a real stand-in (its memory and `token_flops` relative to its own layer's expert),
        carried over to a layer whose expert costs `expert_flops_there`."""
        served = torch.arange(top_k)[None, :] < torch.arange(top_k + 1)[:, None]  # (k+1, k): n served
        ratios = (stand_in.token_flops(served) / expert_flops_here).tolist()
        return cls(stand_in.memory_expert_equiv(expert_params), ratios, expert_flops_there)

    def memory_expert_equiv(self, expert_params: int) -> float:
        return self.memory

    def param_count(self) -> int:
        return 0

    def flops_per_assignment(self) -> float:
        return float(self.table[1])

    def token_flops(self, served: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        """By how many of a token's assignments are served (the real stand-in's cost at its largest
        per-expert rank, where it has several)."""
        return self.table[served.sum(-1).clamp(max=self.top_k)]

    def config(self) -> dict:
        return {"memory": self.memory, "flops_by_served": self.table.tolist()}


class TokenStandInCost(TokenStandIn):
    """A token-level understudy as the ledger sees it: `flops` per token, `memory` in routed experts."""

    arch = "cost-model"

    def __init__(self, memory: float, flops: float):
        super().__init__(hidden_size=0)
        self.memory = float(memory)
        self.flops = float(flops)

    def memory_expert_equiv(self, expert_params: int) -> float:
        return self.memory

    def param_count(self) -> int:
        return 0

    def flops_per_token(self) -> float:
        return self.flops

    def config(self) -> dict:
        return {"memory": self.memory, "flops": self.flops}
