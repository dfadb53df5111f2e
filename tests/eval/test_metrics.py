"""Quality metrics are pure functions with known values on hand-made inputs."""

from __future__ import annotations

import math

import pytest
import torch

from moe_understudy.eval.metrics import (
    kl_per_token,
    masked_mean,
    next_token_view,
    perplexity,
    token_nll,
    top1_agreement,
)


def test_uniform_logits_have_perplexity_equal_to_the_vocabulary():
    logits = torch.zeros(5, 7)
    assert perplexity(logits, torch.arange(5)).item() == pytest.approx(7.0, rel=1e-6)


def test_perplexity_ignores_masked_positions():
    logits = torch.tensor([[10.0, 0.0], [0.0, 10.0]])
    targets = torch.tensor([0, 0])  # second position is badly wrong
    mask = torch.tensor([True, False])
    assert perplexity(logits, targets, mask).item() < 1.001
    assert perplexity(logits, targets).item() > 100


def test_masked_mean_is_zero_on_an_empty_mask_and_fp32():
    v = torch.tensor([1.0, 2.0], dtype=torch.float16)
    assert masked_mean(v, torch.tensor([False, False])).item() == 0.0
    assert masked_mean(v, torch.tensor([True, False])).dtype == torch.float32
    assert masked_mean(torch.empty(0)).item() == 0.0


def test_nll_matches_log_softmax():
    logits = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([0, 5, 2, 2])
    expected = -torch.log_softmax(logits, -1)[torch.arange(4), targets]
    torch.testing.assert_close(token_nll(logits, targets), expected)


def test_kl_is_zero_for_equal_logits_and_matches_two_point_formula():
    a = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
    assert kl_per_token(a, a + 3.0).abs().max() < 1e-6  # shift-invariant
    p = torch.tensor([[math.log(0.75), math.log(0.25)]])
    q = torch.tensor([[math.log(0.5), math.log(0.5)]])
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert kl_per_token(p, q).item() == pytest.approx(expected, rel=1e-5)
    assert kl_per_token(q, p).item() != pytest.approx(expected, rel=1e-3)  # direction matters


def test_top1_agreement_compares_argmax():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[2.0, 0.0], [3.0, 1.0]])
    assert top1_agreement(a, b).tolist() == [True, False]


def test_next_token_view_shifts_by_one():
    logits = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 4)
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    flat, targets = next_token_view(logits, ids)
    assert flat.shape == (4, 4) and targets.tolist() == [2, 3, 5, 6]
    assert torch.equal(flat[2], logits[1, 0])
