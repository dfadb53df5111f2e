"""The systems compared at equal memory per device, each a runtime policy on a placement.

Every plan is the runtime's: `policies.plan_routing` decides, `replication.assign_replicas` routes
an assignment to a replica, `placement.replicate_hot_experts` / `rebalance_from_window` is EPLB,
`ledger.Topology` says where rows go. Capacity is per rank, ``ceil(cf * T * k / R)`` over the step's
global batch (`admission.expert_capacity` with R holders), as `runtime.layer.LoadAwareMoE` plans
with ``capacity_scope="rank"``: without replicas the holder of an assignment is its expert's rank
(groups (E,)); with replicas it is the rank of the replica the assignment was routed to (owners
(T, k)), and the plan keeps those slots (`Plan.slots`) so dispatch sends it there.

  full                no limit, experts contiguous (E / R per rank)
  drop                score-priority drop over capacity per rank (Capacity-Aware Inference's token drop)
  expanded_drop       Capacity-Aware Inference's expanded drop: + the best expert on the token's own rank
  eplb_fresh          `full` on EPLB planned on the very step it serves (an oracle), `budget` extra slots
  eplb_stale          `full` on EPLB planned on a past window, refreshed every N steps, `budget` extra slots
  eplb_stale_standin  the same stale EPLB with the slots the stand-in leaves (budget - its memory,
                      rounded down); capacity per rank, the overflow served locally by the stand-in
  standin             contiguous experts, capacity per rank, overflow to the stand-in

memory_expert_equiv per device per layer: the stand-in's plus the extra slots (`ledger.memory_expert_equiv`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from moe_understudy.runtime import exchange as xchg
from moe_understudy.runtime.admission import admission_order, expert_capacity, queue_places
from moe_understudy.runtime.ledger import Topology, memory_expert_equiv
from moe_understudy.runtime.placement import (
    Placement,
    contiguous_placement,
    rebalance_from_window,
    replicate_hot_experts,
)
from moe_understudy.runtime.plan import Plan
from moe_understudy.runtime.policies import EXPANDED, plan_routing
from moe_understudy.runtime.replication import assign_replicas

CONTIGUOUS, FRESH, STALE = "contiguous", "fresh", "stale"


@dataclass(frozen=True)
class System:
    name: str
    policy: str  # runtime policy
    placement: str  # contiguous | fresh | stale
    extra_slots: int  # replica slots per rank beyond ceil(E / R)
    stand_in: bool  # holds the stand-in (its memory and FLOPs are charged)
    capacity_factor: float | None = None  # None: the study's; "name@cf" sets one per system

    @property
    def capacity_scope(self) -> str:
        return "expert" if self.policy == "full" else "rank"

    def memory(self, stand_in_memory: float) -> float:
        """memory_expert_equiv per device per layer, through the ledger's own sum."""
        held = stand_in_memory if self.stand_in else 0.0
        return memory_expert_equiv(None, 1, held + self.extra_slots)


def build_systems(names: tuple[str, ...], budget: int, stand_in_memory: float) -> list[System]:
    """The systems `names` at a memory budget of `budget` routed experts per device per layer.

    A name may carry its own capacity factor, ``expanded_drop@1.5``.
    """
    base_names = [n.split("@")[0] for n in names]
    if stand_in_memory > budget + 1e-9 and any(n in ("eplb_stale_standin", "standin") for n in base_names):
        raise ValueError(
            f"The stand-in holds {stand_in_memory:.2f} routed experts per device, more than the memory budget "
            f"of {budget}; raise the budget (memory_budget) so that the comparison stays at equal memory."
        )
    left = math.floor(budget - stand_in_memory + 1e-9)
    table = {
        "full": System("full", "full", CONTIGUOUS, 0, False),
        "drop": System("drop", "drop", CONTIGUOUS, 0, False),
        "expanded_drop": System("expanded_drop", "expanded_drop", CONTIGUOUS, 0, False),
        "eplb_fresh": System("eplb_fresh", "full", FRESH, budget, False),
        "eplb_stale": System("eplb_stale", "full", STALE, budget, False),
        "eplb_stale_standin": System("eplb_stale_standin", "shadow", STALE, max(left, 0), True),
        "standin": System("standin", "shadow", CONTIGUOUS, 0, True),
    }
    out = []
    for name in names:
        base, _, cf = name.partition("@")
        if base not in table:
            raise ValueError(f"Unknown system {base!r}; choose from {', '.join(table)}.")
        system = table[base]
        if cf:
            if system.policy == "full":
                raise ValueError(f"{base} has no capacity, so {name!r} sets nothing; drop the @{cf}.")
            system = dataclasses.replace(system, name=name, capacity_factor=float(cf))
        out.append(system)
    return out


def base_slots(num_experts: int, num_ranks: int) -> int:
    return -(-num_experts // num_ranks)


class EPLBSchedule:
    """Stale EPLB as serving engines run it: planned on the mean load of the last `window` steps,
    first at step 0 (from the warm-up), then again every `refresh_every` steps.

    Every step: `tick(step)` (re-plans when due), then `observe` its routed load [L, E] (warm-up
    steps only observe). `placement(slots)` is the plan in force for `slots` slots per rank
    (systems with different budgets share the history; each slot count gets its own plan).
    """

    def __init__(self, num_ranks: int, window: int, refresh_every: int, slot_counts: tuple[int, ...] = ()):
        self.num_ranks, self.window, self.refresh_every = num_ranks, window, refresh_every
        self.slot_counts = tuple(sorted(set(slot_counts)))
        self.history: list[torch.Tensor] = []
        self.plans: dict[int, Placement] = {}
        self.refreshes: list[int] = []

    def observe(self, load: torch.Tensor) -> None:
        self.history.append(load)
        if len(self.history) > self.window:
            self.history.pop(0)

    def due(self, step: int) -> bool:
        return step >= 0 and step % self.refresh_every == 0

    def last_due(self, step: int) -> int:
        """The step whose plan is in force at `step`."""
        return step - step % self.refresh_every

    def tick(self, step: int) -> None:
        """Re-plan every slot count from the window when `step` is a refresh step."""
        if not self.due(step) or (self.refreshes and self.refreshes[-1] == step):
            return
        window = torch.stack(self.history)
        self.plans = {
            slots: rebalance_from_window(window, self.num_ranks, slots) for slots in self.slot_counts
        }
        self.refreshes.append(step)

    def placement(self, slots: int) -> Placement:
        if slots not in self.plans:
            raise ValueError(f"No stale plan for {slots} slots per rank; pass it in slot_counts.")
        return self.plans[slots]


@dataclass(frozen=True)
class SimRouting:
    """The compact routing `plan_routing` takes: indices / weights (T, k) over `num_experts` (logits only
    where a policy reads them)."""

    indices: torch.Tensor
    weights: torch.Tensor
    num_experts: int
    logits: torch.Tensor | None = None

    @property
    def top_k(self) -> int:
        return self.indices.shape[1]

    def probs(self) -> torch.Tensor:
        """(T, E) router probabilities (softmax families; expanded policies read them)."""
        return torch.softmax(self.logits.float(), dim=-1)


def placement_for(
    system: System,
    num_layers: int,
    num_experts: int,
    num_ranks: int,
    step: int,
    window_load: torch.Tensor,
    schedule: EPLBSchedule | None,
) -> Placement:
    """The placement `system` serves `step` with.

    window_load [L, E]: the mean routed load of the fresh window `step` belongs to (the steps this
    plan serves: EPLB fresh is planned on the load it serves, so only each step's fluctuation around
    that mean is left to it). Stale plans come from `schedule` (planned on a past window).
    """
    slots = base_slots(num_experts, num_ranks) + system.extra_slots
    if system.placement == FRESH:
        return replicate_hot_experts(window_load, num_ranks, slots)
    if system.placement == STALE:
        return schedule.placement(slots)
    return contiguous_placement(num_layers, num_experts, num_ranks)


def topologies(placement: Placement) -> list[Topology]:
    """`ledger.Topology` of every layer of `placement` (built once per placement: expert_rank loops)."""
    ranks = placement.expert_rank()
    replicated = (placement.replica_count() > 1).any(1).tolist()
    return [
        Topology(placement.num_ranks, ranks[layer], placement if replicated[layer] else None, layer)
        for layer in range(placement.num_layers)
    ]


def plan_layer(
    system: System,
    routing: SimRouting,
    topo: Topology,
    capacity_factor: float,
    priority: str,
    candidates: tuple[torch.Tensor, torch.Tensor] | None = None,
    order: torch.Tensor | None = None,
    shared: dict | None = None,
) -> Plan:
    """`system`'s plan of one layer step over `topo` (`runtime.layer.LoadAwareMoE.plan`, capacity per rank).

    order: the step's admission order (`admission.admission_order`), the same for every system;
    shared: a dict kept for one layer step, so systems over the same topology share their queue
    places (plan_routing's `places`) and replica slots instead of recomputing them.
    """
    shared = {} if shared is None else shared
    slots = None
    if topo.replicated:  # every routed assignment goes to one replica; the plan keeps the slot
        key = ("slots", id(topo))
        if key not in shared:
            shared[key] = assign_replicas(routing.indices, topo.placement, topo.position)
        slots = shared[key]
    if system.policy == "full":
        plan = plan_routing(routing, "full", 0)
        return plan if slots is None else dataclasses.replace(plan, slots=slots)
    R, T = topo.num_devices, routing.indices.shape[0]
    capacity = expert_capacity(T, routing.top_k, R, capacity_factor)
    groups = topo.expert_device if slots is None else slots // topo.placement.slots_per_rank
    places = None
    if system.policy not in EXPANDED:
        key = ("places", id(topo))
        if key not in shared:
            if order is None:
                order = shared.setdefault("order", admission_order(routing.weights, priority))
            shared[key] = queue_places(routing.indices, order, routing.num_experts, groups)
        places = shared[key]
    plan = plan_routing(
        routing,
        system.policy,
        capacity,
        priority,
        groups=groups,
        candidates=candidates if system.policy in EXPANDED else None,
        places=places,
    )
    return plan if slots is None else dataclasses.replace(plan, slots=slots)


def exchange_of(system: System, priority: str) -> str:
    """The routing exchange `system`'s plans need under expert parallelism (`exchange.exchange_mode`)."""
    return xchg.exchange_mode(system.policy, priority, system.capacity_scope)
