"""Put understudies in place of MoE layers' routed experts, for all tokens or a random fraction.

This is the small stand-alone substitution used for distillation and quality measurement (the
load-aware runtime in `runtime/` decides per step which tokens overflow; here the choice is
random or total). Shared experts are always computed; only the routed part is substituted.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from moe_understudy.moe.adapters import MoELayer, Routing, find_moe_layers
from moe_understudy.moe.standins import ASSIGNMENT, level_of
from moe_understudy.runtime.core import MoECore
from moe_understudy.runtime.plan import Plan, everything_to_experts, plan_of


class SubstitutedMoE(MoECore):
    """The execution core with a random planner: each token's routed output comes from the understudy
    with probability `fraction`.

    For an assignment-level stand-in the draw is per assignment (token, expert) instead of per
    token. The random draws use this wrapper's own generator, seeded at construction, so runs repeat
    exactly. The router always runs (as it would in serving): models that collect router logits for
    their auxiliary loss find them even when every token goes to the understudy.
    """

    def __init__(self, layer: MoELayer, understudy: nn.Module, fraction: float = 1.0, seed: int = 0) -> None:
        super().__init__(layer, self._plan, understudy)
        self.fraction = fraction  # set between steps by the caller; read, never written, in forward
        self.seed = seed
        self._generator: torch.Generator | None = None

    @property
    def understudy(self) -> nn.Module:
        return self.stand_in

    def _draw(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """Bool mask of `shape`, true with probability `fraction`."""
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        return torch.rand(shape, generator=self._generator, device=device) < self.fraction

    def rng_state(self) -> torch.Tensor | None:
        """State of the substitution draws (None before the first draw), for checkpoints."""
        return None if self._generator is None else self._generator.get_state()

    def set_rng_state(self, state: torch.Tensor | None, device: torch.device) -> None:
        """Continue the substitution draws from a `rng_state()` taken earlier."""
        if state is None:
            self._generator = None
            return
        self._generator = torch.Generator(device=device)
        self._generator.set_state(state)

    def _plan(self, routing: Routing) -> tuple[Plan, None]:
        idx, w = routing.indices, routing.weights
        if level_of(self.stand_in) == ASSIGNMENT:
            served = torch.ones_like(idx, dtype=torch.bool)
            if self.fraction < 1.0:
                served = self._draw(tuple(idx.shape), idx.device)  # (T, k) assignments served by stand-ins
            return plan_of(idx, w, ~served, shadow_served=served), None
        if self.fraction <= 0.0:
            return everything_to_experts(idx, w), None
        tokens = torch.ones(idx.shape[0], dtype=torch.bool, device=idx.device)
        if self.fraction < 1.0:
            tokens = self._draw((idx.shape[0],), idx.device)  # (T,) tokens served by the understudy
        return plan_of(idx, w, ~tokens[:, None].expand_as(idx), understudy_tokens=tokens), None


@contextmanager
def substituted(
    model: nn.Module, understudies: dict[int, nn.Module], fraction: float = 1.0, seed: int = 0
) -> Iterator[list[SubstitutedMoE]]:
    """Within the block, every MoE layer with an understudy is wrapped; the model is restored after.

    Yields the wrappers (so a caller can change `.fraction` between steps).
    """
    layers = [ly for ly in find_moe_layers(model) if ly.index in understudies]
    wrappers = []
    try:
        for ly in layers:
            w = SubstitutedMoE(ly, understudies[ly.index], fraction=fraction, seed=seed + ly.index)
            ly.replace(w)
            wrappers.append(w)
        yield wrappers
    finally:
        for ly in layers:
            ly.restore()
