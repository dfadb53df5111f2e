"""Quality metrics as pure functions of logits (fp32 inside), and the one model perplexity over blocks.

Shapes: logits (N, V) over N predicted positions, targets (N,).
`next_token_view` turns a causal LM's (B, S, V) logits and (B, S) ids into that form.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moe_understudy.kd.losses import kl_from_log_probs, log_probs


def next_token_view(logits: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, S, V) logits, (B, S) ids -> (B*(S-1), V) logits predicting (B*(S-1),) next-token targets."""
    V = logits.shape[-1]
    return logits[:, :-1].reshape(-1, V), input_ids[:, 1:].reshape(-1)


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N,) fp32 negative log-likelihood of each target."""
    return F.cross_entropy(logits.float(), targets, reduction="none")


@torch.no_grad()
def perplexity(model: nn.Module, blocks: torch.Tensor, batch_size: int = 16) -> float:
    """exp(mean next-token cross-entropy) of `model` over token blocks (N, S), in batches."""
    if blocks.dim() != 2 or blocks.shape[0] == 0 or blocks.shape[1] < 2:
        from moe_understudy.errors import UserError

        raise UserError(
            f"No text to score: perplexity needs (N >= 1, S >= 2) token blocks, got {tuple(blocks.shape)}; "
            f"pass more text (--data) or a smaller block size."
        )
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        ids = blocks[start : start + batch_size].to(device)
        total += token_nll(*next_token_view(model(input_ids=ids).logits, ids)).sum().item()
        count += ids[:, 1:].numel()
    model.train(was_training)
    return math.exp(total / max(1, count))


def kl_per_token(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """(N,) KL(reference || other) in nats between the two next-token distributions at each position."""
    return kl_from_log_probs(log_probs(reference_logits), log_probs(logits))


def top1_agreement(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """(N,) bool: both pick the same most likely next token."""
    return reference_logits.argmax(-1) == logits.argmax(-1)
