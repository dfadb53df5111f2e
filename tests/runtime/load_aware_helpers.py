from __future__ import annotations

import torch

from moe_understudy.moe.adapters import find_moe_layers
from moe_understudy.moe.presets import build_model, tiny_config


def tiny_model(family: str = "mixtral", seed: int = 0):
    """A tiny model of `family` whose routers have non-zero random weights (some families init them to 0)."""
    model = build_model(tiny_config(family), seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in find_moe_layers(model):
            w = layer.block.gate.weight
            w.copy_(torch.randn(w.shape, generator=g))
    return model


def make_ids():
    return torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(7))
