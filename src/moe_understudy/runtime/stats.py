"""Per-step load statistics of the load-aware runtime, recorded into an explicit `LoadRecorder`.

All-to-all accounting (expert parallelism over R devices): the flat batch of T tokens is split into
R contiguous chunks, chunk r living on device r; expert e lives on `placement[e]` (contiguous by
default: e * R // E). An assignment sent to an expert on another device moves its hidden vector
there (dispatch) and the expert's output back (combine), H x dtype bytes each way. Assignments
served by an understudy or a shadow, or dropped, move nothing; assignments whose expert is on the
token's own device move nothing either.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from moe_understudy.moe.adapters import Routing
from moe_understudy.runtime.policies import Plan


def contiguous_placement(num_experts: int, num_devices: int) -> torch.Tensor:
    """(E,) device of each expert: expert e on device e * R // E."""
    return torch.arange(num_experts) * num_devices // num_experts


def token_devices(num_tokens: int, num_devices: int) -> torch.Tensor:
    """(T,) home device of each token: R contiguous chunks of the flat batch."""
    return torch.arange(num_tokens) * num_devices // num_tokens


def all_to_all_bytes(
    plan: Plan,
    num_experts: int,
    hidden_size: int,
    dtype_bytes: int,
    num_devices: int,
    placement: torch.Tensor | None = None,
) -> tuple[int, int]:
    """(dispatch, combine) bytes that cross devices for `plan`.

    Dispatch counts every sent assignment (`Plan.sent()`, which for `deadline` includes late work);
    combine counts only results used (expert-served).
    """
    if num_devices <= 1:
        return 0, 0
    where = contiguous_placement(num_experts, num_devices) if placement is None else placement.cpu()
    indices = plan.indices.cpu()
    home = token_devices(plan.num_tokens, num_devices)[:, None]  # (T, 1)
    remote = where[indices] != home  # (T, k)
    per_assignment = hidden_size * dtype_bytes
    dispatch = int((remote & plan.sent().cpu()).sum()) * per_assignment
    combine = int((remote & plan.expert_served.cpu()).sum()) * per_assignment
    return dispatch, combine


@dataclass(frozen=True)
class StepStats:
    """One layer's load and what the plan did with it, for one forward step."""

    layer: int
    tokens: int
    assignments: int
    capacity: int | None  # None under `full` (no limit)
    tokens_per_expert: list[int]  # routed load before any policy
    served_per_expert: list[int]  # assignments the experts actually computed
    max_load: int
    mean_load: float
    expert: int  # assignments computed by their expert
    shadow: int
    understudy: int  # assignments covered by an understudy token (k per token)
    dropped: int
    degraded_tokens: int  # tokens with any assignment not computed by its expert
    dispatch_bytes: int
    combine_bytes: int

    @property
    def max_over_mean(self) -> float:
        return self.max_load / self.mean_load if self.mean_load > 0 else 0.0


def step_stats(
    layer: int,
    routing: Routing,
    plan: Plan,
    capacity: int | None,
    hidden_size: int,
    dtype_bytes: int,
    num_devices: int,
    placement: torch.Tensor | None = None,
) -> StepStats:
    E = routing.num_experts
    load = routing.tokens_per_expert()
    counts = plan.counts()
    dispatch, combine = all_to_all_bytes(plan, E, hidden_size, dtype_bytes, num_devices, placement)
    return StepStats(
        layer=layer,
        tokens=counts["tokens"],
        assignments=counts["assignments"],
        capacity=capacity,
        tokens_per_expert=load.tolist(),
        served_per_expert=plan.served_per_expert(E).tolist(),
        max_load=int(load.max()),
        mean_load=float(load.float().mean()),
        expert=counts["expert"],
        shadow=counts["shadow"],
        understudy=counts["understudy"],
        dropped=counts["dropped"],
        degraded_tokens=counts["degraded_tokens"],
        dispatch_bytes=dispatch,
        combine_bytes=combine,
    )


@dataclass
class LoadRecorder:
    """Accumulates `StepStats` explicitly; hand one to `patch` (or `PatchedModel.configure`).

    num_devices: devices the experts are spread over for byte counting; placement: optional
    per-layer (E,) device of each expert, keyed by layer index (contiguous when absent).
    """

    num_devices: int = 4
    placement: dict[int, torch.Tensor] = field(default_factory=dict)
    steps: list[StepStats] = field(default_factory=list)

    def record(
        self,
        layer: int,
        routing: Routing,
        plan: Plan,
        capacity: int | None,
        hidden_size: int,
        dtype_bytes: int,
    ):
        self.steps.append(
            step_stats(
                layer,
                routing,
                plan,
                capacity,
                hidden_size,
                dtype_bytes,
                self.num_devices,
                self.placement.get(layer),
            )
        )

    def summary(self) -> dict[str, float]:
        """Totals and fractions over every recorded step and layer."""
        if not self.steps:
            return {}
        total = lambda name: sum(getattr(s, name) for s in self.steps)  # noqa: E731
        assignments = total("assignments")
        tokens = total("tokens")
        bytes_moved = total("dispatch_bytes") + total("combine_bytes")
        return {
            "steps": len(self.steps),
            "layer_tokens": tokens,
            "frac_expert": total("expert") / assignments,
            "frac_shadow": total("shadow") / assignments,
            "frac_understudy": total("understudy") / assignments,
            "frac_dropped": total("dropped") / assignments,
            "frac_tokens_degraded": total("degraded_tokens") / tokens,
            "mean_max_over_mean": sum(s.max_over_mean for s in self.steps) / len(self.steps),
            "dispatch_bytes": total("dispatch_bytes"),
            "combine_bytes": total("combine_bytes"),
            "bytes_moved": bytes_moved,
            "bytes_per_token": bytes_moved / tokens,
            # Straggler proxy: the busiest expert's computed assignments, relative to a balanced step.
            "mean_max_served_over_mean": sum(
                max(s.served_per_expert) / s.mean_load if s.mean_load > 0 else 0.0 for s in self.steps
            )
            / len(self.steps),
        }

    def to_dicts(self) -> list[dict]:
        return [asdict(s) for s in self.steps]
