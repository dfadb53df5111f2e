"""The load-aware runtime: the execution core configured by a `RuntimeConfig` (policy x capacity).

`patch(model, understudies, policy=..., capacity_factor=...)` puts a `LoadAwareMoE` in place of
every MoE block (through the adapters, so every supported family works) and returns a
`PatchedModel` handle; `unpatch(model)` (or the handle) puts the original blocks back.

A `LoadAwareMoE` is a `MoECore` whose planner is the configured policy over the step's tokens:
capacity ceil(cf * T * k / E) per expert (or per rank), admission by priority, overflow to the
policy. Under `full` with no recorder the core runs the block's own experts call and nothing
more, so the patched model matches the unpatched one and costs the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from moe_understudy.config import RuntimeConfig
from moe_understudy.errors import UserError
from moe_understudy.moe.adapters import MoELayer, Routing, find_moe_layers
from moe_understudy.moe.standins import ASSIGNMENT, TOKEN, level_of
from moe_understudy.runtime import exchange as xchg
from moe_understudy.runtime.admission import capacity_holders, expert_capacity
from moe_understudy.runtime.core import MoECore
from moe_understudy.runtime.ledger import LoadRecorder, Topology
from moe_understudy.runtime.plan import Plan, everything_to_experts
from moe_understudy.runtime.policies import (
    EXPANDED,
    NEEDS_SHADOWS,
    NEEDS_UNDERSTUDY,
    expanded_candidates,
    plan_routing,
)


class LoadAwareMoE(MoECore):
    """The core under a `RuntimeConfig`; `understudy` is the layer's stand-in (either kind)."""

    def __init__(
        self,
        moe: MoELayer,
        config: RuntimeConfig,
        understudy: nn.Module | None = None,
        recorder: LoadRecorder | None = None,
        logit_bias: torch.Tensor | None = None,
        topology: Topology | None = None,
        backend=None,
    ):
        topology = topology or Topology.contiguous(moe.num_experts, config.num_devices)
        super().__init__(
            moe,
            self.plan,
            understudy,
            backend=backend,
            recorder=recorder,
            logit_bias=logit_bias,
            topology=topology,
        )
        self.config = config

    @property
    def config(self) -> RuntimeConfig:
        return self._config

    @config.setter
    def config(self, value: RuntimeConfig) -> None:
        self._config = value
        self.passthrough = value.policy == "full"

    @property
    def understudy(self) -> nn.Module | None:
        return self.stand_in

    def extra_repr(self) -> str:
        c = self.config
        return f"layer={self.moe.index}, policy={c.policy}, capacity_factor={c.capacity_factor}, priority={c.priority}"

    def capacity_groups(self) -> torch.Tensor:
        """(E,) rank of each expert, for capacity per rank; only expert parallelism has ranks."""
        groups = getattr(self.backend, "capacity_groups", None)
        if groups is None:
            raise UserError(
                "capacity_scope 'rank' needs expert parallelism (understudy ep, or evaluate --ep N); "
                "use capacity_scope 'expert' in one process."
            )
        return groups()

    def groups(self, device: torch.device) -> torch.Tensor | None:
        return self.capacity_groups().to(device) if self.config.capacity_scope == "rank" else None

    def capacity(self, num_tokens: int, groups: torch.Tensor | None) -> int:
        holders = capacity_holders(self.moe.num_experts, groups)
        return expert_capacity(num_tokens, self.moe.top_k, holders, self.config.capacity_factor)

    def candidates(self, routing: Routing, token_device: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Expanded policies' local candidates for tokens living on `token_device` (T,)."""
        return expanded_candidates(routing, self.config.expanded_m, token_device, self.topology.expert_device)

    def plan(self, routing, candidates=None, **known) -> tuple[Plan, int | None]:
        """The policy's plan for this step and the capacity it used (None under `full`).

        `candidates` and `known` (places, holder_load, alternatives) come precomputed from the
        expert-parallel exchange; in one process everything is computed from `routing`.
        """
        c = self.config
        if c.policy == "full":
            return everything_to_experts(routing.indices, routing.weights), None
        groups = self.groups(routing.indices.device)
        capacity = self.capacity(known.pop("num_tokens", routing.indices.shape[0]), groups)
        if c.policy in EXPANDED and candidates is None:
            candidates = self.candidates(routing, self.topology.token_device(routing.indices.shape[0]))
        plan = plan_routing(
            routing,
            c.policy,
            capacity,
            c.priority,
            groups=groups,
            candidates=candidates,
            **c.policy_kwargs(),
            **known,
        )
        return plan, capacity

    def exchange(self) -> tuple[str, int]:
        c, moe = self.config, self.moe
        mode = xchg.exchange_mode(c.policy, c.priority, c.capacity_scope)
        weight_dtype = moe.block.gate.weight.dtype
        layout = xchg.row_layout(c.policy, moe.num_experts, moe.top_k, weight_dtype, c.expanded_m)
        return mode, (0 if mode == xchg.COUNTS else xchg.row_bytes(layout))


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
                check_stand_in(new.policy, wrapper.moe, wrapper.understudy)
                if new.num_devices != wrapper.config.num_devices:
                    wrapper.topology = Topology.contiguous(wrapper.moe.num_experts, new.num_devices)
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


def check_stand_in(policy: str, moe: MoELayer, module: nn.Module | None) -> None:
    """Refuse, in one sentence, a policy whose stand-in is missing or of the wrong kind."""
    kind = level_of(module)
    if policy in NEEDS_UNDERSTUDY and kind is None:
        raise UserError(
            f"Policy {policy!r} needs an understudy for MoE layer {moe.index}, but none was given; "
            f"pass understudies from `understudy distill` (--understudies DIR)."
        )
    if policy in NEEDS_SHADOWS and kind != ASSIGNMENT:
        raise UserError(
            f"Policy {policy!r} needs an assignment-level stand-in (per-expert shadows or a gated trunk) "
            f"for MoE layer {moe.index}; distil one with `understudy distill --arch shadows` (or trunk) "
            f"and pass that folder."
        )
    if policy in NEEDS_UNDERSTUDY and kind != TOKEN:
        raise UserError(
            f"Policy {policy!r} needs a whole-token understudy for MoE layer {moe.index}, but got an "
            f"assignment-level stand-in; use policy 'shadow' with it, or pass dense/lowrank/merged/small_moe "
            f"understudies."
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

    understudies: stand-in per MoE layer index (None: only policies full/drop/drop_renorm/reroute/
    expanded_drop work). `config` overrides policy/capacity_factor/priority/policy_options when
    given. logit_bias: (E,) added to every layer's router logits, or {layer index: (E,)} (hot expert).
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
        check_stand_in(config.policy, moe, stand_in)
        wrapper = LoadAwareMoE(moe, config, stand_in, recorder, _bias_for(logit_bias, moe))
        moe.replace(wrapper)
        handle.layers.append(wrapper)
    return handle


def unpatch(model: nn.Module) -> nn.Module:
    """Put every original MoE block back (no-op on an unpatched model)."""
    for moe in find_moe_layers(model):
        if isinstance(getattr(moe.parent, moe.attr), MoECore):
            moe.restore()
    return model
