"""Admission: the order in which experts take assignments, and each assignment's place in its queue.

Pure tensor functions shared by the policies (runtime/policies.py) and by the expert-parallel
exchange (runtime/exchange.py), which rebuilds the same queue places from per-rank counts.

Admission order (`priority`):
  - ``position``: arrival order as in GShard, with every token's first choice queued before any
    token's second choice (choice rank = rank of the assignment's weight within its token);
  - ``score``: highest router weight first, so the lowest-weight assignments overflow first
    (batch-prioritized routing, Capacity-Aware Inference's token drop); ties fall back to position.

Capacity is held per expert, or per group of experts (a rank under expert parallelism) when a
``groups`` map (E,) is given: a group takes the first ``capacity`` assignments of the queue of all
its experts. Where an expert has replicas on several ranks, ``groups`` may instead give the owner
of each assignment (T, k): the rank of the replica the assignment was routed to.
"""

from __future__ import annotations

import math

import torch

PRIORITIES = ("position", "score")


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Assignments one expert (or group) may take in a step: ceil(cf * T * k / E)."""
    if capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be positive, got {capacity_factor}.")
    # The epsilon keeps exact products (e.g. 0.75 * 2048 / 8 = 192) from rounding up through fp error.
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts - 1e-9)


def choice_rank(weights: torch.Tensor) -> torch.Tensor:
    """(T, k) rank of each assignment's weight within its token, 0 = the token's first choice."""
    order = torch.argsort(-weights.detach().float(), dim=-1, stable=True)
    return torch.argsort(order, dim=-1, stable=True)


def admission_order(weights: torch.Tensor, priority: str) -> torch.Tensor:
    """weights (T, k) -> (T*k,) flat assignment ids (t * k + j) in the order experts admit them."""
    T, k = weights.shape
    token = torch.arange(T, device=weights.device)[:, None].expand(T, k)
    position_key = (choice_rank(weights) * T + token).reshape(-1)  # first choices, then second...
    order = torch.argsort(position_key, stable=True)
    if priority == "position":
        return order
    if priority == "score":
        w = weights.detach().float().reshape(-1)
        return order[torch.argsort(-w[order], stable=True)]  # stable: position order breaks ties
    raise ValueError(f"Unknown priority {priority!r}; choose one of: {', '.join(PRIORITIES)}.")


def queue_positions(owners: torch.Tensor, num_owners: int) -> torch.Tensor:
    """owners: (n,) capacity holder per assignment, in admission order -> (n,) place in its holder's queue."""
    n = owners.numel()
    ar = torch.arange(n, device=owners.device)
    grouped = torch.argsort(owners * n + ar)  # group by holder, keep admission order inside a group
    counts = torch.bincount(owners, minlength=num_owners + 1)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.empty_like(owners)
    pos[grouped] = ar - starts[owners[grouped]]
    return pos


def owners_of(indices: torch.Tensor, groups: torch.Tensor | None) -> torch.Tensor:
    """Who holds the capacity each assignment uses: its expert, its expert's group, or its own owner (T, k)."""
    if groups is None:
        return indices
    return groups if groups.dim() == 2 else groups[indices]


def capacity_holders(num_experts: int, groups: torch.Tensor | None) -> int:
    """How many capacities a step has: one per expert, or one per group (rank)."""
    return num_experts if groups is None else int(groups.max()) + 1


def queue_places(
    indices: torch.Tensor, order: torch.Tensor, num_experts: int, groups: torch.Tensor | None = None
) -> torch.Tensor:
    """(T, k) place of every assignment in its expert's (or its expert's group's) queue, admitted in `order`.

    An index equal to `num_experts` marks an empty candidate: it gets its own holder and never
    competes for a real expert's capacity.
    """
    holders = capacity_holders(num_experts, groups)
    real = indices < num_experts
    owners = (
        owners_of(indices.clamp(max=num_experts - 1), groups)
        if groups is None or groups.dim() == 1
        else groups
    )
    flat = torch.where(real, owners, holders).reshape(-1)
    pos = torch.empty_like(flat)
    pos[order] = queue_positions(flat[order], holders + 1)
    return pos.view_as(indices)


def priority_ranks(order: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """(T, k) place of each assignment in the admission order `order` (T*k,)."""
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    return rank.view(shape)
