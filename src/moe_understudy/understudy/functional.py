"""The two building blocks every stand-in module shares: the SwiGLU MLP and its weight init."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """x (T, H), gate_up (2I, H), down (H, I) -> (T, H): down(silu(gate x) * up x)."""
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)  # (T, I) each
    return F.linear(F.silu(gate) * up, down)


def init_linear(weight: torch.Tensor, fan_in: int, scale: float = 1.0) -> None:
    """Normal init with std scale / sqrt(fan_in), in place."""
    nn.init.normal_(weight, std=scale / math.sqrt(fan_in))
