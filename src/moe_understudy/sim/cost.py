"""Cost model of one MoE layer step on a cluster: compute from FLOPs, all-to-all from bytes.

An all-to-all is a collective: it ends when the busiest rank has sent and received its bytes, so
its time is ``latency + max over ranks of max(sent, received) / bandwidth``. Expert compute ends
when the busiest rank is done: ``max over ranks of FLOPs / throughput``. A layer step is
dispatch + compute + combine (no overlap: the conservative case for every policy alike).
"""

from __future__ import annotations

import torch

from moe_understudy.config import ClusterCost


def expert_flops(cost: ClusterCost) -> float:
    """FLOPs of one assignment (one token through one SwiGLU expert): 3 matmuls of H x I, x2."""
    return 6.0 * cost.hidden_size * cost.expert_intermediate


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


def compute_seconds(flops_per_rank: torch.Tensor, cost: ClusterCost) -> float:
    """(R,) FLOPs per rank -> time until the slowest rank finishes."""
    return float(flops_per_rank.max()) / (cost.device_tflops * 1e12)


def all_to_all_seconds(send_bytes: torch.Tensor, recv_bytes: torch.Tensor, cost: ClusterCost) -> float:
    """(R,) bytes each rank sends / receives -> collective time (0 when nothing moves and R == 1)."""
    if send_bytes.numel() <= 1:
        return 0.0
    busiest = float(torch.maximum(send_bytes, recv_bytes).max())
    return cost.latency_us * 1e-6 + busiest / (cost.link_gbps * 1e9)
