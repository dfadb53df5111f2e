"""Hot-expert replication baseline: which replica serves each assignment, and what that costs.

Given a `Placement` (from `placement.replicate_hot_experts`, or any other), every assignment of a
replicated expert is sent to one of its replicas; an expert's assignments, in token order, are
cut into consecutive chunks sized by the replicas' shares. Outputs are exact (a replica is a copy),
so replication changes only rank loads, bytes and memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_understudy.runtime.placement import Placement, Traffic, dispatch_traffic


@dataclass(frozen=True)
class ReplicaDispatch:
    """Where each assignment goes under a (possibly replicated) placement.

    slot:      (T, k) physical slot serving each assignment, -1 where the assignment is not sent
    dest_rank: (T, k) rank of that slot, -1 where not sent
    traffic:   rank loads and bytes of the dispatch
    """

    slot: torch.Tensor
    dest_rank: torch.Tensor
    traffic: Traffic


def replica_of_position(positions: torch.Tensor, total: int, shares: torch.Tensor) -> torch.Tensor:
    """(n,) replica (0..c-1) serving the assignments at `positions` among an expert's `total` sent ones.

    The expert's sent assignments, in flat token-major order, are cut into consecutive chunks whose
    sizes follow `shares` (c,): the one rule both the single-process ledger and expert parallelism
    (which knows only per-rank counts) apply.
    """
    shares = shares.double()
    bounds = torch.cumsum(shares / shares.sum(), 0) * total  # (c,) chunk ends
    which = torch.searchsorted(bounds, positions.double() + 0.5)
    return which.clamp(max=shares.numel() - 1)


def assign_replicas(
    indices: torch.Tensor, placement: Placement, layer: int, sent: torch.Tensor | None = None
) -> torch.Tensor:
    """(T, k) expert ids -> (T, k) physical slot per assignment (-1 where `sent` is False).

    Assignments of one expert are taken in flat token-major order and split into consecutive chunks
    whose sizes follow `replica_share` (equal chunks for EPLB-style equal shares): the rule of
    `replica_of_position`, for all experts at once (one sort, no loop over experts).
    """
    sent = torch.ones_like(indices, dtype=torch.bool) if sent is None else sent
    flat, keep = indices.reshape(-1), sent.reshape(-1)
    E = placement.num_experts
    key = torch.where(keep, flat, torch.full_like(flat, E))  # unsent sort last, in a bucket of their own
    order = torch.argsort(key, stable=True)  # by expert, token-major within an expert
    count = torch.bincount(key, minlength=E + 1)
    position = torch.empty_like(flat)
    position[order] = torch.arange(flat.numel()) - (torch.cumsum(count, 0) - count)[key[order]]
    # slots of each expert in ascending order, padded to the most replicas: (E, C)
    phys = placement.phys_to_logical[layer]
    copies = torch.bincount(phys[phys >= 0], minlength=E)
    if int(copies.min()) == 0:
        raise ValueError(f"expert {int(torch.argmin(copies))} of layer {layer} has no slot in the placement.")
    held = (phys >= 0).nonzero().squeeze(1)
    grouped = held[torch.argsort(phys[held], stable=True)]
    C = int(copies.max())
    rank_in = torch.arange(len(grouped)) - (torch.cumsum(copies, 0) - copies)[phys[grouped]]
    table = torch.full((E, C), -1, dtype=torch.long)
    table[phys[grouped], rank_in] = grouped
    share = torch.zeros(E, C, dtype=torch.float64)
    share[phys[grouped], rank_in] = placement.replica_share[layer, grouped].double()
    bounds = torch.cumsum(share / share.sum(1, keepdim=True), 1)  # (E, C) chunk ends as fractions
    bounds[table < 0] = float("inf")
    e = flat.clamp(min=0, max=E - 1)
    value = position.double() + 0.5  # searchsorted(bounds * total, value): bounds below the value
    which = (bounds[e] * count[e, None].double() < value[:, None]).sum(1).clamp(max=copies[e] - 1)
    out = torch.where(keep, table[e, which], torch.full_like(flat, -1))
    return out.view_as(indices)


def replicated_dispatch(
    indices: torch.Tensor,
    placement: Placement,
    layer: int,
    src_rank: torch.Tensor,
    bytes_per_row: int,
    sent: torch.Tensor | None = None,
) -> ReplicaDispatch:
    """Dispatch (T, k) assignments of tokens living on `src_rank` (T,) under `placement`."""
    sent = torch.ones_like(indices, dtype=torch.bool) if sent is None else sent
    slot = assign_replicas(indices, placement, layer, sent)
    dest = torch.where(sent, slot // placement.slots_per_rank, torch.full_like(slot, -1))
    traffic = dispatch_traffic(src_rank, dest.clamp(min=0), sent, placement.num_ranks, bytes_per_row)
    return ReplicaDispatch(slot=slot, dest_rank=dest, traffic=traffic)


def extra_expert_bytes(placement: Placement, expert_bytes: int) -> int:
    """Bytes per rank spent beyond one copy of every expert: (slots per rank - E/R) experts, per layer.

    Reported per rank and summed over layers so it compares with one understudy per layer per rank.
    """
    base = placement.num_experts / placement.num_ranks
    return int(round((placement.slots_per_rank - base) * expert_bytes * placement.num_layers))
