"""Tiny seeded models shared by the understudy tests (hidden 32, 4 experts of 32, top-2)."""

from __future__ import annotations

import pytest
import torch

from moe_understudy.moe.adapters import find_moe_layers
from moe_understudy.moe.presets import build_model, tiny_config

# Tiny tensors: one thread is fastest, and on a shared machine extra threads only wait for cores.
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_model(tiny_config("mixtral"), seed=0)


@pytest.fixture(scope="module")
def tiny_layer(tiny_model):
    return find_moe_layers(tiny_model)[0]


def _routed_rows(layer, n: int = 256, seed: int = 0) -> dict[str, torch.Tensor]:
    """Captured-style rows {x, y, logits, indices, weights} of `layer` on random inputs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, layer.hidden_size, generator=g)
    with torch.no_grad():
        r = layer.route(x)
        y = layer.experts(x, r.indices, r.weights)
    return {"x": x, "y": y, "logits": r.logits, "indices": r.indices, "weights": r.weights}


@pytest.fixture
def routed_rows():
    """routed_rows(layer, n=256, seed=0) -> captured-style rows of `layer` on random inputs."""
    return _routed_rows
