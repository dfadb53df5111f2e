"""Understudy losses: pure functions of tensors, fp32 inside, masked mean, zero-safe on an empty mask.

Layer-wise losses compare an understudy's output with the layer's routed output per token
(`(student (T, H), teacher (T, H), mask (T,) | None) -> scalar`). The end-to-end losses compare
next-token distributions (`(student_logits (..., V), teacher_logits (..., V), mask (...) | None)`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_understudy.kd.losses import forward_kl, reverse_kl
from moe_understudy.reduce import masked_mean

LAYER_LOSSES = ("mse", "cosine", "relative")
KL_DIRECTIONS = ("forward", "reverse")


def mse_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over tokens of the per-token mean squared error across the hidden dimension."""
    per_token = (student.float() - teacher.float()).pow(2).mean(dim=-1)  # (T,)
    return masked_mean(per_token, mask)


def cosine_loss(
    student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over tokens of 1 - cos(student, teacher)."""
    per_token = 1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=-1, eps=1e-8)  # (T,)
    return masked_mean(per_token, mask)


def relative_loss(
    student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Normalised MSE: sum of squared errors over sum of squared teacher outputs (over the masked tokens).

    This is also the held-out metric ("relative error"): 0 is exact, 1 is as bad as predicting zero.
    """
    s, t = student.float(), teacher.float()
    err = (s - t).pow(2).sum(dim=-1)  # (T,)
    ref = t.pow(2).sum(dim=-1)  # (T,)
    if mask is not None:
        m = mask.to(err.device, torch.float32)
        err, ref = err * m, ref * m
    return err.sum() / ref.sum().clamp_min(1e-12)


def layer_loss(
    name: str, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The layer-wise loss called `name` (one of LAYER_LOSSES)."""
    fn = {"mse": mse_loss, "cosine": cosine_loss, "relative": relative_loss}.get(name)
    if fn is None:
        raise ValueError(f"Unknown layer loss {name!r}; choose one of: {', '.join(LAYER_LOSSES)}.")
    return fn(student, teacher, mask)


def kl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    direction: str = "forward",
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-position KL between next-token distributions, masked mean over positions.

    forward: KL(teacher || student) (mean-seeking); reverse: KL(student || teacher) (mode-seeking).
    Logits (..., V); mask (...) true where the position counts.
    """
    if direction not in KL_DIRECTIONS:
        raise ValueError(f"Unknown KL direction {direction!r}; choose one of: {', '.join(KL_DIRECTIONS)}.")
    kl = forward_kl if direction == "forward" else reverse_kl
    return (
        kl(student_logits.float() / temperature, teacher_logits.float() / temperature, mask) * temperature**2
    )
