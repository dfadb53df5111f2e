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
    whose sizes follow `replica_share` (equal chunks for EPLB-style equal shares).
    """
    sent = torch.ones_like(indices, dtype=torch.bool) if sent is None else sent
    flat_e = indices.reshape(-1)
    flat_sent = sent.reshape(-1)
    out = torch.full_like(flat_e, -1)
    for e in torch.unique(flat_e[flat_sent]).tolist():
        rows = ((flat_e == e) & flat_sent).nonzero().squeeze(1)  # (n_e,)
        slots = placement.slots_of(layer, e)  # (c,)
        if slots.numel() == 0:
            raise ValueError(f"expert {e} of layer {layer} has no slot in the placement.")
        position = torch.arange(rows.numel())
        out[rows] = slots[replica_of_position(position, rows.numel(), placement.replica_share[layer, slots])]
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
