"""The load-aware MoE layer: route -> plan -> execute -> record, wrapped around a transformers block.

`patch(model, understudies, policy=..., capacity_factor=...)` puts a `LoadAwareMoE` in place of
every MoE block (through the adapters, so every supported family works) and returns a
`PatchedModel` handle; `unpatch(model)` (or the handle) puts the original blocks back.

Execution reuses the block's own pieces: its router, its experts call (assignments not served by an
expert are masked with index E, which the experts skip), its shared experts (always added, they are
local). Under `full` with no recorder the layer does exactly what the block does, nothing more, so
the patched model matches the unpatched one and costs the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from moe_understudy.config import RuntimeConfig
from moe_understudy.errors import UserError
from moe_understudy.moe.adapters import MoELayer, Routing, find_moe_layers
from moe_understudy.runtime.policies import (
    NEEDS_SHADOWS,
    NEEDS_UNDERSTUDY,
    Plan,
    capacity_holders,
    expert_capacity,
    plan_routing,
)
from moe_understudy.runtime.stats import LoadRecorder


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


def _call_on(
    experts, x: torch.Tensor, mask: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Weighted output (T, H) of `experts(x, indices, weights)` over the assignments in `mask` (T, k) only.

    The selected assignments are compacted into rows of one assignment each, (A, H) with (A, 1)
    indices, so no skip index is needed: transformers' default `grouped_mm` experts leave rows
    with index E uninitialised instead of skipping them. Only selected assignments are computed.
    """
    if bool(mask.all()):
        return experts(x, indices, weights.to(x.dtype))
    token, slot = mask.nonzero(as_tuple=True)  # (A,), (A,)
    y = torch.zeros_like(x)
    if token.numel() == 0:
        return y
    rows = experts(x[token], indices[token, slot, None], weights[token, slot, None].to(x.dtype))  # (A, H)
    return y.index_add(0, token, rows.to(y.dtype))


class LoadAwareMoE(nn.Module):
    """Stands where an MoE block stood; same input and output: hidden states (B, S, H) -> (B, S, H).

    `understudy` is the layer's stand-in: a module x (T, H) -> (T, H) approximating the routed output
    (policies understudy / layer / deadline), or a shadows module with
    ``forward(x, indices, weights)`` like the experts (policy shadow).
    """

    is_moe_wrapper = True  # lets find_moe_layers see the block through this wrapper

    def __init__(
        self,
        moe: MoELayer,
        config: RuntimeConfig,
        understudy: nn.Module | None = None,
        recorder: LoadRecorder | None = None,
        logit_bias: torch.Tensor | None = None,
    ):
        super().__init__()
        self.block = moe.block
        self.understudy = understudy
        self.moe = moe  # plain attribute (a view, not a submodule): the block is registered above
        self.config = config
        self.recorder = recorder
        self.register_buffer("logit_bias", logit_bias, persistent=False)

    def extra_repr(self) -> str:
        c = self.config
        return f"layer={self.moe.index}, policy={c.policy}, capacity_factor={c.capacity_factor}, priority={c.priority}"

    # --- route -> plan -> execute -------------------------------------------------------------
    def route(self, x: torch.Tensor) -> Routing:
        """x (T, H) -> Routing, with the scenario's logit bias applied inside the router if set."""
        if self.logit_bias is None:
            return self.moe.route(x)
        with _BiasedRouterLogits(self.logit_bias):
            return self.moe.route(x)

    def capacity_groups(self) -> torch.Tensor:
        """(E,) rank of each expert, for capacity per rank; only expert parallelism has ranks."""
        raise UserError(
            "capacity_scope 'rank' needs expert parallelism (understudy ep, or evaluate --ep N); "
            "use capacity_scope 'expert' in one process."
        )

    def plan(self, routing: Routing) -> tuple[Plan, int | None]:
        """The policy's plan for this step and the capacity it used (None under `full`)."""
        c = self.config
        if c.policy == "full":
            return plan_routing(routing, "full", 0), None
        groups = self.capacity_groups().to(routing.indices.device) if c.capacity_scope == "rank" else None
        holders = capacity_holders(routing.num_experts, groups)
        capacity = expert_capacity(routing.indices.shape[0], routing.top_k, holders, c.capacity_factor)
        plan = plan_routing(routing, c.policy, capacity, c.priority, groups=groups, **c.policy_kwargs())
        return plan, capacity

    def execute(self, x: torch.Tensor, plan: Plan) -> torch.Tensor:
        """Routed output (T, H) of `plan`: experts, shadows and understudy each on their share."""
        # Deadline: the understudy runs first for every token (in a real system it overlaps dispatch).
        upfront = self.understudy(x) if self.config.policy == "deadline" else None
        y = _call_on(self.moe.experts, x, plan.expert_served, plan.indices, plan.weights)
        if plan.shadow_served.any():
            y = y + _call_on(self.understudy, x, plan.shadow_served, plan.indices, plan.weights)
        tokens = plan.understudy_tokens.nonzero().squeeze(1)
        if tokens.numel():
            u = upfront[tokens] if upfront is not None else self.understudy(x[tokens])
            y = y.index_add(0, tokens, u.to(y.dtype))  # these tokens got nothing from the experts
        return y

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # (T, H)
        routing = self.route(x)
        if self.config.policy == "full" and self.recorder is None:
            y = self.moe.experts(x, routing.indices, routing.weights)  # exactly the block's own call
        else:
            plan, capacity = self.plan(routing)
            y = self.execute(x, plan)
            if self.recorder is not None:
                self.recorder.record(
                    self.moe.index, routing, plan, capacity, self.moe.hidden_size, x.element_size()
                )
        shared = self.moe.shared(x)
        if shared is not None:
            y = y + shared
        return y.reshape(shape)


@dataclass
class PatchedModel:
    """Handle on a patched model: change the policy between steps, then `unpatch` (or use `with`)."""

    model: nn.Module
    layers: list[LoadAwareMoE] = field(default_factory=list)

    def configure(
        self,
        recorder: LoadRecorder | None | type[Ellipsis] = ...,
        logit_bias: torch.Tensor | dict[int, torch.Tensor] | None | type[Ellipsis] = ...,
        **config_changes,
    ) -> PatchedModel:
        """Replace RuntimeConfig fields (policy=..., capacity_factor=...) and/or the recorder/bias on every layer."""
        for wrapper in self.layers:
            if config_changes:
                new = wrapper.config.replace(**config_changes)
                _check_stand_in(new.policy, wrapper.moe, wrapper.understudy)
                wrapper.config = new
            if recorder is not ...:
                wrapper.recorder = recorder
            if logit_bias is not ...:
                wrapper.logit_bias = _bias_for(logit_bias, wrapper.moe)
        return self

    def unpatch(self) -> nn.Module:
        unpatch(self.model)
        return self.model

    def __enter__(self) -> PatchedModel:
        return self

    def __exit__(self, *exc) -> None:
        self.unpatch()


def _bias_for(logit_bias, moe: MoELayer) -> torch.Tensor | None:
    bias = logit_bias.get(moe.index) if isinstance(logit_bias, dict) else logit_bias
    if bias is not None and bias.shape != (moe.num_experts,):
        raise UserError(
            f"logit bias for layer {moe.index} has shape {tuple(bias.shape)}, expected ({moe.num_experts},); "
            f"pass one value per expert."
        )
    return bias


def _check_stand_in(policy: str, moe: MoELayer, module: nn.Module | None) -> None:
    if policy in NEEDS_UNDERSTUDY and module is None:
        raise UserError(
            f"Policy {policy!r} needs an understudy for MoE layer {moe.index}, but none was given; "
            f"pass understudies from `understudy distill` (--understudies DIR)."
        )
    if policy in NEEDS_SHADOWS and not hasattr(module, "per_assignment"):
        raise UserError(
            f"Policy 'shadow' needs per-expert shadows for MoE layer {moe.index}; "
            f"distil them with `understudy distill --arch shadows` and pass that folder."
        )
    if policy in NEEDS_UNDERSTUDY and hasattr(module, "per_assignment"):
        raise UserError(
            f"Policy {policy!r} needs a whole-layer understudy for MoE layer {moe.index}, but got shadows; "
            f"use policy 'shadow' with shadows, or pass dense/lowrank/merged/small_moe understudies."
        )


def patch(
    model: nn.Module,
    understudies: dict[int, nn.Module] | None = None,
    policy: str = "full",
    capacity_factor: float = 1.0,
    priority: str = "position",
    recorder: LoadRecorder | None = None,
    logit_bias: torch.Tensor | dict[int, torch.Tensor] | None = None,
    config: RuntimeConfig | None = None,
    **policy_options,
) -> PatchedModel:
    """Wrap every MoE block of `model` in a LoadAwareMoE; returns the handle.

    understudies: stand-in per MoE layer index (None: only policies full/drop/drop_renorm/reroute
    work). `config` overrides policy/capacity_factor/priority/policy_options when given.
    logit_bias: (E,) added to every layer's router logits, or {layer index: (E,)} (hot expert).
    """
    if config is None:
        config = RuntimeConfig(
            policy=policy, capacity_factor=capacity_factor, priority=priority, **policy_options
        )
    unpatch(model)
    understudies = understudies or {}
    handle = PatchedModel(model)
    layers = find_moe_layers(model)
    unknown = sorted(set(understudies) - {m.index for m in layers})
    if unknown:
        raise UserError(
            f"Understudies were given for layers {unknown}, which are not MoE layers of this model "
            f"(MoE layers: {[m.index for m in layers]}); pass the understudies distilled for this model."
        )
    for moe in layers:
        stand_in = understudies.get(moe.index)
        _check_stand_in(config.policy, moe, stand_in)
        wrapper = LoadAwareMoE(moe, config, stand_in, recorder, _bias_for(logit_bias, moe))
        moe.replace(wrapper)
        handle.layers.append(wrapper)
    return handle


def unpatch(model: nn.Module) -> nn.Module:
    """Put every original MoE block back (no-op on an unpatched model)."""
    for moe in find_moe_layers(model):
        if isinstance(getattr(moe.parent, moe.attr), LoadAwareMoE):
            moe.restore()
    return model
