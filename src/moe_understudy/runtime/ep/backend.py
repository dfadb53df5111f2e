"""The expert-parallel backend of the execution core: experts spread over ranks, everything else replicated.

Attention, shared experts and stand-ins are replicated on every rank; routed experts live where the
`Placement` puts them, and each rank keeps only its own experts' weights. Each rank feeds its own
slice of the global batch; slices are in rank order, so the global batch is their concatenation
(rank-major). Per MoE layer, on every rank (`ExpertParallelBackend.run`):

  1. route the local tokens (the core);
  2. exchange what the plan needs (runtime/exchange.py): per-(choice rank, expert) counts where the
     policy and priority permit, else compact per-token rows; capacity is over the GLOBAL batch,
     so EP computes exactly what one process computes on the concatenated batch;
  3. plan this rank's tokens, and count what every rank sends every expert (the same on all ranks);
  4. choose each sent assignment's replica from those counts and pack rows by (destination rank,
     slot, token order), so a receiver knows what arrives from counts alone; stand-in-served and
     dropped assignments never leave their rank;
  5. all_to_all_single dispatch with uneven splits;
  6. run the local experts on the received rows (unweighted);
  7. all_to_all_single combine (the reverse splits);
  8. weighted sum at the origin + the stand-in's share (local); the core adds shared experts.
Bytes are counted from the tensors handed to the collectives; comm and compute are timed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from moe_understudy.config import RuntimeConfig
from moe_understudy.errors import UserError
from moe_understudy.moe.adapters import MoELayer, find_moe_layers
from moe_understudy.runtime import exchange as xchg
from moe_understudy.runtime import ledger
from moe_understudy.runtime.core import Step, stand_in_output
from moe_understudy.runtime.ep.group import all_gather_equal, collective
from moe_understudy.runtime.layer import LoadAwareMoE, check_stand_in
from moe_understudy.runtime.placement import Placement, plan_placement
from moe_understudy.runtime.plan import RoutedAssignments
from moe_understudy.runtime.policies import EXPANDED, layer_switches, ranked_alternatives
from moe_understudy.runtime.replication import replica_of_position


@dataclass
class EPRecorder:
    """Per-layer, per-step statistics of one rank; the caller advances `step`."""

    rank: int
    world: int
    step: int = 0
    records: list[dict] = field(default_factory=list)

    def add(self, **rec) -> None:
        self.records.append({"rank": self.rank, "step": self.step, **rec})


@dataclass(frozen=True)
class _Planned:
    plan: object  # this rank's Plan
    capacity: int | None
    sent: torch.Tensor  # (R, P) assignments every rank sends to every physical slot
    global_tokens: int
    counts: list[int]  # tokens per rank
    exchange_payloads: list[int]  # bytes of each exchange tensor this rank passed
    mode: str


class ExpertParallelBackend:
    """Runs the core's plan with the routed experts spread over the ranks of the process group.

    `position` is the layer's row in the placement (its order among the model's MoE layers).
    """

    def __init__(
        self,
        moe: MoELayer,
        placement: Placement,
        position: int,
        recorder: EPRecorder | None = None,
        keep_all_experts: bool = False,
    ):
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if placement.num_ranks != self.world:
            raise UserError(
                f"The placement is for {placement.num_ranks} ranks but {self.world} are running; plan it for {self.world}."
            )
        self.moe = moe
        self.placement = placement
        self.position = position
        self.recorder = recorder
        self.expert_rank = placement.expert_rank()[position]  # (E,) fixed by the placement: once
        self.copies = placement.replica_count()[position]  # (E,)
        self.slot_expert = placement.phys_to_logical[position]  # (P,)
        spr = placement.slots_per_rank
        self.my_slots = torch.arange(self.rank * spr, (self.rank + 1) * spr)
        self.my_slots = self.my_slots[self.slot_expert[self.my_slots] >= 0]
        self.local_experts = placement.local_experts(position, self.rank)
        self.topology = ledger.Topology(self.world, self.expert_rank, placement, position)
        # Local experts as fused (2I, H) / (H, I) buffers, the layout the experts module uses.
        self.weights: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for e in self.local_experts:
            gate, up, down = moe.expert_weights(e)
            self.weights[e] = (torch.cat([gate, up]).detach().clone(), down.detach().clone())
        if not keep_all_experts:
            _drop_routed_weights(moe)

    @property
    def replicated(self) -> bool:
        return int(self.copies.max()) > 1

    # 2.-3. ----------------------------------------------------------------------------------------
    def _plan(self, core: LoadAwareMoE, routing) -> _Planned:
        mode, _ = core.exchange()
        if mode == xchg.COUNTS:
            return self._plan_from_counts(core, routing)
        return self._plan_from_rows(core, routing)

    def _plan_from_counts(self, core: LoadAwareMoE, routing) -> _Planned:
        E, cfg = self.moe.num_experts, core.config
        mine = xchg.choice_counts(routing.indices, routing.weights, E)  # (k, E) int32
        counts = torch.stack(all_gather_equal("all_gather(routing counts)", mine, self.world))  # (R, k, E)
        tokens = [int(c) // self.moe.top_k for c in counts.long().sum((1, 2))]
        T = sum(tokens)
        places = xchg.global_places(routing.indices, routing.weights, counts, self.rank)
        load = counts.long().sum((0, 1))  # (E,)
        plan, capacity = core.plan(routing, num_tokens=T, places=places, holder_load=load)
        if cfg.policy in ("full", "deadline"):
            sent = xchg.admitted(counts, None)
        elif cfg.policy == "layer":
            switched = layer_switches(load, core.capacity(T, None), cfg.threshold)
            sent = (
                torch.zeros_like(load)[None].expand(self.world, -1)
                if switched
                else xchg.admitted(counts, None)
            )
        else:
            sent = xchg.admitted(counts, capacity)
        payload = mine.numel() * mine.element_size()
        return _Planned(
            plan, capacity, self._split_over_replicas(sent), T, tokens, [payload], mode=xchg.COUNTS
        )

    def _plan_from_rows(self, core: LoadAwareMoE, routing) -> _Planned:
        moe, cfg = self.moe, core.config
        T_r = routing.indices.shape[0]
        mine_count = torch.tensor([T_r], dtype=xchg.COUNT_DTYPE)
        tokens = [int(c) for c in all_gather_equal("all_gather(token counts)", mine_count, self.world)]
        fields = {"indices": routing.indices, "weights": routing.weights}
        if cfg.policy == "reroute":
            fields["alternatives"] = ranked_alternatives(routing.logits, routing.indices)
        if cfg.policy in EXPANDED:
            home = torch.full((T_r,), self.rank, dtype=torch.long)
            fields["candidate_indices"], fields["candidate_weights"] = core.candidates(routing, home)
        layout = xchg.row_layout(
            cfg.policy, moe.num_experts, moe.top_k, routing.weights.dtype, cfg.expanded_m
        )
        rows = xchg.pack_rows({k: v.cpu() for k, v in fields.items()}, layout)  # (T_r, bytes) uint8
        padded = torch.zeros(max(tokens), rows.shape[1], dtype=torch.uint8)
        padded[:T_r] = rows
        parts = all_gather_equal("all_gather(routing rows)", padded, self.world)
        glob = xchg.unpack_rows(torch.cat([p[:n] for p, n in zip(parts, tokens, strict=True)]), layout)
        dev = routing.indices.device
        view = RoutedAssignments(glob["indices"].to(dev), glob["weights"].to(dev), moe.num_experts)
        known = {}
        if "alternatives" in glob:
            known["alternatives"] = glob["alternatives"].to(dev)
        candidates = None
        if "candidate_indices" in glob:
            candidates = (glob["candidate_indices"].to(dev), glob["candidate_weights"].to(dev))
        plan, capacity = core.plan(view, candidates=candidates, **known)
        first = sum(tokens[: self.rank])
        starts = [sum(tokens[:s]) for s in range(self.world)]
        parts = [plan.rows(slice(starts[s], starts[s] + tokens[s])) for s in range(self.world)]
        if plan.slots is not None:  # fixed at routing time (capacity per rank over replicas)
            P = self.placement.num_slots
            sent = torch.stack([torch.bincount(q.slots[q.sent()].cpu(), minlength=P) for q in parts])
        else:
            sent = torch.stack(
                [torch.bincount(q.indices[q.sent()].cpu(), minlength=moe.num_experts) for q in parts]
            )
            sent = self._split_over_replicas(sent)
        payloads = [mine_count.numel() * mine_count.element_size(), padded.numel()]
        return _Planned(
            plan.rows(slice(first, first + T_r)),
            capacity,
            sent,
            sum(tokens),
            tokens,
            payloads,
            mode=xchg.ROWS,
        )

    # 4. ------------------------------------------------------------------------------------------
    def _replica(self, expert: int, positions: torch.Tensor, total: int) -> torch.Tensor:
        """Physical slots serving `positions` among expert `expert`'s `total` sent assignments."""
        slots = self.placement.slots_of(self.position, expert)
        if slots.numel() == 1:
            return slots.expand_as(positions)
        share = self.placement.replica_share[self.position, slots]
        return slots[replica_of_position(positions, total, share)]

    def _split_over_replicas(self, sent: torch.Tensor) -> torch.Tensor:
        """(R, E) assignments each rank sends each expert -> (R, P) per physical slot.

        An expert's sent assignments, in global token order (rank-major), are cut into chunks by
        replica share (`replica_of_position`), so every rank derives the same split from counts.
        """
        R, P = self.world, self.placement.num_slots
        out = torch.zeros(R, P, dtype=torch.long)
        for e in range(self.moe.num_experts):
            slots = self.placement.slots_of(self.position, e)
            if slots.numel() == 1:
                out[:, slots[0]] = sent[:, e]
                continue
            total = int(sent[:, e].sum())
            source = torch.repeat_interleave(torch.arange(R), sent[:, e])  # (total,) rank of each position
            replica = self._replica(e, torch.arange(total), total)
            out.index_put_((source, replica), torch.ones(total, dtype=torch.long), accumulate=True)
        return out

    def _local_slots(self, plan, sent: torch.Tensor) -> torch.Tensor:
        """(T_r, k) slot of each of this rank's sent assignments (-1 unsent)."""
        mask = plan.sent().cpu()
        if plan.slots is not None:
            return torch.where(mask, plan.slots.cpu(), torch.full_like(plan.slots.cpu(), -1))
        indices = plan.indices.cpu()
        slot = torch.full_like(indices, -1)
        per_expert = torch.stack(
            [sent[:, self.placement.slots_of(self.position, e)].sum(1) for e in range(self.moe.num_experts)],
            1,
        )  # (R, E)
        offset = torch.cumsum(per_expert, 0) - per_expert  # assignments of e from earlier ranks
        total = per_expert.sum(0)
        flat_e, flat_sent = indices.reshape(-1), mask.reshape(-1)
        flat_slot = slot.reshape(-1)
        for e in torch.unique(flat_e[flat_sent]).tolist():
            rows = ((flat_e == e) & flat_sent).nonzero().squeeze(1)
            positions = offset[self.rank, e] + torch.arange(rows.numel())
            flat_slot[rows] = self._replica(e, positions, int(total[e]))
        return flat_slot.view_as(indices)

    def _receive_layout(self, sent: torch.Tensor) -> tuple[list[int], torch.Tensor]:
        """(rows from each source, expert of every received row in arrival order: by slot, then token)."""
        mine = sent[:, self.my_slots]  # (R, my slots)
        experts = self.slot_expert[self.my_slots]
        splits = mine.sum(1).tolist()
        arrival = torch.cat([torch.repeat_interleave(experts, mine[s]) for s in range(self.world)])
        return splits, arrival

    # 6. ------------------------------------------------------------------------------------------
    def _local_compute(self, rows: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """rows (N, H) received for `experts` (N,) -> unweighted expert outputs (N, H)."""
        out = torch.empty_like(rows)
        act = self.moe.act_fn
        for e in torch.unique(experts).tolist():
            sel = (experts == e).nonzero().squeeze(1)
            gate_up, down = self.weights[e]
            gate, up = nn.functional.linear(rows[sel], gate_up.to(rows)).chunk(2, dim=-1)
            out[sel] = nn.functional.linear(act(gate) * up, down.to(rows))
        return out

    def run(self, core: LoadAwareMoE, x: torch.Tensor, routing) -> tuple[torch.Tensor, Step]:
        H, R = x.shape[1], self.world
        row_bytes = H * x.element_size()
        t_comm = 0.0

        # 2.-3. exchange and plan
        t0 = time.perf_counter()
        planned = self._plan(core, routing)
        t_comm += time.perf_counter() - t0
        plan = planned.plan

        # 4. replicas and packing: by destination rank, then slot, then token order
        slot = self._local_slots(plan, planned.sent)  # (T_r, k)
        k = plan.top_k
        flat_slot = slot.reshape(-1)
        flat_ids = (flat_slot >= 0).nonzero().squeeze(1)
        flat_ids = flat_ids[torch.argsort(flat_slot[flat_ids], stable=True)]  # slots are rank-major
        dest = flat_slot[flat_ids] // self.placement.slots_per_rank
        send_tok, send_slot = (flat_ids // k).to(x.device), (flat_ids % k).to(x.device)
        send_splits = torch.bincount(dest, minlength=R).tolist()
        recv_splits, recv_experts = self._receive_layout(planned.sent)
        recv_experts = recv_experts.to(x.device)
        send_buf = x[send_tok].contiguous()  # (A_out, H)
        recv_buf = x.new_empty(sum(recv_splits), H)  # (A_in, H)

        # 5. dispatch
        t0 = time.perf_counter()
        collective(
            "all_to_all(dispatch)", dist.all_to_all_single, recv_buf, send_buf, recv_splits, send_splits
        )
        t_comm += time.perf_counter() - t0

        # 6. local experts
        t0 = time.perf_counter()
        expert_out = self._local_compute(recv_buf, recv_experts)
        t_compute = time.perf_counter() - t0

        # 7. combine: results go back along the reverse splits
        back = x.new_empty(send_buf.shape)
        t0 = time.perf_counter()
        collective("all_to_all(combine)", dist.all_to_all_single, back, expert_out, send_splits, recv_splits)
        t_comm += time.perf_counter() - t0

        # 8. weighted sum at the origin + the stand-in's share (local)
        t0 = time.perf_counter()
        y = torch.zeros_like(x)
        extra = stand_in_output(x, plan, core.stand_in, self.moe.num_experts) if x.shape[0] else None
        if extra is not None:
            y = y + extra
        served = plan.expert_served[send_tok, send_slot]  # deadline sends late work it then ignores
        w = plan.weights[send_tok, send_slot].to(x.dtype).unsqueeze(1)
        y = y.index_add(0, send_tok[served], (back * w)[served])
        t_compute += time.perf_counter() - t0

        if self.recorder is not None:
            passed = send_buf.numel() * send_buf.element_size() + recv_buf.numel() * recv_buf.element_size()
            self._record(
                core, planned, send_splits, recv_splits, recv_experts, row_bytes, passed, (t_comm, t_compute)
            )
        step = Step(
            self.moe, routing, plan, planned.capacity, x.element_size(), core.stand_in, None, planned.mode
        )
        return y, step

    def _record(self, core, planned, send_splits, recv_splits, recv_experts, row_bytes, passed, seconds):
        me, R = self.rank, self.world
        plan = planned.plan
        expert_flops = self.moe.expert_flops_per_token()
        stand_in_flops = float(ledger.stand_in_token_flops(plan, core.stand_in).sum())
        served = torch.bincount(recv_experts.cpu(), minlength=self.moe.num_experts)
        payload = sum(planned.exchange_payloads)
        extra_slots = self.placement.slots_per_rank - self.moe.num_experts / R
        self.recorder.add(
            layer=self.moe.index,
            tokens=int(plan.num_tokens),
            global_tokens=planned.global_tokens,
            capacity=planned.capacity,
            send_splits=send_splits,
            recv_splits=recv_splits,
            # bytes handed to all_to_all_single (dispatch + combine mirror each other)
            passed_bytes=int(passed),
            dispatch_send_bytes=sum(n for r, n in enumerate(send_splits) if r != me) * row_bytes,
            dispatch_recv_bytes=sum(n for r, n in enumerate(recv_splits) if r != me) * row_bytes,
            self_bytes=send_splits[me] * row_bytes,
            # combine moves every computed row back (late deadline results too): the reverse of dispatch
            combine_send_bytes=sum(n for r, n in enumerate(recv_splits) if r != me) * row_bytes,
            combine_recv_bytes=sum(n for r, n in enumerate(send_splits) if r != me) * row_bytes,
            exchange_mode=planned.mode,
            exchange_payloads=planned.exchange_payloads,
            # an all-gather delivers this rank's payload to each of the R - 1 others
            exchange_send_bytes=payload * (R - 1),
            exchange_recv_bytes=sum(planned.exchange_payloads) * (R - 1),
            tokens_per_expert={int(e): int(served[e]) for e in self.local_experts},
            rank_load=int(sum(recv_splits)),
            understudy_tokens=int(plan.understudy_tokens.sum()),
            stand_in_flops=stand_in_flops,
            # all FLOPs this rank spends: the expert rows it computes + the stand-in on its own tokens
            work=float(sum(recv_splits)) * expert_flops + stand_in_flops,
            degraded_tokens=int(plan.counts()["degraded_tokens"]),
            memory_expert_equiv=ledger.memory_expert_equiv(
                core.stand_in, self.moe.expert_params(), extra_slots
            ),
            comm_s=seconds[0],
            compute_s=seconds[1],
        )


def _drop_routed_weights(moe: MoELayer) -> None:
    """Free the routed experts' stacked weights on this rank (only the local copies are kept)."""
    experts = moe.block.experts
    for name, p in list(experts.named_parameters(recurse=False)):
        setattr(experts, name, nn.Parameter(p.new_empty(0), requires_grad=False))


def patch_ep(
    model: nn.Module,
    placement: Placement | None = None,
    understudies: dict[int, nn.Module] | None = None,
    config: RuntimeConfig | None = None,
    recorder: EPRecorder | None = None,
    keep_all_experts: bool = False,
) -> list[LoadAwareMoE]:
    """Wrap every MoE block of `model` for expert parallelism in the current process group.

    placement: Placement over dist.get_world_size() ranks (default contiguous). understudies:
    stand-in per MoE layer index, as for runtime.layer.patch. Frees non-local expert weights
    unless `keep_all_experts`.
    """
    config = config or RuntimeConfig()
    layers = find_moe_layers(model)
    placement = placement or plan_placement(len(layers), layers[0].num_experts, dist.get_world_size())
    if placement.num_layers != len(layers) or placement.num_experts != layers[0].num_experts:
        raise UserError(
            f"The placement covers {placement.num_layers} layers x {placement.num_experts} experts but the model has "
            f"{len(layers)} MoE layers x {layers[0].num_experts} experts; plan it for this model."
        )
    understudies = understudies or {}
    wrappers = []
    for pos, moe in enumerate(layers):
        stand_in = understudies.get(moe.index)
        check_stand_in(config.policy, moe, stand_in)
        backend = ExpertParallelBackend(moe, placement, pos, recorder, keep_all_experts)
        w = LoadAwareMoE(moe, config, stand_in, topology=backend.topology, backend=backend)
        moe.replace(w)
        wrappers.append(w)
    return wrappers


def configure_ep(wrappers: list[LoadAwareMoE], config: RuntimeConfig, recorder: EPRecorder | None) -> None:
    """Set the policy and recorder of every expert-parallel layer between runs of a sweep."""
    for w in wrappers:
        check_stand_in(config.policy, w.moe, w.stand_in)
        w.config = config
        w.backend.recorder = recorder
