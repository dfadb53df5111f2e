from __future__ import annotations

import torch

from moe_understudy.moe.adapters import MoELayer, find_moe_layers
from moe_understudy.moe.presets import build_model, tiny_config
from moe_understudy.moe.standins import TokenStandIn


def tiny_model(
    family: str = "mixtral", seed: int = 0, vocab_size: int | None = None, routed_gain: float = 1.0
):
    """A tiny model of `family` whose routers have non-zero random weights (some families init them to 0);
    `routed_gain` scales the experts' down projections, so that the routed part matters next to the residual."""
    model = build_model(tiny_config(family, **({"vocab_size": vocab_size} if vocab_size else {})), seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in find_moe_layers(model):
            w = layer.block.gate.weight
            w.copy_(torch.randn(w.shape, generator=g))
            if routed_gain != 1.0:
                layer.block.experts.down_proj.mul_(routed_gain)
    return model


class CopyOfLayer(TokenStandIn):
    """An understudy that is exactly the layer's routed part (router + experts)."""

    def __init__(self, moe: MoELayer):
        super().__init__(moe.hidden_size)
        self.moe = moe

    def forward(self, x):
        r = self.moe.route(x)
        return self.moe.experts(x, r.indices, r.weights)

    def flops_per_token(self) -> int:
        return self.moe.active_expert_flops_per_token()


def make_ids():
    return torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(7))
