"""Quality metrics as pure functions of logits (fp32 inside), and the one model perplexity over blocks.

Shapes: logits (N, V) over N predicted positions, targets (N,).
`next_token_view` turns a causal LM's (B, S, V) logits and (B, S) ids into that form.
"""

from __future__ import annotations

import math
from typing import Any

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


def ratio_interval(
    numerators: torch.Tensor, denominators: torch.Tensor, level: float = 0.95, reps: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile-bootstrap interval of sum(numerators) / sum(denominators), resampling the units
    (batches, sequences) whose sums they are, with replacement; seeded, so a rerun gives the same."""
    if numerators.shape != denominators.shape or numerators.dim() != 1 or numerators.numel() == 0:
        from moe_understudy.errors import UserError

        raise UserError(
            f"An interval needs one sum and one count per unit (batch or sequence), got shapes "
            f"{tuple(numerators.shape)} and {tuple(denominators.shape)}."
        )
    pick = bootstrap_picks(numerators.numel(), reps, seed)
    ratio = numerators.double()[pick].sum(1) / denominators.double()[pick].sum(1)
    return central_interval(ratio, level)


def bootstrap_picks(units: int, reps: int, seed: int) -> torch.Tensor:
    """(reps, units) indices of `reps` resamples of `units` units with replacement; seeded, so every
    interval drawn with one seed resamples the same batches."""
    return torch.randint(units, (reps, units), generator=torch.Generator().manual_seed(seed))


def central_interval(values: torch.Tensor, level: float) -> tuple[float, float]:
    """The central `level` percentile interval of bootstrap `values` (float64)."""
    tail = (1.0 - level) / 2
    low, high = torch.quantile(values, torch.tensor([tail, 1.0 - tail], dtype=torch.float64))
    return float(low), float(high)


def paired_ppl_delta(nll: torch.Tensor, reference_nll: torch.Tensor, counts: torch.Tensor) -> float:
    """Perplexity change in % of a system against the reference on the same batches: exp of the
    pooled NLL gap per predicted position, minus 1 (the point `paired_ppl_delta_interval` brackets)."""
    gap = (nll.double() - reference_nll.double()).sum() / counts.double().sum()
    return 100.0 * math.expm1(float(gap))


def paired_ppl_delta_interval(
    nll: torch.Tensor, reference_nll: torch.Tensor, counts: torch.Tensor, **bootstrap: Any
) -> tuple[float, float]:
    """95% interval of the perplexity change in % (exp of the mean NLL gap, minus 1) of a system
    against the reference scored on the same batches.

    nll, reference_nll, counts (B,): each batch's summed NLL under the system and the reference, and
    its predicted positions. Batches, not tokens, are resampled: capacity and so overflow are per
    batch, and both systems are resampled together (paired), so what the interval shows is the
    spread of the gap between held-out samples, not of either perplexity alone.
    """
    if nll.shape != reference_nll.shape:
        from moe_understudy.errors import UserError

        raise UserError(
            f"A paired interval needs one NLL sum per batch from each system, got shapes "
            f"{tuple(nll.shape)} and {tuple(reference_nll.shape)}."
        )
    low, high = ratio_interval(nll.double() - reference_nll.double(), counts, **bootstrap)
    return 100.0 * math.expm1(low), 100.0 * math.expm1(high)


def mean_paired_ppl_delta(
    nll: torch.Tensor,
    reference_nll: torch.Tensor,
    counts: torch.Tensor,
    level: float = 0.95,
    reps: int = 2000,
    seed: int = 0,
) -> tuple[float, tuple[float, float]]:
    """Mean over S trainings of one recipe of each one's perplexity change in % against the
    reference, and its interval over held-out batches.

    nll (S, B): each training's summed NLL per batch; reference_nll (B,) or (S, B); counts (B,).
    The batches are resampled once for all S trainings together, so the interval is the spread of
    the mean between held-out samples; how far the trainings differ from each other is the spread
    of their own points, which the caller reports beside it.
    """
    if nll.dim() != 2 or nll.shape[1:] != counts.shape or reference_nll.shape[-1] != counts.shape[0]:
        from moe_understudy.errors import UserError

        raise UserError(
            f"A mean over trainings needs one NLL sum per training and batch, (S, B), against (B,) "
            f"counts, got shapes {tuple(nll.shape)}, {tuple(reference_nll.shape)} and {tuple(counts.shape)}."
        )
    gaps, counts = nll.double() - reference_nll.double(), counts.double()
    point = float(torch.expm1(gaps.sum(1) / counts.sum()).mean())
    pick = bootstrap_picks(counts.numel(), reps, seed)
    means = torch.expm1(gaps[:, pick].sum(-1) / counts[pick].sum(-1)).mean(0)  # (reps,)
    low, high = central_interval(means, level)
    return 100.0 * point, (100.0 * low, 100.0 * high)
