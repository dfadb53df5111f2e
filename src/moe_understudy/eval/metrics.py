"""Quality metrics as pure functions of logits: fp32 inside, masked means, safe on an empty mask.

Shapes: logits (N, V) over N predicted positions, targets (N,), mask (N,) bool (None = all).
`next_token_view` turns a causal LM's (B, S, V) logits and (B, S) ids into that form.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_understudy.kd.losses import kl_from_log_probs, log_probs
from moe_understudy.reduce import masked_mean


def next_token_view(logits: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, S, V) logits, (B, S) ids -> (B*(S-1), V) logits predicting (B*(S-1),) next-token targets."""
    V = logits.shape[-1]
    return logits[:, :-1].reshape(-1, V), input_ids[:, 1:].reshape(-1)


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N,) fp32 negative log-likelihood of each target."""
    return F.cross_entropy(logits.float(), targets, reduction="none")


def perplexity(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """exp(masked mean NLL); 1 on an empty mask."""
    return torch.exp(masked_mean(token_nll(logits, targets), mask))


def kl_per_token(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """(N,) KL(reference || other) in nats between the two next-token distributions at each position."""
    return kl_from_log_probs(log_probs(reference_logits), log_probs(logits))


def top1_agreement(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """(N,) bool: both pick the same most likely next token."""
    return reference_logits.argmax(-1) == logits.argmax(-1)
