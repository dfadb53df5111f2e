"""Expert parallelism over torch.distributed: experts spread over ranks, everything else replicated.

Launch one process per rank (`torchrun --nproc-per-node N -m moe_understudy.runtime.ep ep.yaml`, or
`understudy ep --nproc N ...`, which writes the YAML and calls torchrun). Backend: NCCL when CUDA is
present, gloo otherwise. Attention, shared experts and understudies are replicated on every rank;
routed experts live where the `Placement` puts them (contiguous by default, hot-expert replication,
or a JSON file), and each rank keeps only its own experts' weights.

Each rank feeds its own slice of the global batch; slices are in rank order, so the global batch is
the concatenation (rank-major). Per MoE layer, on every rank:
  1. route the local tokens;
  2. all_gather the routing (logits, weights, indices: a few numbers per token), so every rank
     holds the GLOBAL routing and computes the same plan, with capacity over the global batch
     -- EP then computes exactly what one process computes on the concatenated batch;
  3. plan (runtime.policies via LoadAwareMoE.plan) and choose the replica of every sent
     assignment (same answer on every rank, so receivers know what arrives without metadata);
  4. pack the local sent assignments by destination rank; all_to_all_single dispatch with uneven
     splits; understudy-, shadow- and dropped assignments never leave their rank;
  5. run the local experts on the received rows (unweighted);
  6. all_to_all_single combine (the reverse splits);
  7. weighted sum at the origin + understudy / shadows (local) + shared experts.
Bytes are counted from the split sizes handed to all_to_all_single; comm and compute are timed.
A collective that fails (a rank died) or times out raises `PeerFailure`, naming the collective.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from moe_understudy.config import EPConfig, RuntimeConfig
from moe_understudy.errors import UserError
from moe_understudy.eval.metrics import next_token_view, token_nll
from moe_understudy.moe.adapters import MoELayer, Routing, find_moe_layers
from moe_understudy.runtime.layer import LoadAwareMoE
from moe_understudy.runtime.placement import Placement, plan_placement
from moe_understudy.runtime.policies import Plan
from moe_understudy.runtime.replication import assign_replicas


class PeerFailure(UserError, RuntimeError):
    """A collective failed or timed out: another rank died or stalled."""


# ---- process group ------------------------------------------------------------------------------


def choose_backend(requested: str = "auto") -> str:
    """nccl when CUDA is available (and asked for or auto), else gloo."""
    if requested == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if requested == "nccl" and not torch.cuda.is_available():
        raise UserError("Backend nccl needs CUDA, which is not available here; use --backend gloo (or auto).")
    return requested


def init_distributed(backend: str = "auto", timeout_s: float = 60.0) -> tuple[int, int, torch.device]:
    """Join the process group torchrun (or the caller) described in the environment.

    Returns (rank, world size, device). With no RANK/WORLD_SIZE in the environment, runs as a
    world of one (a local group on a free port), so the same code path serves single-process runs.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    name = choose_backend(backend)
    if not dist.is_initialized():
        dist.init_process_group(name, timeout=timedelta(seconds=timeout_s))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = (
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if name == "nccl" else torch.device("cpu")
    )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return rank, world, device


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _collective(name: str, fn, *args, **kwargs):
    """Run one collective; turn a backend error or timeout into a one-sentence PeerFailure."""
    try:
        return fn(*args, **kwargs)
    except (RuntimeError, dist.DistError) as err:  # DistBackendError / timeouts subclass these
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        rank = dist.get_rank() if dist.is_initialized() else "?"
        raise PeerFailure(
            f"rank {rank}: {name} failed or timed out ({first}); another rank probably died or stalled -- "
            f"check its log, then rerun."
        ) from err


# ---- statistics ---------------------------------------------------------------------------------


@dataclass
class EPRecorder:
    """Per-layer, per-step statistics of one rank; the caller advances `step`."""

    rank: int
    world: int
    step: int = 0
    records: list[dict] = field(default_factory=list)

    def add(self, **rec) -> None:
        self.records.append({"rank": self.rank, "step": self.step, **rec})


# ---- the expert-parallel layer ------------------------------------------------------------------


class ExpertParallelMoE(LoadAwareMoE):
    """LoadAwareMoE whose routed experts run where the placement puts them.

    x is this rank's slice of the global batch: hidden states (B_r, S, H) -> (B_r, S, H).
    `position` is the layer's row in the placement (its order among the model's MoE layers).
    """

    def __init__(
        self,
        moe: MoELayer,
        config: RuntimeConfig,
        placement: Placement,
        position: int,
        understudy: nn.Module | None = None,
        recorder: EPRecorder | None = None,
        keep_all_experts: bool = False,
    ):
        super().__init__(moe, config, understudy, recorder=None)
        self.placement = placement
        self.position = position
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if placement.num_ranks != self.world:
            raise UserError(
                f"The placement is for {placement.num_ranks} ranks but {self.world} are running; plan it for {self.world}."
            )
        self.ep_recorder = recorder
        self.local_experts = placement.local_experts(position, self.rank)
        # Fixed by the placement, so computed once rather than per step.
        self.expert_rank = placement.expert_rank()[position]  # (E,)
        slots = placement.phys_to_logical[position]
        copies = torch.bincount(slots[slots >= 0], minlength=moe.num_experts)
        self.replicated_expert = int(copies.argmax()) if int(copies.max()) > 1 else None
        # Local experts as fused (2I, H) / (H, I) buffers, the layout the experts module uses.
        for e in self.local_experts:
            gate, up, down = moe.expert_weights(e)
            self.register_buffer(f"gate_up_{e}", torch.cat([gate, up]).detach().clone(), persistent=False)
            self.register_buffer(f"down_{e}", down.detach().clone(), persistent=False)
        if not keep_all_experts:
            _drop_routed_weights(moe)

    def capacity_groups(self) -> torch.Tensor:
        """(E,) rank holding each expert of this layer (capacity per rank needs one holder each)."""
        if self.replicated_expert is not None:
            raise UserError(
                f"Expert {self.replicated_expert} of layer {self.moe.index} has replicas on several ranks, so "
                "capacity per rank is ambiguous; use capacity_scope 'expert' with a replicated placement."
            )
        return self.expert_rank

    # 2. ------------------------------------------------------------------------------------------
    def _global_routing(self, routing: Routing) -> tuple[Routing, int, list[int]]:
        """All ranks' routings concatenated in rank order; (global, my first row, rows per rank)."""
        T, E, k = routing.logits.shape[0], routing.num_experts, routing.top_k
        dev = routing.logits.device
        counts = [torch.zeros(1, dtype=torch.long, device=dev) for _ in range(self.world)]
        _collective("all_gather(token counts)", dist.all_gather, counts, torch.tensor([T], device=dev))
        counts = [int(c) for c in counts]
        width = max(counts)
        packed = torch.zeros(width, E + 2 * k, dtype=torch.float64, device=dev)  # logits | weights | indices
        packed[:T] = torch.cat(
            [routing.logits.double(), routing.weights.double(), routing.indices.double()], dim=1
        )
        parts = [torch.empty_like(packed) for _ in range(self.world)]
        _collective("all_gather(routing)", dist.all_gather, parts, packed)
        rows = torch.cat([p[:n] for p, n in zip(parts, counts, strict=True)])
        glob = Routing(
            logits=rows[:, :E].to(routing.logits.dtype),
            weights=rows[:, E : E + k].to(routing.weights.dtype),
            indices=rows[:, E + k :].long(),
            scores=routing.scores,
            scale=routing.scale,
        )
        return glob, sum(counts[: self.rank]), counts

    # 5. ------------------------------------------------------------------------------------------
    def _local_compute(self, rows: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """rows (N, H) received for `experts` (N,) -> unweighted expert outputs (N, H)."""
        out = torch.empty_like(rows)
        act = self.moe.act_fn
        for e in torch.unique(experts).tolist():
            sel = (experts == e).nonzero().squeeze(1)
            gate, up = nn.functional.linear(rows[sel], getattr(self, f"gate_up_{e}")).chunk(2, dim=-1)
            out[sel] = nn.functional.linear(act(gate) * up, getattr(self, f"down_{e}"))
        return out

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # (T_r, H)
        H, R = x.shape[1], self.world
        row_bytes = H * x.element_size()
        t_comm = 0.0

        # 1. route locally
        routing = self.route(x)

        # 2. global routing
        t0 = time.perf_counter()
        glob, first, counts = self._global_routing(routing)
        t_comm += time.perf_counter() - t0

        # 3. global plan and replica choice (identical on every rank)
        plan, capacity = self.plan(glob)
        # Bookkeeping (who sends what where) is small integer work: do it on CPU, like the placement.
        indices, sent = plan.indices.cpu(), plan.sent().cpu()  # (T, k)
        slot = assign_replicas(indices, self.placement, self.position, sent)  # (T, k), -1 unsent
        dest = torch.where(sent, slot // self.placement.slots_per_rank, torch.full_like(slot, -1))
        mine = slice(first, first + counts[self.rank])
        local = _slice_plan(plan, mine)

        # 4. pack by destination rank (stable: flat (token, slot) order inside a destination)
        my_dest = dest[mine].reshape(-1)  # (T_r * k,)
        flat_ids = (my_dest >= 0).nonzero().squeeze(1)
        flat_ids = flat_ids[torch.argsort(my_dest[flat_ids], stable=True)]
        k = plan.top_k
        send_tok, send_slot = (flat_ids // k).to(x.device), (flat_ids % k).to(x.device)
        send_splits = torch.bincount(my_dest[flat_ids], minlength=R).tolist()
        # what every source sends me, in its packing order: rows of its slice whose dest is me
        starts = [sum(counts[:s]) for s in range(R)]
        recv_splits, recv_experts = [], []
        for s in range(R):
            d = dest[starts[s] : starts[s] + counts[s]].reshape(-1)
            ids = (d == self.rank).nonzero().squeeze(1)  # already in flat order
            recv_splits.append(int(ids.numel()))
            recv_experts.append(indices[starts[s] : starts[s] + counts[s]].reshape(-1)[ids])
        recv_experts = torch.cat(recv_experts).to(x.device)  # (A_in,) expert of every received row
        send_buf = x[send_tok].contiguous()  # (A_out, H)
        recv_buf = x.new_empty(sum(recv_splits), H)  # (A_in, H)
        t0 = time.perf_counter()
        _collective(
            "all_to_all(dispatch)", dist.all_to_all_single, recv_buf, send_buf, recv_splits, send_splits
        )
        t_comm += time.perf_counter() - t0

        # 5. local experts
        t0 = time.perf_counter()
        expert_out = self._local_compute(recv_buf, recv_experts)
        t_compute = time.perf_counter() - t0

        # 6. combine: results go back along the reverse splits
        back = x.new_empty(send_buf.shape)
        t0 = time.perf_counter()
        _collective("all_to_all(combine)", dist.all_to_all_single, back, expert_out, send_splits, recv_splits)
        t_comm += time.perf_counter() - t0

        # 7. weighted sum at the origin (+ stand-ins, + shared experts)
        t0 = time.perf_counter()
        y = self._stand_in_part(x, local)
        served = local.expert_served[send_tok, send_slot]  # deadline sends late work it then ignores
        w = local.weights[send_tok, send_slot].to(x.dtype).unsqueeze(1)
        y = y.index_add(0, send_tok[served], (back * w)[served])
        shared = self.moe.shared(x)
        if shared is not None:
            y = y + shared
        t_compute += time.perf_counter() - t0

        if self.ep_recorder is not None:
            self._record(
                glob,
                plan,
                local,
                capacity,
                send_splits,
                recv_splits,
                recv_experts,
                row_bytes,
                t_comm,
                t_compute,
                send_buf,
                recv_buf,
            )
        return y.reshape(shape)

    def _stand_in_part(self, x: torch.Tensor, local: Plan) -> torch.Tensor:
        """Understudy / shadow output of the local tokens: LoadAwareMoE.execute with no expert work."""
        if x.shape[0] == 0:
            return torch.zeros_like(x)
        none = torch.zeros_like(local.expert_served)
        return self.execute(x, dataclasses.replace(local, expert_served=none))

    def _understudy_cost(self) -> float:
        """Understudy FLOPs per token in units of one expert assignment (0 without a whole-layer understudy)."""
        u = self.understudy
        if u is None or hasattr(u, "per_assignment") or not hasattr(u, "flops_per_token"):
            return 0.0
        return u.flops_per_token() / self.moe.expert_flops_per_token()

    def _record(
        self,
        glob,
        plan,
        local,
        capacity,
        send_splits,
        recv_splits,
        recv_experts,
        row_bytes,
        t_comm,
        t_compute,
        send_buf,
        recv_buf,
    ):
        me = self.rank
        served = torch.bincount(recv_experts, minlength=glob.num_experts)
        self.ep_recorder.add(
            layer=self.moe.index,
            tokens=int(local.num_tokens),
            global_tokens=int(plan.num_tokens),
            capacity=capacity,
            send_splits=send_splits,
            recv_splits=recv_splits,
            # bytes handed to all_to_all_single (dispatch + combine mirror each other)
            passed_bytes=int(
                send_buf.numel() * send_buf.element_size() + recv_buf.numel() * recv_buf.element_size()
            ),
            dispatch_send_bytes=sum(n for r, n in enumerate(send_splits) if r != me) * row_bytes,
            dispatch_recv_bytes=sum(n for r, n in enumerate(recv_splits) if r != me) * row_bytes,
            self_bytes=send_splits[me] * row_bytes,
            combine_send_bytes=sum(n for r, n in enumerate(recv_splits) if r != me) * row_bytes,
            combine_recv_bytes=sum(n for r, n in enumerate(send_splits) if r != me) * row_bytes,
            routing_bytes=int(plan.num_tokens * (glob.num_experts + 2 * glob.top_k) * 8),
            tokens_per_expert={int(e): int(served[e]) for e in self.local_experts},
            rank_load=int(sum(recv_splits)),
            understudy_tokens=int(local.understudy_tokens.sum()),
            # rank work in assignment units: expert rows + understudy tokens x (its FLOPs / one expert's)
            work=float(sum(recv_splits)) + int(local.understudy_tokens.sum()) * self._understudy_cost(),
            degraded_tokens=int(local.counts()["degraded_tokens"]),
            comm_s=t_comm,
            compute_s=t_compute,
        )


def _slice_plan(plan: Plan, rows: slice) -> Plan:
    return Plan(
        indices=plan.indices[rows],
        weights=plan.weights[rows],
        expert_served=plan.expert_served[rows],
        shadow_served=plan.shadow_served[rows],
        dropped=plan.dropped[rows],
        understudy_tokens=plan.understudy_tokens[rows],
        dispatched=None if plan.dispatched is None else plan.dispatched[rows],
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
) -> list[ExpertParallelMoE]:
    """Wrap every MoE block of `model` for expert parallelism in the current process group.

    placement: Placement over dist.get_world_size() ranks (default contiguous). understudies:
    stand-in per MoE layer index, as for runtime.layer.patch. Frees non-local expert weights
    unless `keep_all_experts`.
    """
    from moe_understudy.runtime.layer import _check_stand_in

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
        _check_stand_in(config.policy, moe, stand_in)
        w = ExpertParallelMoE(moe, config, placement, pos, stand_in, recorder, keep_all_experts)
        moe.replace(w)
        wrappers.append(w)
    return wrappers


# ---- evaluation workflow ------------------------------------------------------------------------


def build_placement(
    cfg: EPConfig, model: nn.Module, world: int, calibration: torch.Tensor | None
) -> Placement:
    """contiguous | replicate (hot experts measured on `calibration` blocks) | a JSON file."""
    layers = find_moe_layers(model)
    L, E = len(layers), layers[0].num_experts
    if cfg.placement == "contiguous":
        return plan_placement(L, E, world)
    if cfg.placement == "replicate":
        from moe_understudy.sim.traces import capture_trace

        if calibration is None or len(calibration) == 0:
            raise UserError(
                "Placement 'replicate' needs calibration text (the model folder's train blocks); none found."
            )
        load = capture_trace(model, calibration, batch_size=8).expert_load()
        base = -(-E // world)
        return plan_placement(L, E, world, load=load, slots_per_rank=base + cfg.extra_slots)
    return plan_placement(L, E, world, path=cfg.placement)


def sweep_runs(cfg: EPConfig) -> list[tuple[str, float]]:
    """(policy, capacity factor) pairs of one launch: `full` once, every other policy at every capacity."""
    runs = [("full", 1.0)] if "full" in cfg.policies else []
    return runs + [(p, cf) for p in cfg.policies if p != "full" for cf in cfg.capacities]


def run_ep_evaluation(cfg: EPConfig) -> list[dict]:
    """Perplexity and per-rank traffic of every policy x capacity of `cfg` under expert parallelism.

    Call on every rank. The model is loaded and its experts placed once; the runs of the sweep
    reuse them. Rank 0 writes `cfg.out`/ep.json (one summary per run, the placement, and every
    rank's per-layer, per-step records per run) and ep.yaml. Returns the summaries on every rank.
    """
    from moe_understudy.runtime.layer import _check_stand_in
    from moe_understudy.sim.workflow import eval_blocks
    from moe_understudy.teacher import load_model_and_tokenizer

    rank, world, device = init_distributed(cfg.backend, cfg.timeout_s)
    try:
        torch.manual_seed(0)
        model, tokenizer = load_model_and_tokenizer(cfg.model, device=device)
        understudies = None
        if cfg.understudies:
            from moe_understudy.understudy.io import load_understudies

            understudies = load_understudies(cfg.understudies, model, device=device)
        blocks = eval_blocks(cfg.model, tokenizer, cfg)
        per_step = world * cfg.blocks_per_rank
        steps = len(blocks) // per_step
        if steps == 0:
            raise UserError(
                f"{len(blocks)} blocks cannot fill one step of {world} ranks x {cfg.blocks_per_rank} blocks; "
                f"lower --blocks-per-rank."
            )
        cache = Path(cfg.model) / "blocks.pt"
        calibration = torch.load(cache)["train"][:32] if cache.is_file() else None
        placement = build_placement(cfg, model, world, calibration)
        wrappers = patch_ep(model, placement, understudies, RuntimeConfig())
        summaries, all_records = [], {}
        for policy, cf in sweep_runs(cfg):
            runtime = RuntimeConfig(
                policy=policy, capacity_factor=cf, priority=cfg.priority, capacity_scope=cfg.capacity_scope
            )
            recorder = EPRecorder(rank, world)
            for w in wrappers:
                _check_stand_in(policy, w.moe, w.understudy)
                w.config, w.ep_recorder = runtime, recorder
            nll, wall = _evaluate(model, blocks, steps, per_step, rank, cfg.blocks_per_rank, recorder, device)
            gathered: list = [None] * world
            _collective("all_gather_object(stats)", dist.all_gather_object, gathered, recorder.records)
            records = [r for part in gathered for r in part]
            summary = summarize(records, world, float(torch.exp(nll[0] / nll[1])), steps, placement, wall)
            summaries.append(
                {
                    "policy": policy,
                    "capacity_factor": cf,
                    "capacity_scope": cfg.capacity_scope,
                    "placement": cfg.placement,
                    **summary,
                }
            )
            all_records[f"{policy}@{cf}"] = records
        if rank == 0:
            out = Path(cfg.out)
            out.mkdir(parents=True, exist_ok=True)
            payload = {"runs": summaries, "placement": placement.to_json(), "records": all_records}
            (out / "ep.json").write_text(json.dumps(payload, indent=1))
            cfg.to_yaml(out / "ep.yaml")
        return summaries
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@torch.no_grad()
def _evaluate(
    model, blocks, steps, per_step, rank, blocks_per_rank, recorder, device
) -> tuple[torch.Tensor, float]:
    """(summed token NLL, tokens) over all ranks, and this rank's wall time; rank r feeds its slice of each step."""
    nll = torch.zeros(2, dtype=torch.float64, device=device)
    t_start = time.perf_counter()
    for step in range(steps):
        recorder.step = step
        start = step * per_step + rank * blocks_per_rank
        ids = blocks[start : start + blocks_per_rank].to(device)
        nll[0] += token_nll(*next_token_view(model(input_ids=ids).logits, ids)).sum().double()
        nll[1] += ids[:, 1:].numel()
    wall = time.perf_counter() - t_start
    _collective("all_reduce(loss)", dist.all_reduce, nll)
    return nll, wall


def summarize(
    records: list[dict],
    world: int,
    perplexity: float,
    steps: int,
    placement: Placement,
    wall: float,
) -> dict:
    """Totals over ranks and steps: bytes on the wire, max/mean rank load, comm vs compute time."""
    by_key: dict[tuple[int, int], list[dict]] = {}
    for r in records:
        by_key.setdefault((r["step"], r["layer"]), []).append(r)

    def max_over_mean(key: str) -> float:
        ratios = []
        for recs in by_key.values():
            loads = [r[key] for r in recs]
            mean = sum(loads) / len(loads)
            ratios.append(max(loads) / mean if mean > 0 else 1.0)
        return sum(ratios) / max(len(ratios), 1)

    per_rank = {}
    for rk in range(world):
        mine = [r for r in records if r["rank"] == rk]
        per_rank[rk] = {
            "dispatch_send_bytes": sum(r["dispatch_send_bytes"] for r in mine),
            "dispatch_recv_bytes": sum(r["dispatch_recv_bytes"] for r in mine),
            "combine_send_bytes": sum(r["combine_send_bytes"] for r in mine),
            "rank_load": sum(r["rank_load"] for r in mine),
            "comm_s": sum(r["comm_s"] for r in mine),
            "compute_s": sum(r["compute_s"] for r in mine),
        }
    tokens = sum(r["tokens"] for r in records)
    return {
        "slots_per_rank": placement.slots_per_rank,
        "ranks": world,
        "steps": steps,
        "perplexity": perplexity,
        "a2a_bytes": sum(v["dispatch_send_bytes"] + v["combine_send_bytes"] for v in per_rank.values()),
        "routing_gather_bytes": sum(r["routing_bytes"] for r in records if r["rank"] == 0),
        "max_over_mean_rank_load": max_over_mean("rank_load"),  # expert rows per rank, per layer-step
        "max_over_mean_rank_work": max_over_mean("work"),  # + understudy FLOPs on the token's own rank
        "understudy_token_fraction": sum(r["understudy_tokens"] for r in records) / max(tokens, 1),
        "degraded_token_fraction": sum(r["degraded_tokens"] for r in records) / max(tokens, 1),
        "comm_s": max(v["comm_s"] for v in per_rank.values()),
        "compute_s": max(v["compute_s"] for v in per_rank.values()),
        "wall_s": wall,
        "per_rank": per_rank,
    }


def runs_table(runs: list[dict], title: str = "expert parallelism"):
    """Rich table of run summaries: perplexity, all-to-all bytes, rank balance, comm vs compute."""
    from rich.table import Table

    t = Table(title=title)
    for c in (
        "policy",
        "cf",
        "perplexity",
        "a2a MB",
        "max/mean load",
        "max/mean work",
        "understudy",
        "comm s",
        "compute s",
    ):
        t.add_column(c, justify="left" if c == "policy" else "right")
    for r in runs:
        t.add_row(
            r["policy"],
            ""
            if r["policy"] == "full"
            else f"{r['capacity_factor']:g}" + (" per rank" if r.get("capacity_scope") == "rank" else ""),
            f"{r['perplexity']:.3f}",
            f"{r['a2a_bytes'] / 1e6:.2f}",
            f"{r['max_over_mean_rank_load']:.3f}",
            f"{r['max_over_mean_rank_work']:.3f}",
            f"{r['understudy_token_fraction']:.1%}",
            f"{r['comm_s']:.2f}",
            f"{r['compute_s']:.2f}",
        )
    return t


def launch_ep(cfg: EPConfig, nproc: int) -> list[dict]:
    """Run `run_ep_evaluation` on `nproc` local processes through torchrun; return the run summaries.

    This is what `understudy ep --nproc N` (and `evaluate --ep N`) call. Already inside torchrun
    (RANK set), it runs in-process instead.
    """
    if "RANK" in os.environ:
        return run_ep_evaluation(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg.to_yaml(out / "ep.yaml")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        "--master-addr=127.0.0.1",
        f"--master-port={free_port()}",
        "-m",
        "moe_understudy.runtime.ep",
        str(out / "ep.yaml"),
    ]
    done = subprocess.run(cmd, check=False)
    if done.returncode != 0:
        raise UserError(
            f"Expert-parallel run over {nproc} processes failed (exit {done.returncode}); see the rank logs above."
        )
    return json.loads((out / "ep.json").read_text())["runs"]


def main(argv: list[str] | None = None) -> None:
    """`torchrun --nproc-per-node N -m moe_understudy.runtime.ep EP_YAML`: one rank of an EP evaluation."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: torchrun --nproc-per-node N -m moe_understudy.runtime.ep EP_YAML")
    summaries = run_ep_evaluation(EPConfig.from_yaml(args[0]))
    if int(os.environ.get("RANK", 0)) == 0:
        for s in summaries:
            print(json.dumps({k: v for k, v in s.items() if k != "per_rank"}))


if __name__ == "__main__":
    main()
