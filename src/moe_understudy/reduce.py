"""The one masked-mean reduction shared by losses and metrics (kd/, understudy/, eval/)."""

from __future__ import annotations

import torch


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 mean of `values` over positions where `mask` (same shape, bool or 0/1) is set.

    No mask means every position. An empty mask (or empty `values`) gives an exact zero that still
    carries a gradient path, never NaN, and without a host sync.
    """
    values = values.float()
    weights = torch.ones_like(values) if mask is None else mask.to(values.device, torch.float32)
    return (values * weights).sum() / weights.sum().clamp_min(1.0)
