"""Distillation losses as pure functions of tensors.

Conventions shared by every function here:
- logits are upcast to fp32 inside; inputs are never modified;
- token losses are reduced with `masked_mean`, the one masked-mean helper; an empty mask gives an
  exact zero that still carries a gradient path (so `loss.backward()` works on a batch with no
  response tokens);
- `p` is the teacher distribution, `q` the student's, over the last dimension.

Divergences (per token, summed over the vocabulary / experts):
- forward KL   KL(p || q) = sum p (log p - log q)            (mode covering, classic KD)
- reverse KL   KL(q || p) = sum q (log q - log p)            (mode seeking, MiniLLM / GKD / EEM)
- skew forward KL (DistiLLM)  KL(p || a p + (1-a) q),  a = 0.1
- skew reverse KL (DistiLLM)  KL(q || a q + (1-a) p),  a = 0.1
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from moe_understudy.reduce import masked_mean


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """(..., V) fp32 log-softmax of logits."""
    return F.log_softmax(logits.float(), dim=-1)


def kl_from_log_probs(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Per-position KL(a || b) = sum a (log a - log b); (..., V) -> (...). Zero-probability terms drop."""
    a = log_a.exp()
    return torch.where(a > 0, a * (log_a - log_b), torch.zeros_like(a)).sum(-1)


def forward_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """KL(p_teacher || q_student) per token, masked mean. logits: (..., V), mask: (...)."""
    return masked_mean(kl_from_log_probs(log_probs(teacher_logits), log_probs(student_logits)), mask)


def reverse_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """KL(q_student || p_teacher) per token, masked mean. logits: (..., V), mask: (...)."""
    return masked_mean(kl_from_log_probs(log_probs(student_logits), log_probs(teacher_logits)), mask)


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, alpha: float) -> torch.Tensor:
    """log(alpha * a + (1 - alpha) * b), computed stably in log space."""
    if alpha <= 0.0:
        return log_b
    if alpha >= 1.0:
        return log_a
    return torch.logaddexp(log_a + math.log(alpha), log_b + math.log1p(-alpha))


def skew_forward_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    alpha: float = 0.1,
) -> torch.Tensor:
    """DistiLLM skew KL: KL(p || alpha p + (1 - alpha) q); alpha = 0 is forward KL."""
    log_p, log_q = log_probs(teacher_logits), log_probs(student_logits)
    return masked_mean(kl_from_log_probs(log_p, _log_mix(log_p, log_q, alpha)), mask)


def skew_reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    alpha: float = 0.1,
) -> torch.Tensor:
    """DistiLLM skew reverse KL: KL(q || alpha q + (1 - alpha) p); alpha = 0 is reverse KL. It is the skew
    forward KL with the two distributions' roles exchanged."""
    return skew_forward_kl(teacher_logits, student_logits, mask, alpha)


DIVERGENCES = {
    "fkl": forward_kl,
    "rkl": reverse_kl,
    "skew_fkl": skew_forward_kl,
    "skew_rkl": skew_reverse_kl,
}


def divergence(
    name: str, student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Dispatch by name: one of fkl, rkl, skew_fkl, skew_rkl (skews use DistiLLM's 0.1)."""
    if name not in DIVERGENCES:
        raise ValueError(f"Unknown divergence {name!r}; choose one of {', '.join(DIVERGENCES)}.")
    return DIVERGENCES[name](student_logits, teacher_logits, mask)


def averaged_divergence(
    name: str,
    student_logits: torch.Tensor,
    teacher_logits: Sequence[torch.Tensor],
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over M teacher passes of `divergence(name, student, teacher_m)`: KA's one objective per step.

    This averages the M *losses* (not the M teacher distributions), as EEM's public code does
    (finetune.py / finetune_gkd.py: `distil_loss += ...` per repeat, then `distil_loss /= num_repeats`,
    one backward). For forward KL this has the same gradient as KL(mean_m p_m || q); for reverse KL
    it equals KL(q || g) up to a constant, g the normalised geometric mean of the p_m, which is not
    the same as matching the averaged distribution.
    """
    if not teacher_logits:
        raise ValueError("averaged_divergence needs at least one teacher pass.")
    total = divergence(name, student_logits, teacher_logits[0], mask)
    for t in teacher_logits[1:]:
        total = total + divergence(name, student_logits, t, mask)
    return total / len(teacher_logits)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of next-token `labels` (B, S) under `logits` (B, S, V) where `mask` (B, S) is set."""
    nll = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)
    return masked_mean(nll, mask)


# ---- router losses --------------------------------------------------------------------------


def router_kl(
    student_router_logits: torch.Tensor, teacher_router_logits: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """KL(p_teacher_router || q_student_router) per token; logits (T, E), mask (T,)."""
    return forward_kl(student_router_logits, teacher_router_logits, mask)


def router_entropy(router_logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean per-token entropy (nats) of the router softmax; logits (T, E), mask (T,)."""
    log_p = log_probs(router_logits)
    return masked_mean(-(log_p.exp() * log_p).sum(-1), mask)


def entropy_floor_penalty(
    router_logits: torch.Tensor, floor: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean of relu(floor - H_t)^2 over tokens: penalises only routers more concentrated than `floor` nats."""
    log_p = log_probs(router_logits)
    h = -(log_p.exp() * log_p).sum(-1)
    return masked_mean(torch.relu(floor - h) ** 2, mask)


def _cv_squared(x: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation var(x) / mean(x)^2 (population variance); 0 for constant x."""
    x = x.float()
    mean = x.mean()
    return x.var(unbiased=False) / (mean * mean + 1e-10)


def router_probs(router_logits: torch.Tensor, scores: str = "softmax") -> torch.Tensor:
    """(T, E) fp32 expert probabilities under the router's own scoring function.

    "softmax" (Mixtral, Qwen-MoE, ...) or "sigmoid" (DeepSeek-V3: sigmoid scores normalised to sum 1
    per token); the same numbers as `moe.adapters.Routing.probs()` for a Routing with that `scores`.
    """
    if scores == "sigmoid":
        s = torch.sigmoid(router_logits.float())
        return s / s.sum(-1, keepdim=True).clamp_min(1e-20)
    if scores == "softmax":
        return torch.softmax(router_logits.float(), dim=-1)
    raise ValueError(f"Unknown router scores {scores!r}; choose softmax or sigmoid.")


def load_balancing_loss(
    router_logits: torch.Tensor,
    indices: torch.Tensor,
    mask: torch.Tensor | None = None,
    scores: str = "softmax",
) -> torch.Tensor:
    """CV(tokens per expert)^2 + CV(summed gate probability per expert)^2 (Shazeer et al. 2017, EEM SAR).

    router_logits: (T, E); indices: (T, k) experts chosen per token; mask: (T,) tokens that count;
    scores: the router's own scoring function (`router_probs`): "sigmoid" for DeepSeek-V3, else
    "softmax". The token-count term has no gradient (counts are discrete); the probability term carries it.
    """
    num_experts = router_logits.shape[-1]
    probs = router_probs(router_logits, scores)
    keep = (
        torch.ones(probs.shape[0], dtype=probs.dtype, device=probs.device) if mask is None else mask.to(probs)
    )
    if keep.sum().item() == 0:
        return (router_logits.float() * 0.0).sum()
    importance = (probs * keep[:, None]).sum(0)  # (E,)
    counts = torch.zeros(num_experts, dtype=probs.dtype, device=probs.device)
    chosen = indices.clamp_max(num_experts - 1)
    weights = keep[:, None].expand_as(indices) * (indices < num_experts).to(probs)
    counts.index_add_(0, chosen.reshape(-1), weights.reshape(-1))
    return _cv_squared(counts) + _cv_squared(importance)
