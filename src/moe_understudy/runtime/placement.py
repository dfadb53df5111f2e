"""Where experts live under expert parallelism: pure CPU tensor functions, EPLB style.

A placement gives every rank `slots_per_rank` physical expert slots. Physical slots are numbered
rank-major (slot p lives on rank ``p // slots_per_rank``); each holds one logical expert, or -1
when the slot is empty (E not a multiple of R). A logical expert held by several slots is
*replicated*; its assignments are split across the replicas by `replica_share`.

One public entry point, `plan_placement`, chooses between:
  - contiguous: expert e on rank ``e * R // E`` (the default under `torchrun`),
  - a JSON file (`{"expert_to_rank": [...]}` per layer or shared, see `load_placement`),
  - hot-expert replication from measured load (`replicate_hot_experts`).
`dispatch_traffic` turns a per-assignment destination into rank loads and bytes on the wire.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from moe_understudy.errors import UserError


@dataclass(frozen=True)
class Placement:
    """Experts over ranks for every MoE layer.

    phys_to_logical: [layers, num_ranks * slots_per_rank] long, logical expert per slot, -1 empty
    replica_share:   [layers, num_ranks * slots_per_rank] float, fraction of the expert's
                     assignments each slot serves (sums to 1 per logical expert; 0 for empty slots)
    """

    phys_to_logical: torch.Tensor
    replica_share: torch.Tensor
    num_ranks: int
    slots_per_rank: int
    num_experts: int

    def __post_init__(self) -> None:
        L, P = self.phys_to_logical.shape
        if P != self.num_ranks * self.slots_per_rank:
            raise ValueError(
                f"phys_to_logical has {P} slots, expected {self.num_ranks} x {self.slots_per_rank}."
            )
        if self.phys_to_logical.max() >= self.num_experts or self.phys_to_logical.min() < -1:
            raise ValueError(f"phys_to_logical holds ids outside -1..{self.num_experts - 1}.")
        for layer in range(L):
            held = set(self.phys_to_logical[layer].tolist())
            missing = sorted(set(range(self.num_experts)) - held)
            if missing:
                raise ValueError(f"placement leaves expert {missing[0]} of layer {layer} on no rank.")

    @property
    def num_layers(self) -> int:
        return self.phys_to_logical.shape[0]

    @property
    def num_slots(self) -> int:
        return self.phys_to_logical.shape[1]

    def slot_rank(self) -> torch.Tensor:
        """(P,) rank that holds each physical slot."""
        return torch.arange(self.num_slots) // self.slots_per_rank

    def replica_count(self) -> torch.Tensor:
        """[layers, E] number of slots holding each logical expert."""
        out = torch.zeros(self.num_layers, self.num_experts, dtype=torch.long)
        valid = self.phys_to_logical >= 0
        out.scatter_add_(1, self.phys_to_logical.clamp(min=0), valid.long())
        return out

    def expert_rank(self) -> torch.Tensor:
        """[layers, E] rank of each expert's first replica (its only one without replication)."""
        out = torch.full((self.num_layers, self.num_experts), -1, dtype=torch.long)
        ranks = self.slot_rank()
        for p in reversed(range(self.num_slots)):  # reversed: the lowest slot wins
            e = self.phys_to_logical[:, p]
            ok = e >= 0
            out[ok.nonzero().squeeze(1), e[ok]] = ranks[p]
        return out

    def local_experts(self, layer: int, rank: int) -> list[int]:
        """Logical experts held by `rank` at `layer` (sorted, unique)."""
        s = self.phys_to_logical[layer, rank * self.slots_per_rank : (rank + 1) * self.slots_per_rank]
        return sorted({int(e) for e in s.tolist() if e >= 0})

    def slots_of(self, layer: int, expert: int) -> torch.Tensor:
        """(c,) physical slots holding `expert` at `layer`, ascending."""
        return (self.phys_to_logical[layer] == expert).nonzero().squeeze(1)

    def to_json(self) -> dict:
        return {
            "num_ranks": self.num_ranks,
            "slots_per_rank": self.slots_per_rank,
            "num_experts": self.num_experts,
            "phys_to_logical": self.phys_to_logical.tolist(),
            "replica_share": self.replica_share.tolist(),
        }


# ---- the one entry point ------------------------------------------------------------------------


def plan_placement(
    num_layers: int,
    num_experts: int,
    num_ranks: int,
    *,
    load: torch.Tensor | None = None,
    slots_per_rank: int | None = None,
    path: str | Path | None = None,
) -> Placement:
    """Placement of `num_experts` experts per layer over `num_ranks` ranks.

    load: [layers, E] measured assignments per expert (e.g. summed over captured batches); with it,
          hot experts are replicated into `slots_per_rank` slots per rank (the memory budget).
    path: a JSON placement file (see `load_placement`); exclusive with `load`.
    Neither: contiguous placement.
    """
    if num_ranks < 1:
        raise UserError(f"num_ranks must be at least 1, got {num_ranks}.")
    if path is not None and load is not None:
        raise UserError("Give either a placement file or a measured load to replicate from, not both.")
    if path is not None:
        return load_placement(path, num_layers, num_experts, num_ranks)
    if load is not None:
        if load.shape != (num_layers, num_experts):
            raise UserError(
                f"load must be [layers, experts] = [{num_layers}, {num_experts}], got {list(load.shape)}."
            )
        base = math.ceil(num_experts / num_ranks)
        return replicate_hot_experts(load, num_ranks, slots_per_rank or base)
    return contiguous_placement(num_layers, num_experts, num_ranks)


# ---- contiguous and from a file -----------------------------------------------------------------


def _placement_from_ranks(expert_to_rank: torch.Tensor, num_ranks: int) -> Placement:
    """expert_to_rank: [layers, E] rank of each expert (one replica each) -> Placement."""
    L, E = expert_to_rank.shape
    per_rank = torch.stack([torch.bincount(row, minlength=num_ranks) for row in expert_to_rank])
    slots = int(per_rank.max())
    phys = torch.full((L, num_ranks * slots), -1, dtype=torch.long)
    for layer in range(L):
        fill = [0] * num_ranks
        for e in range(E):
            r = int(expert_to_rank[layer, e])
            phys[layer, r * slots + fill[r]] = e
            fill[r] += 1
    share = (phys >= 0).float()
    return Placement(phys, share, num_ranks, slots, E)


def contiguous_placement(num_layers: int, num_experts: int, num_ranks: int) -> Placement:
    """Expert e on rank ``e * R // E`` for E >= R; for E < R, expert e on rank e (other ranks idle)."""
    e = torch.arange(num_experts)
    ranks = e * num_ranks // num_experts if num_experts >= num_ranks else e
    return _placement_from_ranks(ranks.expand(num_layers, -1).clone(), num_ranks)


def load_placement(path: str | Path, num_layers: int, num_experts: int, num_ranks: int) -> Placement:
    """Read a JSON placement.

    Accepted forms: ``{"expert_to_rank": [r_0, ..., r_{E-1}]}`` (same for every layer),
    ``{"expert_to_rank": [[...], ...]}`` (one list per layer), or the full form written by
    `Placement.to_json` (``phys_to_logical``, ``replica_share``, ``slots_per_rank``).
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f"Placement file {p} does not exist; pass a JSON file with an `expert_to_rank` list.")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"Placement file {p} is not valid JSON ({err.msg}); fix the file.") from err
    if "phys_to_logical" in data:
        phys = torch.tensor(data["phys_to_logical"], dtype=torch.long)
        share = torch.tensor(data["replica_share"], dtype=torch.float32)
        slots = int(data["slots_per_rank"])
        if phys.shape != (num_layers, num_ranks * slots):
            raise UserError(
                f"Placement file {p} is for {phys.shape[0]} layers x {phys.shape[1]} slots, but the model has "
                f"{num_layers} MoE layers over {num_ranks} ranks x {slots} slots; write it for this model."
            )
        try:
            return Placement(phys, share, num_ranks, slots, num_experts)
        except ValueError as err:
            raise UserError(f"Placement file {p}: {err}") from err
    if "expert_to_rank" not in data:
        raise UserError(
            f"Placement file {p} has no `expert_to_rank` key; add one (a list of ranks per expert)."
        )
    ranks = torch.tensor(data["expert_to_rank"], dtype=torch.long)
    if ranks.dim() == 1:
        ranks = ranks.expand(num_layers, -1).clone()
    if ranks.shape != (num_layers, num_experts):
        raise UserError(
            f"Placement file {p} gives {list(ranks.shape)} ranks but the model has {num_layers} MoE layers of "
            f"{num_experts} experts; give one rank per expert."
        )
    if ranks.min() < 0 or ranks.max() >= num_ranks:
        raise UserError(f"Placement file {p} names rank {int(ranks.max())} but only {num_ranks} ranks run.")
    return _placement_from_ranks(ranks, num_ranks)


# ---- hot-expert replication (EPLB style) --------------------------------------------------------


def slots_for_budget(
    num_experts: int, num_ranks: int, extra_bytes_per_rank: float, expert_bytes: float
) -> int:
    """Slots per rank when each rank may hold `extra_bytes_per_rank` beyond its share of experts."""
    return math.ceil(num_experts / num_ranks) + int(extra_bytes_per_rank // expert_bytes)


def replicate_hot_experts(load: torch.Tensor, num_ranks: int, slots_per_rank: int) -> Placement:
    """Replicate the most loaded experts into spare slots and pack replicas onto ranks by load.

    load: [layers, E] measured assignments per expert. Needs R * slots_per_rank >= E.
    Steps per layer:
      1. replica counts: every expert gets one slot; each spare slot goes to the expert with the
         highest load per replica (so hot experts get the spare memory),
      2. packing: replicas, heaviest load-per-replica first, go to the least loaded rank that has a
         free slot and does not already hold that expert,
      3. each replica serves an equal share of its expert's assignments.
    """
    L, E = load.shape
    P = num_ranks * slots_per_rank
    if P < E:
        raise UserError(
            f"{num_ranks} ranks x {slots_per_rank} slots cannot hold {E} experts; raise slots per rank to "
            f"{math.ceil(E / num_ranks)} or more."
        )
    load = load.double()
    phys = torch.full((L, P), -1, dtype=torch.long)
    share = torch.zeros(L, P)
    for layer in range(L):
        # 1. replica counts
        count = torch.ones(E, dtype=torch.long)
        for _ in range(P - E):
            count[torch.argmax(load[layer] / count)] += 1
        # 2. packing (largest per-replica load first, ties by expert id for determinism)
        per_replica = load[layer] / count
        replicas = [(float(per_replica[e]), e) for e in range(E) for _ in range(int(count[e]))]
        replicas.sort(key=lambda t: (-t[0], t[1]))
        rank_load = [0.0] * num_ranks
        fill = [0] * num_ranks
        held: list[set[int]] = [set() for _ in range(num_ranks)]
        for w, e in replicas:
            free = [r for r in range(num_ranks) if fill[r] < slots_per_rank]
            fresh = [r for r in free if e not in held[r]] or free
            r = min(fresh, key=lambda r: (rank_load[r], r))
            phys[layer, r * slots_per_rank + fill[r]] = e
            fill[r] += 1
            rank_load[r] += w
            held[r].add(e)
        # 3. equal shares
        valid = phys[layer] >= 0
        share[layer, valid] = 1.0 / count[phys[layer, valid]].float()
    return Placement(phys, share, num_ranks, slots_per_rank, E)


def rebalance_from_window(window_loads: torch.Tensor, num_ranks: int, slots_per_rank: int) -> Placement:
    """EPLB as serving engines refresh it: replicate and pack on the mean load of a past window of steps.

    window_loads: [steps, layers, E] routed assignments per expert in each step of the window. The
    plan serves the steps after it until the next refresh, so what it leaves is each step's
    fluctuation around the window's mean plus the drift since (EPLB's README: loads are predicted
    with "a moving average of historical statistics"; vLLM re-plans every `step_interval` steps).
    """
    if window_loads.dim() != 3 or window_loads.shape[0] == 0:
        raise ValueError(f"window_loads must be [steps >= 1, layers, E], got {list(window_loads.shape)}.")
    return replicate_hot_experts(window_loads.double().mean(0), num_ranks, slots_per_rank)


# ---- traffic of a dispatch ----------------------------------------------------------------------


@dataclass(frozen=True)
class Traffic:
    """What one all-to-all dispatch (and the matching combine) moves.

    rank_load:  (R,) assignments computed on each rank
    send_bytes: (R,) bytes each rank sends to other ranks in dispatch (the combine mirrors it)
    recv_bytes: (R,) bytes each rank receives from other ranks in dispatch
    """

    rank_load: torch.Tensor
    send_bytes: torch.Tensor
    recv_bytes: torch.Tensor

    @property
    def wire_bytes(self) -> int:
        """Bytes crossing between ranks, dispatch + combine."""
        return int(2 * self.send_bytes.sum())

    def load_imbalance(self) -> float:
        """max / mean rank load (1.0 is perfect; nan for an empty step)."""
        mean = self.rank_load.float().mean()
        return float(self.rank_load.max() / mean) if mean > 0 else float("nan")


def dispatch_traffic(
    src_rank: torch.Tensor, dest_rank: torch.Tensor, sent: torch.Tensor, num_ranks: int, bytes_per_row: int
) -> Traffic:
    """Loads and bytes for assignments sent from `src_rank` to `dest_rank`.

    src_rank: (T,) home rank of each token; dest_rank: (T, k) rank computing each assignment;
    sent: (T, k) bool, assignments actually dispatched to an expert (served elsewhere otherwise).
    One row of `bytes_per_row` bytes moves per off-rank assignment (no de-duplication, as
    all_to_all_single over assignments does).
    """
    src = src_rank.unsqueeze(1).expand_as(dest_rank)[sent]
    dst = dest_rank[sent]
    off = src != dst
    load = torch.bincount(dst, minlength=num_ranks)
    send = torch.bincount(src[off], minlength=num_ranks) * bytes_per_row
    recv = torch.bincount(dst[off], minlength=num_ranks) * bytes_per_row
    return Traffic(load, send, recv)
