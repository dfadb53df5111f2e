"""`Plan`: the fate of every assignment of one MoE step, as the policies decide it and the core executes it."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass(frozen=True)
class RoutedAssignments:
    """A routing as the planner reads it, without router logits: the top-k of T tokens over E experts.

    What expert parallelism's row exchange rebuilds, and what captured rows give.
    """

    indices: torch.Tensor  # (T, k)
    weights: torch.Tensor  # (T, k)
    num_experts: int

    @property
    def top_k(self) -> int:
        return self.indices.shape[1]


@dataclass(frozen=True)
class Plan:
    """What the runtime does with each of T tokens' k assignments.

    indices:           (T, k) long, final expert per assignment (after any reroute)
    weights:           (T, k) final combine weights
    expert_served:     (T, k) bool, computed by `indices` expert
    shadow_served:     (T, k) bool, computed locally by the layer's assignment-level stand-in for
                       expert `indices` (per-expert shadows, or a shared expert-conditioned network)
    dropped:           (T, k) bool, contributes nothing
    understudy_tokens: (T,) bool, the token's whole routed output comes from the token-level understudy
    dispatched:        (T, k) bool or None, sent to an expert (None: exactly the expert-served ones)
    upfront:           every token's understudy output is computed before dispatch (deadline), so
                       the understudy's work covers all T tokens, not only `understudy_tokens`
    slots:             (T, k) long or None, the physical replica slot each assignment was routed to,
                       when the plan fixed it (capacity per rank over replicated experts); None lets
                       the dispatch split an expert's sent assignments over its replicas by share

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
    upfront: bool = False
    slots: torch.Tensor | None = None

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

    def understudy_work_tokens(self) -> torch.Tensor:
        """(T,) bool: tokens the token-level understudy runs on (all of them when computed up front)."""
        return torch.ones_like(self.understudy_tokens) if self.upfront else self.understudy_tokens

    def masked_indices(self, served: torch.Tensor, num_experts: int) -> torch.Tensor:
        """(T, k) `indices` with every assignment outside `served` set to `num_experts` (skipped)."""
        return torch.where(served, self.indices, torch.full_like(self.indices, num_experts))

    def served_per_expert(self, num_experts: int) -> torch.Tensor:
        """(E,) assignments each expert computes."""
        return torch.bincount(self.indices[self.expert_served], minlength=num_experts)

    def rows(self, rows: slice) -> Plan:
        """The plan of tokens `rows` only (a rank's slice of a global plan)."""
        cut = {}
        for f in fields(self):
            value = getattr(self, f.name)
            cut[f.name] = value[rows] if isinstance(value, torch.Tensor) else value
        return Plan(**cut)

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


def plan_of(
    indices: torch.Tensor,
    weights: torch.Tensor,
    expert_served: torch.Tensor,
    *,
    shadow_served: torch.Tensor | None = None,
    dropped: torch.Tensor | None = None,
    understudy_tokens: torch.Tensor | None = None,
    dispatched: torch.Tensor | None = None,
    upfront: bool = False,
) -> Plan:
    """A Plan with the fates not given set to nobody."""
    none = torch.zeros_like(expert_served)
    return Plan(
        indices=indices,
        weights=weights,
        expert_served=expert_served,
        shadow_served=none if shadow_served is None else shadow_served,
        dropped=none if dropped is None else dropped,
        understudy_tokens=none[:, 0] if understudy_tokens is None else understudy_tokens,
        dispatched=dispatched,
        upfront=upfront,
    )


def everything_to_experts(indices: torch.Tensor, weights: torch.Tensor) -> Plan:
    """Every assignment to its expert: the `full` plan (and the plan of any routing mode)."""
    return plan_of(indices, weights, torch.ones_like(indices, dtype=torch.bool))
