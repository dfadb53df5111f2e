"""The one ledger of what an MoE step costs: bytes on the wire, work per device, memory per device.

Expert parallelism over R devices: the flat batch of T tokens is split into R contiguous chunks,
chunk r living on device r (`Topology.token_device`); expert e lives on `expert_device[e]`, or on
the replicas a `Placement` gives it (an expert's sent assignments split over them by share). What
is charged, per layer and step:

- all-to-all bytes: an assignment sent to an expert on another device moves its hidden vector there
  (dispatch) and the expert's output back (combine), H x dtype bytes each way, for every sent
  assignment (`Plan.sent()`, which for `deadline` includes late work: its result still comes back,
  it is only ignored). Stand-in-served, dropped and device-local assignments move nothing.
- exchange bytes: the routing information ranks all-gather to build the plan (runtime/exchange.py).
  total bytes = all-to-all + exchange.
- work: FLOPs per device of every expert row it computes (rows x one expert's FLOPs) plus every
  stand-in FLOP spent on the tokens it holds (token-level understudy rows; assignment-level stand-in
  work as the stand-in reports it, `token_flops`). Rank work imbalance is (max - mean) / mean.
- memory per device per MoE layer beyond its own experts, in routed-expert units
  (`memory_expert_equiv`): the stand-in (replicated on every device) plus replica slots beyond E / R.

The single-process runtime computes these for a simulated topology; the expert-parallel backend
records what its collectives actually moved, and tests hold the two equal.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from moe_understudy.moe.standins import TOKEN, level_of
from moe_understudy.runtime.plan import Plan


@dataclass(frozen=True)
class Topology:
    """Where tokens and experts live: `num_devices` devices, expert e on `expert_device[e]` (E,).

    `placement` / `position`: a (possibly replicated) Placement and this layer's row in it; when
    set, sent assignments go to the replica `assign_replicas` picks instead of `expert_device`.
    """

    num_devices: int
    expert_device: torch.Tensor
    placement: object | None = None
    position: int = 0

    @staticmethod
    def contiguous(num_experts: int, num_devices: int) -> Topology:
        """Expert e on device e * R // E (E >= R); for E < R, expert e on device e."""
        e = torch.arange(num_experts)
        devices = e * num_devices // num_experts if num_experts >= num_devices else e
        return Topology(num_devices, devices)

    @property
    def replicated(self) -> bool:
        return self.placement is not None and int(self.placement.replica_count()[self.position].max()) > 1

    @staticmethod
    def of_placement(placement, position: int) -> Topology:
        """Layer `position` of a (possibly replicated) Placement over its ranks."""
        return Topology(placement.num_ranks, placement.expert_rank()[position], placement, position)

    def token_device(self, num_tokens: int) -> torch.Tensor:
        """(T,) home device of each token: R contiguous chunks of the flat batch."""
        return torch.arange(num_tokens) * self.num_devices // max(num_tokens, 1)

    def destinations(self, plan: Plan) -> torch.Tensor:
        """(T, k) device computing each sent assignment (-1 where not sent)."""
        sent = plan.sent().cpu()
        indices = plan.indices.cpu()
        if plan.slots is not None:
            dest = plan.slots.cpu() // self.placement.slots_per_rank
        elif self.replicated:
            from moe_understudy.runtime.replication import assign_replicas

            slot = assign_replicas(indices, self.placement, self.position, sent)
            dest = slot // self.placement.slots_per_rank
        else:
            dest = self.expert_device[indices.clamp(max=len(self.expert_device) - 1)]
        return torch.where(sent, dest, torch.full_like(dest, -1))


@dataclass(frozen=True)
class Traffic:
    """What one dispatch + combine moves and computes, per device.

    rank_rows:  (R,) expert rows computed on each device (sent assignments)
    send_bytes: (R,) dispatch bytes each device sends to other devices
    recv_bytes: (R,) dispatch bytes each device receives from other devices
    combine_bytes: total bytes of results sent back (every computed row returns)
    """

    rank_rows: torch.Tensor
    send_bytes: torch.Tensor
    recv_bytes: torch.Tensor
    combine_bytes: int

    @property
    def dispatch_bytes(self) -> int:
        return int(self.send_bytes.sum())

    def load_imbalance(self) -> float:
        """max / mean rows per device (1.0 is perfect; nan for an empty step)."""
        mean = self.rank_rows.float().mean()
        return float(self.rank_rows.max() / mean) if mean > 0 else float("nan")


def traffic(home: torch.Tensor, dest: torch.Tensor, num_devices: int, row_bytes: int) -> Traffic:
    """home (T,) device of each token; dest (T, k) device computing each assignment, -1 unsent.
    One row of `row_bytes` per off-device assignment each way."""
    sent = dest >= 0
    src = home[:, None].expand_as(dest)
    remote = sent & (src != dest)
    rows = torch.bincount(dest[sent], minlength=num_devices)
    send = torch.bincount(src[remote], minlength=num_devices) * row_bytes
    recv = torch.bincount(dest[remote], minlength=num_devices) * row_bytes
    return Traffic(rows, send, recv, int(remote.sum()) * row_bytes)


def stand_in_token_flops(plan: Plan, stand_in: torch.nn.Module | None) -> torch.Tensor:
    """(T,) stand-in FLOPs spent on each token under `plan` (zeros without a stand-in)."""
    if stand_in is None:
        return torch.zeros(plan.num_tokens, dtype=torch.float64)
    if level_of(stand_in) == TOKEN:
        return stand_in.token_flops(plan.understudy_work_tokens().cpu())
    return stand_in.token_flops(plan.shadow_served.cpu(), plan.indices.cpu())


def rank_work(
    plan: Plan,
    home: torch.Tensor,
    dest: torch.Tensor,
    num_devices: int,
    expert_flops: int,
    stand_in: torch.nn.Module | None,
) -> torch.Tensor:
    """(R,) FLOPs each device spends: its expert rows plus the stand-in work on its own tokens."""
    rows = torch.bincount(dest[dest >= 0], minlength=num_devices).double() * expert_flops
    stand = torch.zeros(num_devices, dtype=torch.float64).index_add_(
        0, home, stand_in_token_flops(plan, stand_in)
    )
    return rows + stand


def imbalance(work: torch.Tensor) -> float:
    """(max - mean) / mean of per-device work; 0 for an idle step."""
    mean = float(work.double().mean())
    return (float(work.max()) - mean) / mean if mean > 0 else 0.0


def memory_expert_equiv(
    stand_in: torch.nn.Module | None, expert_params: int, extra_slots_per_device: float = 0.0
) -> float:
    """Per device per MoE layer beyond its own experts, in routed experts: stand-in + extra replica slots."""
    held = 0.0 if stand_in is None else stand_in.memory_expert_equiv(expert_params)
    return held + extra_slots_per_device


@dataclass(frozen=True)
class StepLedger:
    """One layer's load, what the plan did with it, and what it cost, for one forward step."""

    layer: int
    tokens: int
    assignments: int
    capacity: int | None  # None under `full` (no limit)
    tokens_per_expert: list[int]  # routed load before any policy
    served_per_expert: list[int]  # assignments the experts actually computed
    max_load: int
    mean_load: float
    expert: int  # assignments computed by their expert
    shadow: int  # by the assignment-level stand-in
    understudy: int  # covered by a token-level understudy token (k per token)
    dropped: int
    degraded_tokens: int  # tokens with any assignment not computed by its expert
    dispatch_bytes: int
    combine_bytes: int
    exchange_bytes: int  # routing exchange, all devices
    rank_rows: list[int]  # expert rows per device
    rank_flops: list[float]  # all work per device: expert rows + stand-in FLOPs
    stand_in_flops: float  # stand-in FLOPs of the step (all devices)
    expert_flops: float  # expert-row FLOPs of the step (all devices)
    memory_expert_equiv: float  # per device, this layer

    @property
    def max_over_mean(self) -> float:
        return self.max_load / self.mean_load if self.mean_load > 0 else 0.0

    @property
    def total_bytes(self) -> int:
        return self.dispatch_bytes + self.combine_bytes + self.exchange_bytes


@dataclass
class LoadRecorder:
    """Accumulates a `StepLedger` per layer and step; hand one to `patch` (or `PatchedModel.configure`)."""

    steps: list[StepLedger] = field(default_factory=list)

    def record(self, step) -> None:
        """`step`: a runtime.core.Step (what one block execution saw and did)."""
        self.steps.append(step.ledger())

    def summary(self) -> dict[str, float]:
        """Totals and fractions over every recorded step and layer."""
        if not self.steps:
            return {}
        n = len(self.steps)
        total = lambda name: sum(getattr(s, name) for s in self.steps)  # noqa: E731
        # an all-empty record (every step had no tokens) reports zeros rather than dividing by zero
        assignments, tokens = max(total("assignments"), 1), max(total("tokens"), 1)
        a2a = total("dispatch_bytes") + total("combine_bytes")
        exchange = total("exchange_bytes")
        return {
            "steps": n,
            "layer_tokens": tokens,
            "frac_expert": total("expert") / assignments,
            "frac_shadow": total("shadow") / assignments,
            "frac_understudy": total("understudy") / assignments,
            "frac_dropped": total("dropped") / assignments,
            "frac_tokens_degraded": total("degraded_tokens") / tokens,
            "mean_max_over_mean": sum(s.max_over_mean for s in self.steps) / n,
            "dispatch_bytes": total("dispatch_bytes"),
            "combine_bytes": total("combine_bytes"),
            "bytes_moved": a2a,
            "bytes_per_token": a2a / tokens,
            "exchange_bytes": exchange,
            "total_bytes": a2a + exchange,
            "total_bytes_per_token": (a2a + exchange) / tokens,
            # Straggler proxy: the busiest expert's computed assignments, relative to a balanced step.
            "mean_max_served_over_mean": sum(
                max(s.served_per_expert) / s.mean_load if s.mean_load > 0 else 0.0 for s in self.steps
            )
            / n,
            "rank_work_imbalance": sum(imbalance(torch.tensor(s.rank_flops)) for s in self.steps) / n,
            "stand_in_flops_fraction": total("stand_in_flops")
            / max(total("stand_in_flops") + total("expert_flops"), 1e-30),
            # stand-in FLOPs per assignment it served (a token-level understudy token covers k)
            "stand_in_flops_per_served": total("stand_in_flops")
            / max(total("shadow") + total("understudy"), 1),
            "memory_expert_equiv": max(s.memory_expert_equiv for s in self.steps),
        }

    def to_dicts(self) -> list[dict]:
        return [asdict(s) for s in self.steps]
