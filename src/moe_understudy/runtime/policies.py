"""Overflow policies: pure functions from a routing and a capacity to a `Plan`.

Route first, decide here, execute later (runtime/core.py). Nothing in this module touches a
model, so every policy is testable on hand-written routings. A routing is anything with
``indices`` / ``weights`` (T, k) and ``num_experts`` (a `Routing` from the adapter, or the compact
routing that expert parallelism exchanges); ``logits`` are read only where a policy needs the
router's order beyond the top-k and none was precomputed (`alternatives`, `candidates`).

Admission order and capacity holders are in runtime/admission.py. What happens to overflow:

  full            no limit: every assignment goes to its expert.
  drop            overflow contributes nothing. With priority ``score`` this is Capacity-Aware
                  Inference's token drop (arXiv 2503.05066); with ``position``, GShard/Switch.
  drop_renorm     as drop, then each token's kept weights are rescaled to the token's original sum.
  reroute         overflow moves to the token's next-best expert (router logit order, outside its own
                  top-k) that still has free capacity, keeping its combine weight; else dropped.
  expanded_drop   Capacity-Aware Inference's expanded drop: a token's candidates are its top-k plus
                  the ``m`` best-scoring experts held by its own device (no all-to-all for them);
                  capacity is enforced over all candidates in admission order; a token keeps at most
                  k surviving candidates (its best), a surviving local candidate takes the place of a
                  lost top-k assignment (weight: its router probability in the family's
                  normalisation), and the rest is dropped. (The reference code offers every local
                  expert and no cap of k; we follow the issue's bounded form.)
  understudy      a token with any overflowing assignment takes its whole routed output from the
                  layer's token-level understudy, so none of its assignments is sent. Its kept
                  assignments free capacity; with ``readmit`` (default) that capacity is then offered,
                  token by token in priority order, to the other understudy tokens whose every
                  assignment fits, so fewer tokens are degraded. Readmission never exceeds capacity.
  shadow          each overflowing assignment is served locally by the layer's assignment-level
                  stand-in (per-expert shadows, or a shared expert-conditioned network).
  expanded_shadow expanded_drop, then every lost assignment no local candidate replaced is served by
                  the assignment-level stand-in instead of being dropped (local reroute first).
  layer           the whole layer uses its understudy for this step when its max/mean expert load is
                  above ``threshold`` (default: when any expert would overflow, i.e. max load >
                  capacity); otherwise every assignment goes to its expert.
  deadline        every assignment is dispatched; expert e finishes its queue slot p at
                  ``(p + 1) * time_per_assignment[e] + latency``; a token whose result from any expert
                  would arrive after ``deadline`` keeps the understudy output computed up front (the
                  default deadline, ``capacity * time_per_assignment + latency``, cuts where capacity
                  would). Late work was still sent, so `Plan.dispatched` marks every assignment.
"""

from __future__ import annotations

import torch

from moe_understudy.runtime.admission import (
    PRIORITIES,
    admission_order,
    capacity_holders,
    expert_capacity,
    owners_of,
    priority_ranks,
    queue_places,
    queue_positions,
)
from moe_understudy.runtime.plan import Plan, everything_to_experts, plan_of

POLICIES = (
    "full",
    "drop",
    "drop_renorm",
    "reroute",
    "expanded_drop",
    "understudy",
    "shadow",
    "expanded_shadow",
    "layer",
    "deadline",
)
# Policies whose plan needs a token-level understudy / an assignment-level stand-in for the layer.
NEEDS_UNDERSTUDY = ("understudy", "layer", "deadline")
NEEDS_SHADOWS = ("shadow", "expanded_shadow")
EXPANDED = ("expanded_drop", "expanded_shadow")
__all__ = ["PRIORITIES", "POLICIES", "Plan", "expert_capacity", "plan_routing", "expanded_candidates"]


def plan_routing(
    routing,
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
    candidates: tuple[torch.Tensor, torch.Tensor] | None = None,
    alternatives: torch.Tensor | None = None,
    places: torch.Tensor | None = None,
    holder_load: torch.Tensor | None = None,
) -> Plan:
    """Decide the fate of every assignment of `routing` under `policy` with `capacity` per expert.

    routing: indices/weights (T, k) and num_experts (logits (T, E) where a policy needs them).
    groups: optional (E,) long group (rank) of each expert, or (T, k) owner of each assignment (the
    rank of the replica it was routed to); `capacity` is then per group.
    candidates: expanded policies' local candidates (indices (T, m), weights (T, m)); default: the
    best expert outside the top-k, all experts on one device (`expanded_candidates`).
    alternatives: reroute's (T, E - k) experts outside the top-k, best first; default from logits.
    places / holder_load: queue places (T, k) and per-holder load computed elsewhere (expert
    parallelism rebuilds them from per-rank counts); default from `routing` and `priority`.
    Keyword options belong to single policies (see the module docstring) and are ignored by others.
    """
    if policy not in POLICIES:
        raise ValueError(f"Unknown policy {policy!r}; choose one of: {', '.join(POLICIES)}.")
    if priority not in PRIORITIES:
        raise ValueError(f"Unknown priority {priority!r}; choose one of: {', '.join(PRIORITIES)}.")
    if capacity < 0:
        raise ValueError(f"capacity must be non-negative, got {capacity}.")
    E = routing.num_experts
    if groups is not None and groups.shape not in ((E,), routing.indices.shape):
        raise ValueError(
            f"groups must give one group per expert ({E},) or one owner per assignment "
            f"{tuple(routing.indices.shape)}, got {tuple(groups.shape)}."
        )
    if groups is not None and groups.dim() == 2 and policy in ("reroute", *EXPANDED):
        raise ValueError(
            f"Policy {policy!r} moves assignments to other experts, whose owner a per-assignment map does not "
            "give; use capacity per expert with replicated experts, or a placement without replicas."
        )
    if policy == "full":
        return everything_to_experts(routing.indices, routing.weights)
    if policy == "layer":
        if holder_load is None:
            holder_load = torch.bincount(
                owners_of(routing.indices, groups).reshape(-1), minlength=capacity_holders(E, groups)
            )
        return _layer(routing, capacity, threshold, holder_load)
    if policy in EXPANDED:
        if candidates is None:
            candidates = expanded_candidates(routing, m=1)
        return _expanded(routing, capacity, priority, groups, candidates, policy == "expanded_shadow")
    # Known queue places (expert parallelism's counts, the simulator) spare the sort where only the
    # places matter; reroute and understudy also walk the admission order itself.
    order = (
        None
        if places is not None and policy not in ("reroute", "understudy")
        else admission_order(routing.weights, priority)
    )
    if places is None:
        places = queue_places(routing.indices, order, E, groups)
    if policy == "deadline":
        return _deadline(routing, places, capacity, time_per_assignment, latency, deadline)
    kept = places < capacity  # (T, k)
    if policy in ("drop", "drop_renorm"):
        return _drop(routing, kept, renormalise=policy == "drop_renorm")
    if policy == "reroute":
        if alternatives is None:
            alternatives = ranked_alternatives(routing.logits, routing.indices)
        return _reroute(routing, kept, order, capacity, groups, alternatives)
    if policy == "understudy":
        return _understudy(routing, kept, order, capacity, readmit, groups)
    return plan_of(routing.indices, routing.weights, kept, shadow_served=~kept)


def _drop(routing, kept: torch.Tensor, renormalise: bool) -> Plan:
    weights = routing.weights
    if renormalise:
        # Rescale to the token's original weight sum (1 for most families, routed_scaling_factor
        # for DeepSeek-V3); a token that lost everything keeps zero.
        total = weights.sum(-1, keepdim=True)
        kept_sum = (weights * kept).sum(-1, keepdim=True)
        scale = total / kept_sum.clamp_min(torch.finfo(weights.dtype).tiny)
        weights = torch.where(kept, weights * scale, torch.zeros_like(weights))
    return plan_of(routing.indices, weights, kept, dropped=~kept)


def ranked_alternatives(logits: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """(T, E - k) experts outside each token's top-k `indices`, by descending router logit."""
    T, E = logits.shape
    k = indices.shape[1]
    ranked = torch.argsort(logits.detach().float(), dim=-1, descending=True, stable=True)  # (T, E)
    own = torch.zeros(T, E, dtype=torch.bool, device=indices.device).scatter_(1, indices, True)
    return ranked[~own.gather(1, ranked)].view(T, E - k)


def _reroute(
    routing,
    kept: torch.Tensor,
    order: torch.Tensor,
    capacity: int,
    groups: torch.Tensor | None,
    alternatives: torch.Tensor,
) -> Plan:
    """Overflow assignments propose their token's next-best experts, one per round, in priority order.

    Round r: each token with pending overflow proposes its r-th alternative for its highest-priority
    pending assignment; proposals to one holder are accepted in priority order while it has free
    capacity. A token proposes in every round until its overflow is placed, so after E - k rounds
    every alternative has been tried.
    """
    T, k = routing.indices.shape
    owners = capacity_holders(routing.num_experts, groups)
    indices = routing.indices.clone()
    pending = ~kept
    load = torch.bincount(owners_of(routing.indices[kept], groups), minlength=owners)
    rank = priority_ranks(order, (T, k))
    never = order.numel()
    for r in range(alternatives.shape[1]):
        if not pending.any():
            break
        first_rank, slot = torch.where(pending, rank, never).min(-1)  # (T,)
        tokens = (first_rank < never).nonzero().squeeze(1)
        tokens = tokens[torch.argsort(first_rank[tokens])]
        candidate = alternatives[tokens, r]
        owner = owners_of(candidate, groups)
        accept = queue_positions(owner, owners) < (capacity - load)[owner]
        tokens, slot, candidate = tokens[accept], slot[tokens[accept]], candidate[accept]
        indices[tokens, slot] = candidate
        pending[tokens, slot] = False
        load += torch.bincount(owner[accept], minlength=owners)
    return plan_of(indices, routing.weights, ~pending, dropped=pending)


def expanded_candidates(
    routing,
    m: int,
    token_device: torch.Tensor | None = None,
    expert_device: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's `m` best experts outside its top-k that live on its own device.

    routing: a `Routing` (logits (T, E), indices/weights (T, k)); token_device (T,) and
    expert_device (E,) give where tokens and experts live (None: one device holding everything).
    Returns (indices (T, m), weights (T, m)): a candidate's weight is its router probability scaled
    by the token's top-k normaliser (sum of top-k weights / sum of their probabilities), i.e. the
    weight the family would give it inside the top-k. Missing candidates (fewer than m local
    experts) have index E and weight 0.
    """
    probs = routing.probs()  # (T, E) fp32
    T, E = probs.shape
    own = torch.zeros(T, E, dtype=torch.bool, device=probs.device).scatter_(1, routing.indices, True)
    eligible = ~own
    if token_device is not None and expert_device is not None:
        eligible &= expert_device.to(probs.device)[None, :] == token_device.to(probs.device)[:, None]
    m = min(m, E - routing.top_k)
    score, idx = probs.masked_fill(~eligible, -1.0).topk(m, dim=-1)  # (T, m), best first
    missing = score < 0
    normaliser = routing.weights.float().sum(-1, keepdim=True) / probs.gather(1, routing.indices).sum(
        -1, keepdim=True
    ).clamp_min(1e-20)
    weights = torch.where(missing, torch.zeros_like(score), score * normaliser).to(routing.weights.dtype)
    return torch.where(missing, torch.full_like(idx, E), idx), weights


def _expanded(
    routing,
    capacity: int,
    priority: str,
    groups: torch.Tensor | None,
    candidates: tuple[torch.Tensor, torch.Tensor],
    stand_in: bool,
) -> Plan:
    E = routing.num_experts
    T, k = routing.indices.shape
    cand_idx, cand_w = candidates  # (T, m)
    m = cand_idx.shape[1]
    every_idx = torch.cat([routing.indices, cand_idx], dim=1)  # (T, k + m)
    every_w = torch.cat([routing.weights, cand_w], dim=1)
    real = every_idx < E
    # Empty candidates rank last in their token and hold no real expert's capacity.
    key = torch.where(real, every_w.float(), torch.full_like(every_w, -1.0, dtype=torch.float32))
    order = admission_order(key, priority)
    admitted = (queue_places(every_idx, order, E, groups) < capacity) & real
    # A token keeps at most k survivors: its best ones by weight.
    best = torch.argsort(torch.where(admitted, key, torch.full_like(key, -2.0)), dim=1, descending=True)
    keep_rank = torch.empty_like(best).scatter_(
        1, best, torch.arange(k + m, device=best.device).expand(T, -1)
    )
    survives = admitted & (keep_rank < k)
    top_kept, cand_kept = survives[:, :k], survives[:, k:]  # (T, k), (T, m)
    # The c-th surviving local candidate (best first) fills the c-th lost top-k slot.
    lost = ~top_kept
    lost_rank = torch.where(lost, torch.cumsum(lost, 1) - 1, torch.full_like(lost, k, dtype=torch.long))
    cand_rank = torch.where(
        cand_kept, torch.cumsum(cand_kept, 1) - 1, torch.full_like(cand_kept, k, dtype=torch.long)
    )
    column_of_rank = torch.full((T, k + 1), -1, dtype=torch.long, device=best.device)
    column_of_rank.scatter_(1, cand_rank, torch.arange(m, device=best.device).expand(T, -1))
    column = column_of_rank.gather(1, lost_rank)  # (T, k) candidate column filling the slot, -1 none
    column[~lost] = -1
    rerouted = column >= 0
    safe = column.clamp(min=0)
    indices = torch.where(rerouted, cand_idx.gather(1, safe), routing.indices)
    weights = torch.where(rerouted, cand_w.gather(1, safe), routing.weights)
    served = top_kept | rerouted
    rest = ~served
    if stand_in:
        return plan_of(indices, weights, served, shadow_served=rest)
    return plan_of(indices, weights, served, dropped=rest)


def _understudy(
    routing,
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
    return plan_of(routing.indices, routing.weights, expert_served, understudy_tokens=overflowing)


def _readmitted(
    routing,
    candidates: torch.Tensor,
    order: torch.Tensor,
    capacity: int,
    groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """(T,) bool: candidate tokens whose every assignment fits the capacity the other tokens left.

    The greedy pass over candidates in priority order (a token's priority is its best assignment's
    place in `order`; a token that does not fit takes nothing, so later smaller demands may still
    fit), done in rounds of tensor ops: accept the longest prefix whose cumulative demand fits, then
    reject every remaining token that no longer fits on its own (free room only shrinks, so the
    sequential pass would reject it too); repeat. Each round rejects at least one token.
    """
    T, k = routing.indices.shape
    holders = capacity_holders(routing.num_experts, groups)
    owners = owners_of(routing.indices, groups)  # (T, k)
    free = capacity - torch.bincount(owners[~candidates].reshape(-1), minlength=holders)  # (H,)
    token_rank = priority_ranks(order, (T, k)).min(-1).values
    cand = candidates.nonzero().squeeze(1)
    cand = cand[torch.argsort(token_rank[cand])]
    # A token's k experts are distinct, but two of them may share a group: demand counts per holder.
    need = torch.zeros(cand.numel(), holders, dtype=torch.long, device=cand.device)
    need.scatter_add_(1, owners[cand], torch.ones_like(owners[cand]))  # (n, H)
    admitted = torch.zeros(T, dtype=torch.bool, device=candidates.device)
    pending = torch.arange(cand.numel(), device=cand.device)
    while pending.numel():
        # Cumulative demand only grows along the queue, so the tokens that fit form a prefix.
        first_miss = int((need[pending].cumsum(0) <= free).all(1).sum())
        taken = pending[:first_miss]
        admitted[cand[taken]] = True
        free = free - need[taken].sum(0)
        rest = pending[first_miss:]
        pending = rest[(need[rest] <= free).all(1)]
    return admitted


def layer_switches(holder_load: torch.Tensor, capacity: int, threshold: float | None) -> bool:
    """Whether policy `layer` hands the whole step to the understudy, given the load per holder."""
    if threshold is None:
        return int(holder_load.max()) > capacity
    return float(holder_load.max()) / max(float(holder_load.float().mean()), 1e-12) > threshold


def _layer(routing, capacity: int, threshold: float | None, holder_load: torch.Tensor) -> Plan:
    if not layer_switches(holder_load, capacity, threshold):
        return everything_to_experts(routing.indices, routing.weights)
    nothing = torch.zeros_like(routing.indices, dtype=torch.bool)
    return plan_of(
        routing.indices, routing.weights, nothing, understudy_tokens=torch.ones_like(nothing[:, 0])
    )


def _deadline(
    routing,
    places: torch.Tensor,
    capacity: int,
    time_per_assignment: float | torch.Tensor,
    latency: float,
    deadline: float | None,
) -> Plan:
    per_expert = torch.as_tensor(time_per_assignment, dtype=torch.float64, device=routing.indices.device)
    if deadline is None:
        if per_expert.numel() != 1:
            raise ValueError("With a per-expert time_per_assignment, pass an explicit deadline.")
        deadline = capacity * float(per_expert) + latency
    per_expert = per_expert.expand(routing.num_experts) if per_expert.numel() == 1 else per_expert
    finish = (places + 1).double() * per_expert[routing.indices] + latency  # (T, k)
    late = finish > deadline + 1e-9
    late_tokens = late.any(-1)
    expert_served = ~late_tokens[:, None].expand_as(late)
    return plan_of(
        routing.indices,
        routing.weights,
        expert_served,
        understudy_tokens=late_tokens,
        dispatched=torch.ones_like(late),
        upfront=True,
    )
