"""Overflow policies: pure functions from a `Routing` and an expert capacity to a `Plan`.

Route first, decide here, execute later (runtime/layer.py). Nothing in this module touches a
model, so every policy is testable on hand-written routings.

Admission order (`priority`):
  - ``position``: arrival order as in GShard, with every token's first choice queued before any
    token's second choice (choice rank = rank of the assignment's weight within its token);
  - ``score``: highest router weight first, so the lowest-weight assignments overflow first
    (batch-prioritized routing); ties fall back to position order.

An expert takes the first ``capacity`` assignments of its queue; the rest overflow. With ``groups``
(an expert -> rank map under expert parallelism) capacity is per group instead: a rank takes the
first ``capacity`` assignments of the queue of all its experts, so a cold expert's spare room
absorbs a hot neighbour's load and every rank ends near the same load. What happens to overflow is
the policy:

  full         no limit: every assignment goes to its expert.
  drop         overflow contributes nothing (GShard/Switch token dropping).
  drop_renorm  as drop, then each token's kept weights are rescaled to the token's original sum.
  reroute      overflow moves to the token's next-best expert (router logit order, outside its own
               top-k) that still has free capacity, keeping its combine weight; else dropped.
  understudy   a token with any overflowing assignment takes its whole routed output from the
               layer's understudy, so none of its assignments is sent. Its kept assignments free
               capacity; with ``readmit`` (default) that capacity is then offered, token by token in
               priority order, to the other understudy tokens whose every assignment fits, so
               fewer tokens are degraded. Readmission never pushes an expert past capacity.
  shadow       each overflowing assignment is served by its expert's shadow (local, no transfer).
  layer        the whole layer uses its understudy for this step when its max/mean expert load is
               above ``threshold`` (default: when any expert would overflow, i.e. max load >
               capacity); otherwise every assignment goes to its expert.
  deadline     every assignment is dispatched; expert e finishes its queue slot p at
               ``(p + 1) * time_per_assignment[e] + latency``; a token whose result from any expert
               would arrive after ``deadline`` keeps the understudy output computed up front (the
               default deadline, ``capacity * time_per_assignment + latency``, cuts where capacity
               would). Late work was still sent, so `Plan.dispatched` marks every assignment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moe_understudy.moe.adapters import Routing

POLICIES = ("full", "drop", "drop_renorm", "reroute", "understudy", "shadow", "layer", "deadline")
PRIORITIES = ("position", "score")
# Policies whose plan needs a stand-in module for the layer.
NEEDS_UNDERSTUDY = ("understudy", "layer", "deadline")
NEEDS_SHADOWS = ("shadow",)


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Assignments one expert may take in a step: ceil(cf * T * k / E)."""
    if capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be positive, got {capacity_factor}.")
    # The epsilon keeps exact products (e.g. 0.75 * 2048 / 8 = 192) from rounding up through fp error.
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts - 1e-9)


@dataclass(frozen=True)
class Plan:
    """What the runtime does with each of T tokens' k assignments.

    indices:           (T, k) long, final expert per assignment (after any reroute)
    weights:           (T, k) final combine weights
    expert_served:     (T, k) bool, computed by `indices` expert
    shadow_served:     (T, k) bool, computed by that expert's shadow, locally
    dropped:           (T, k) bool, contributes nothing
    understudy_tokens: (T,) bool, the token's whole routed output comes from the understudy
    dispatched:        (T, k) bool or None, sent to an expert (None: exactly the expert-served ones)

    Every assignment is exactly one of expert-served, shadow-served, dropped, or belongs to an
    understudy token.
    """

    indices: torch.Tensor
    weights: torch.Tensor
    expert_served: torch.Tensor
    shadow_served: torch.Tensor
    dropped: torch.Tensor
    understudy_tokens: torch.Tensor
    dispatched: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.indices.shape[0]

    @property
    def top_k(self) -> int:
        return self.indices.shape[1]

    def understudy_served(self) -> torch.Tensor:
        """(T, k) bool: assignments covered by their token's understudy output."""
        return self.understudy_tokens[:, None].expand_as(self.expert_served)

    def sent(self) -> torch.Tensor:
        """(T, k) bool: assignments that travel to their expert (dispatch)."""
        return self.expert_served if self.dispatched is None else self.dispatched

    def expert_indices(self, num_experts: int) -> torch.Tensor:
        """(T, k) `indices` with every assignment not served by an expert set to `num_experts` (skipped)."""
        return torch.where(self.expert_served, self.indices, torch.full_like(self.indices, num_experts))

    def shadow_indices(self, num_experts: int) -> torch.Tensor:
        """(T, k) `indices` with every assignment not served by a shadow set to `num_experts` (skipped)."""
        return torch.where(self.shadow_served, self.indices, torch.full_like(self.indices, num_experts))

    def served_per_expert(self, num_experts: int) -> torch.Tensor:
        """(E,) assignments each expert computes."""
        return torch.bincount(self.indices[self.expert_served], minlength=num_experts)

    def counts(self) -> dict[str, int]:
        """Assignments by fate (they add up to `assignments`) and tokens touched by degradation."""
        degraded = self.understudy_tokens | (~self.expert_served).any(-1)
        # One reduction and one transfer for all counts: this runs per layer and step when recording.
        per_assignment = torch.stack([self.expert_served, self.shadow_served, self.dropped, self.sent()])
        per_token = torch.stack([self.understudy_tokens, degraded])
        expert, shadow, dropped, sent = per_assignment.flatten(1).sum(1).tolist()
        understudy_tokens, degraded_tokens = per_token.sum(1).tolist()
        return {
            "tokens": self.num_tokens,
            "assignments": self.indices.numel(),
            "expert": expert,
            "shadow": shadow,
            "understudy": understudy_tokens * self.top_k,
            "dropped": dropped,
            "understudy_tokens": understudy_tokens,
            "degraded_tokens": degraded_tokens,
            "sent": sent,
        }


# --- admission -------------------------------------------------------------------------------


def choice_rank(weights: torch.Tensor) -> torch.Tensor:
    """(T, k) rank of each assignment's weight within its token, 0 = the token's first choice."""
    order = torch.argsort(-weights.detach().float(), dim=-1, stable=True)
    return torch.argsort(order, dim=-1, stable=True)


def admission_order(routing: Routing, priority: str) -> torch.Tensor:
    """(T*k,) flat assignment ids (t * k + j) in the order experts admit them."""
    T, k = routing.indices.shape
    token = torch.arange(T, device=routing.indices.device)[:, None].expand(T, k)
    position_key = (choice_rank(routing.weights) * T + token).reshape(-1)  # first choices, then second...
    order = torch.argsort(position_key, stable=True)
    if priority == "position":
        return order
    if priority == "score":
        w = routing.weights.detach().float().reshape(-1)
        return order[torch.argsort(-w[order], stable=True)]  # stable: position order breaks ties
    raise ValueError(f"Unknown priority {priority!r}; choose one of: {', '.join(PRIORITIES)}.")


def queue_positions(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """experts: (n,) expert id per assignment, in admission order -> (n,) place in its expert's queue."""
    n = experts.numel()
    ar = torch.arange(n, device=experts.device)
    grouped = torch.argsort(experts * n + ar)  # group by expert, keep admission order inside a group
    counts = torch.bincount(experts, minlength=num_experts + 1)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.empty_like(experts)
    pos[grouped] = ar - starts[experts[grouped]]
    return pos


def _positions(routing: Routing, order: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
    """(T, k) place of every assignment in its expert's (or its expert's group's) queue, admitted in `order`."""
    flat = _owners(routing.indices, groups).reshape(-1)
    pos = torch.empty_like(flat)
    pos[order] = queue_positions(flat[order], capacity_holders(routing.num_experts, groups))
    return pos.view_as(routing.indices)


def _owners(indices: torch.Tensor, groups: torch.Tensor | None) -> torch.Tensor:
    """Who holds the capacity each assignment uses: its expert, or the expert's group."""
    return indices if groups is None else groups[indices]


def capacity_holders(num_experts: int, groups: torch.Tensor | None) -> int:
    """How many capacities a step has: one per expert, or one per group (rank)."""
    return num_experts if groups is None else int(groups.max()) + 1


# --- the plan --------------------------------------------------------------------------------


def plan_routing(
    routing: Routing,
    policy: str,
    capacity: int,
    priority: str = "position",
    *,
    readmit: bool = True,
    threshold: float | None = None,
    time_per_assignment: float | torch.Tensor = 1.0,
    latency: float = 0.0,
    deadline: float | None = None,
    groups: torch.Tensor | None = None,
) -> Plan:
    """Decide the fate of every assignment of `routing` under `policy` with `capacity` per expert.

    routing: Routing with indices/weights (T, k), logits (T, E). groups: optional (E,) long group
    (rank) of each expert; `capacity` is then per group. Keyword options belong to single policies
    (see the module docstring) and are ignored by the others.
    """
    if policy not in POLICIES:
        raise ValueError(f"Unknown policy {policy!r}; choose one of: {', '.join(POLICIES)}.")
    if capacity < 0:
        raise ValueError(f"capacity must be non-negative, got {capacity}.")
    if groups is not None and groups.shape != (routing.num_experts,):
        raise ValueError(
            f"groups must give one group per expert ({routing.num_experts},), got {tuple(groups.shape)}."
        )
    if policy == "full":
        return _everything_to_experts(routing)
    if policy == "layer":
        return _layer(routing, capacity, threshold, groups)
    order = admission_order(routing, priority)
    if policy == "deadline":
        return _deadline(routing, order, capacity, time_per_assignment, latency, deadline, groups)
    kept = _positions(routing, order, groups) < capacity  # (T, k)
    if policy in ("drop", "drop_renorm"):
        return _drop(routing, kept, renormalise=policy == "drop_renorm")
    if policy == "reroute":
        return _reroute(routing, kept, order, capacity, groups)
    if policy == "understudy":
        return _understudy(routing, kept, order, capacity, readmit, groups)
    return _shadow(routing, kept)


def _plan(routing: Routing, expert_served: torch.Tensor, **fields) -> Plan:
    none = torch.zeros_like(expert_served)
    return Plan(
        indices=fields.pop("indices", routing.indices),
        weights=fields.pop("weights", routing.weights),
        expert_served=expert_served,
        shadow_served=fields.pop("shadow_served", none),
        dropped=fields.pop("dropped", none),
        understudy_tokens=fields.pop("understudy_tokens", none[:, 0]),
        **fields,
    )


def _everything_to_experts(routing: Routing) -> Plan:
    return _plan(routing, torch.ones_like(routing.indices, dtype=torch.bool))


def _all_understudy(routing: Routing) -> Plan:
    nothing = torch.zeros_like(routing.indices, dtype=torch.bool)
    return _plan(routing, nothing, understudy_tokens=torch.ones_like(nothing[:, 0]))


def _drop(routing: Routing, kept: torch.Tensor, renormalise: bool) -> Plan:
    weights = routing.weights
    if renormalise:
        # Rescale to the token's original weight sum (1 for most families, routed_scaling_factor
        # for DeepSeek-V3); a token that lost everything keeps zero.
        total = weights.sum(-1, keepdim=True)
        kept_sum = (weights * kept).sum(-1, keepdim=True)
        scale = total / kept_sum.clamp_min(torch.finfo(weights.dtype).tiny)
        weights = torch.where(kept, weights * scale, torch.zeros_like(weights))
    return _plan(routing, kept, weights=weights, dropped=~kept)


def _shadow(routing: Routing, kept: torch.Tensor) -> Plan:
    return _plan(routing, kept, shadow_served=~kept)


def _reroute(
    routing: Routing, kept: torch.Tensor, order: torch.Tensor, capacity: int, groups: torch.Tensor | None
) -> Plan:
    """Overflow assignments propose their token's next-best experts, one per round, in priority order.

    Round r: each token with pending overflow proposes its r-th alternative (experts outside its
    top-k, by router logit) for its highest-priority pending assignment; proposals to one expert are
    accepted in priority order while the expert has free capacity. A token proposes in every round
    until its overflow is placed, so after E - k rounds every alternative has been tried.
    """
    T, k = routing.indices.shape
    E = routing.num_experts
    owners = capacity_holders(E, groups)
    indices = routing.indices.clone()
    pending = ~kept
    load = torch.bincount(_owners(routing.indices[kept], groups), minlength=owners)  # (E,) or (groups,)
    ranked = torch.argsort(routing.logits.detach().float(), dim=-1, descending=True, stable=True)  # (T, E)
    own = torch.zeros(T, E, dtype=torch.bool, device=indices.device).scatter_(1, routing.indices, True)
    alternatives = ranked[~own.gather(1, ranked)].view(T, E - k)  # (T, E-k) best first
    priority_rank = torch.empty_like(order)
    priority_rank[order] = torch.arange(order.numel(), device=order.device)
    priority_rank = priority_rank.view(T, k)
    never = order.numel()
    for r in range(E - k):
        if not pending.any():
            break
        first_rank, slot = torch.where(pending, priority_rank, never).min(-1)  # (T,)
        tokens = (first_rank < never).nonzero().squeeze(1)
        by_priority = torch.argsort(first_rank[tokens])
        tokens = tokens[by_priority]
        candidate = alternatives[tokens, r]
        owner = _owners(candidate, groups)
        accept = queue_positions(owner, owners) < (capacity - load)[owner]
        tokens, slot, candidate = tokens[accept], slot[tokens[accept]], candidate[accept]
        indices[tokens, slot] = candidate
        pending[tokens, slot] = False
        load += torch.bincount(owner[accept], minlength=owners)
    return _plan(routing, ~pending, indices=indices, dropped=pending)


def _understudy(
    routing: Routing,
    kept: torch.Tensor,
    order: torch.Tensor,
    capacity: int,
    readmit: bool,
    groups: torch.Tensor | None,
) -> Plan:
    T, k = routing.indices.shape
    overflowing = ~kept.all(-1)  # (T,) tokens with any overflow
    if readmit and overflowing.any():
        overflowing = overflowing & ~_readmitted(routing, overflowing, order, capacity, groups)
    expert_served = ~overflowing[:, None].expand(T, k)
    return _plan(routing, expert_served, understudy_tokens=overflowing)


def _readmitted(
    routing: Routing,
    candidates: torch.Tensor,
    order: torch.Tensor,
    capacity: int,
    groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """(T,) bool: candidate tokens whose every assignment fits the capacity the other tokens left.

    Greedy over candidates in priority order (a token's priority is its best assignment's place in
    `order`); a token that does not fit takes nothing, so later smaller demands may still fit.
    """
    T, k = routing.indices.shape
    owners = _owners(routing.indices, groups)  # (T, k)
    staying = ~candidates
    free = (
        capacity
        - torch.bincount(owners[staying].reshape(-1), minlength=capacity_holders(routing.num_experts, groups))
    ).tolist()
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    token_rank = rank.view(T, k).min(-1).values
    cand = candidates.nonzero().squeeze(1)
    cand = cand[torch.argsort(token_rank[cand])]
    admitted = torch.zeros(T, dtype=torch.bool, device=candidates.device)
    chosen: list[int] = []
    for t, held_by in zip(cand.tolist(), owners[cand].tolist(), strict=True):
        # A token's k experts are distinct, but two of them may share a group.
        if all(free[o] >= held_by.count(o) for o in held_by):
            for o in held_by:
                free[o] -= 1
            chosen.append(t)
    if chosen:
        admitted[torch.tensor(chosen, device=candidates.device)] = True
    return admitted


def _layer(routing: Routing, capacity: int, threshold: float | None, groups: torch.Tensor | None) -> Plan:
    load = torch.bincount(
        _owners(routing.indices, groups).reshape(-1), minlength=capacity_holders(routing.num_experts, groups)
    )
    if threshold is None:
        switch = int(load.max()) > capacity
    else:
        switch = float(load.max()) / max(float(load.float().mean()), 1e-12) > threshold
    return _all_understudy(routing) if switch else _everything_to_experts(routing)


def _deadline(
    routing: Routing,
    order: torch.Tensor,
    capacity: int,
    time_per_assignment: float | torch.Tensor,
    latency: float,
    deadline: float | None,
    groups: torch.Tensor | None,
) -> Plan:
    per_expert = torch.as_tensor(time_per_assignment, dtype=torch.float64, device=routing.indices.device)
    if deadline is None:
        if per_expert.numel() != 1:
            raise ValueError("With a per-expert time_per_assignment, pass an explicit deadline.")
        deadline = capacity * float(per_expert) + latency
    per_expert = per_expert.expand(routing.num_experts) if per_expert.numel() == 1 else per_expert
    position = _positions(routing, order, groups)  # (T, k)
    finish = (position + 1).double() * per_expert[routing.indices] + latency  # (T, k)
    late = finish > deadline + 1e-9
    late_tokens = late.any(-1)
    expert_served = ~late_tokens[:, None].expand_as(late)
    return _plan(
        routing,
        expert_served,
        understudy_tokens=late_tokens,
        dispatched=torch.ones_like(late),
    )
