"""The one execution core of an MoE block: route -> plan -> execute -> record.

    routing = moe.route(x)                 # the adapter's router (+ a scenario's logit bias)
    plan, capacity = planner(routing)      # a policy (runtime), a routing mode (KD), a random
                                           # substitution (distillation): pure functions
    y = backend.run(...)                   # experts on expert-served assignments, the stand-in on
                                           # its share, locally or across ranks
    recorder.record(step)                  # loads, bytes, work, memory (runtime/ledger.py)
    y + moe.shared(x)                      # shared experts are always local

`MoECore` is the only module that runs an experts module under a plan. The runtime's load-aware
layer, expert parallelism, KD's teacher routing modes and end-to-end substitution are
configurations of it (a planner, a backend chosen once at construction, an optional stand-in and
recorder). `expert_output` / `stand_in_output` are the local execution the expert-parallel backend
also uses for its own rank's stand-in share.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from moe_understudy.moe.adapters import MoELayer, Routing
from moe_understudy.moe.standins import ASSIGNMENT, TOKEN, level_of
from moe_understudy.runtime import exchange as xchg
from moe_understudy.runtime import ledger
from moe_understudy.runtime.plan import Plan

Planner = Callable[[Routing], tuple[Plan, int | None]]


class _BiasedRouterLogits(TorchFunctionMode):
    """Adds `bias` (E,) to the router's logits while the router runs, so its own top-k sees them.

    Family-agnostic: every supported router computes its logits with one `F.linear`; the bias is
    applied to that call's output only, and only while this mode is active (weights untouched).
    """

    def __init__(self, bias: torch.Tensor):
        super().__init__()
        self.bias = bias

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is F.linear:
            out = out + self.bias.to(device=out.device, dtype=out.dtype)
        return out


# ---- execution --------------------------------------------------------------------------------------


def expert_output(moe: MoELayer, x: torch.Tensor, plan: Plan) -> torch.Tensor:
    """Weighted output (T, H) of the expert-served assignments of `plan` (the others skipped)."""
    if bool(plan.expert_served.all()):
        return moe.experts(x, plan.indices, plan.weights)
    if not bool(plan.expert_served.any()):
        return torch.zeros_like(x)
    return moe.experts(x, plan.masked_indices(plan.expert_served, moe.num_experts), plan.weights)


def stand_in_output(
    x: torch.Tensor, plan: Plan, stand_in: nn.Module | None, num_experts: int
) -> torch.Tensor | None:
    """The stand-in's share (T, H) of `plan`: understudy tokens, or stand-in-served assignments; None if none."""
    kind = level_of(stand_in)
    if kind == ASSIGNMENT and bool(plan.shadow_served.any()):
        return _in_own_dtype(stand_in, x, plan.masked_indices(plan.shadow_served, num_experts), plan.weights)
    if kind != TOKEN:
        return None
    if plan.upfront:  # deadline: the understudy ran for every token before dispatch (it overlaps it)
        return torch.where(plan.understudy_tokens[:, None], _in_own_dtype(stand_in, x), torch.zeros_like(x))
    tokens = plan.understudy_tokens.nonzero().squeeze(1)
    if tokens.numel() == 0:
        return None
    return torch.zeros_like(x).index_add(0, tokens, _in_own_dtype(stand_in, x[tokens]))


def _in_own_dtype(stand_in: nn.Module, x: torch.Tensor, *args) -> torch.Tensor:
    """stand_in(x, *args) computed in the stand-in's own dtype, returned in x's.

    `patch` gives stand-ins their block's dtype; distillation keeps fp32 master weights under a
    bf16 / fp16 model, and then x is upcast for the stand-in and its output cast back.
    """
    p = next(stand_in.parameters(), None)
    inp = x if p is None or p.dtype == x.dtype else x.to(p.dtype)
    return stand_in(inp, *args).to(x.dtype)


def _on_host(value):
    """A frozen dataclass of tensors (Plan, Routing) with every tensor on the CPU (itself when already there)."""
    import dataclasses

    moved = {
        f.name: getattr(value, f.name).cpu()
        for f in dataclasses.fields(value)
        if isinstance(getattr(value, f.name), torch.Tensor) and getattr(value, f.name).device.type != "cpu"
    }
    return dataclasses.replace(value, **moved) if moved else value


@dataclass(frozen=True)
class Step:
    """What one execution of a block saw and did, for recorders (see runtime/ledger.py)."""

    moe: MoELayer
    routing: Routing
    plan: Plan
    capacity: int | None
    dtype_bytes: int
    stand_in: nn.Module | None = None
    topology: ledger.Topology | None = None
    exchange_mode: str = xchg.COUNTS
    exchange_row_bytes: int = 0

    def ledger(self) -> ledger.StepLedger:
        """Loads, fates, bytes, work and memory of this step over `topology` (one device when None)."""
        # bookkeeping runs on the host: a plan made on a GPU is copied over once here
        moe, plan, routing = self.moe, _on_host(self.plan), _on_host(self.routing)
        E, T = moe.num_experts, plan.num_tokens
        topo = self.topology or ledger.Topology(1, torch.zeros(E, dtype=torch.long))
        R = topo.num_devices
        home, dest = topo.token_device(T), topo.destinations(plan)
        moved = ledger.traffic(home, dest, R, moe.hidden_size * self.dtype_bytes)
        work = ledger.rank_work(plan, home, dest, R, moe.expert_flops_per_token(), self.stand_in)
        stand_in_flops = float(ledger.stand_in_token_flops(plan, self.stand_in).sum())
        tokens_per_rank = torch.bincount(home, minlength=R).tolist()
        exchange = xchg.exchange_bytes(
            self.exchange_mode, tokens_per_rank, E, moe.top_k, self.exchange_row_bytes
        )
        load = routing.tokens_per_expert()
        counts = plan.counts()
        return ledger.StepLedger(
            layer=moe.index,
            tokens=counts["tokens"],
            assignments=counts["assignments"],
            capacity=self.capacity,
            tokens_per_expert=load.tolist(),
            served_per_expert=plan.served_per_expert(E).tolist(),
            max_load=int(load.max()),
            mean_load=float(load.float().mean()),
            expert=counts["expert"],
            shadow=counts["shadow"],
            understudy=counts["understudy"],
            dropped=counts["dropped"],
            degraded_tokens=counts["degraded_tokens"],
            dispatch_bytes=moved.dispatch_bytes,
            combine_bytes=moved.combine_bytes,
            exchange_bytes=sum(exchange),
            rank_rows=moved.rank_rows.tolist(),
            rank_flops=work.tolist(),
            stand_in_flops=stand_in_flops,
            expert_flops=float(int((dest >= 0).sum()) * moe.expert_flops_per_token()),
            memory_expert_equiv=ledger.memory_expert_equiv(self.stand_in, moe.expert_params()),
        )


class LocalBackend:
    """All experts in this process: plan on the step's tokens, run experts and stand-in here."""

    def run(self, core: MoECore, x: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, Step]:
        plan, capacity = core.planner(routing)
        y = expert_output(core.moe, x, plan)
        extra = stand_in_output(x, plan, core.stand_in, core.moe.num_experts)
        if extra is not None:
            y = y + extra
        return y, core.step(routing, plan, capacity, x)


class MoECore(nn.Module):
    """Stands where an MoE block stood; same input and output: hidden states (B, S, H) -> (B, S, H).

    planner: Routing -> (Plan, capacity or None). stand_in: a TokenStandIn or AssignmentStandIn
    (moe/standins.py) the plan may use. backend: LocalBackend (default) or the expert-parallel one.
    passthrough: when the planner is the identity (`full`), run the block's own experts call
    directly unless something records, so the patched model costs what the unpatched one does.
    """

    is_moe_wrapper = True  # lets find_moe_layers see the block through this wrapper

    def __init__(
        self,
        moe: MoELayer,
        planner: Planner,
        stand_in: nn.Module | None = None,
        *,
        backend: LocalBackend | None = None,
        recorder=None,
        logit_bias: torch.Tensor | None = None,
        topology: ledger.Topology | None = None,
        passthrough: bool = False,
    ):
        super().__init__()
        level_of(stand_in)  # refuses a module that is not a stand-in, naming the fix
        self.block = moe.block
        self.stand_in = stand_in
        self.moe = moe  # plain attribute (a view, not a submodule): the block is registered above
        self.planner = planner
        self.backend = backend or LocalBackend()
        self.recorder = recorder
        self.topology = topology
        self.passthrough = passthrough
        self.register_buffer("logit_bias", logit_bias, persistent=False)

    def route(self, x: torch.Tensor) -> Routing:
        """x (T, H) -> Routing, with the scenario's logit bias applied inside the router if set."""
        if self.logit_bias is None:
            return self.moe.route(x)
        with _BiasedRouterLogits(self.logit_bias):
            return self.moe.route(x)

    def exchange(self) -> tuple[str, int]:
        """(mode, row bytes) of the routing exchange this core's plans need under expert parallelism."""
        return xchg.COUNTS, 0

    def step(self, routing: Routing, plan: Plan, capacity: int | None, x: torch.Tensor) -> Step:
        mode, row_bytes = self.exchange()
        return Step(
            self.moe, routing, plan, capacity, x.element_size(), self.stand_in, self.topology, mode, row_bytes
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # (T, H)
        routing = self.route(x)
        if self.passthrough and self.recorder is None and isinstance(self.backend, LocalBackend):
            y = self.moe.experts(x, routing.indices, routing.weights)  # exactly the block's own call
        else:
            y, step = self.backend.run(self, x, routing)
            if self.recorder is not None:
                self.recorder.record(step)
        shared = self.moe.shared(x)
        if shared is not None:
            y = y + shared
        return y.reshape(shape)
