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

from moe_understudy.moe.adapters import MoELayer, find_moe_layers
from moe_understudy.understudy.modules import Shadows


class SubstitutedMoE(nn.Module):
    """Wraps one MoE block: each token's routed output comes from the understudy with probability `fraction`.

    For `Shadows` the draw is per assignment (token, expert) instead of per token. The random draws
    use this wrapper's own generator, seeded at construction, so runs repeat exactly.
    """

    is_moe_wrapper = True  # find_moe_layers looks through this wrapper to the original block

    def __init__(self, layer: MoELayer, understudy: nn.Module, fraction: float = 1.0, seed: int = 0) -> None:
        super().__init__()
        self.block = layer.block
        self.understudy = understudy
        self.moe = layer
        self.fraction = fraction  # set between steps by the caller; read, never written, in forward
        self.seed = seed
        self._generator: torch.Generator | None = None

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

    def routed(self, x: torch.Tensor) -> torch.Tensor:
        """x (T, H) -> (T, H) routed output with the substitution applied."""
        if isinstance(self.understudy, Shadows):
            r = self.moe.route(x)
            if self.fraction >= 1.0:
                return self.understudy(x, r.indices, r.weights)
            shadow = self._draw(tuple(r.indices.shape), x.device)  # (T, k) assignments served by shadows
            none = torch.full_like(r.indices, self.moe.num_experts)
            by_expert = self.moe.experts(x, torch.where(shadow, none, r.indices), r.weights)
            return by_expert + self.understudy(x, torch.where(shadow, r.indices, none), r.weights)
        # The router always runs (as it would in serving): models that collect router logits for
        # their auxiliary loss find them even when every token goes to the understudy.
        r = self.moe.route(x)
        if self.fraction >= 1.0:
            return self.understudy(x)
        if self.fraction <= 0.0:
            return self.moe.experts(x, r.indices, r.weights)
        sub = self._draw((x.shape[0],), x.device)  # (T,) tokens served by the understudy
        skip = torch.full_like(r.indices, self.moe.num_experts)
        out = self.moe.experts(x, torch.where(sub[:, None], skip, r.indices), r.weights)
        rows = torch.where(sub)[0]
        return out.index_add(0, rows, self.understudy(x[rows]).to(out.dtype)) if rows.numel() else out

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # (B*S, H)
        y = self.routed(x)
        shared = self.moe.shared(x)
        return (y if shared is None else y + shared).reshape(shape)


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
