"""Layer-wise and end-to-end losses on known inputs."""

from __future__ import annotations

import math

import pytest
import torch

from moe_understudy.understudy.losses import (
    cosine_loss,
    kl_loss,
    layer_loss,
    masked_mean,
    mse_loss,
    relative_loss,
)


def test_mse_is_the_mean_squared_difference_per_token_then_over_tokens():
    s = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    t = torch.tensor([[0.0, 0.0], [0.0, 2.0]])
    assert mse_loss(s, t).item() == pytest.approx((1.0 + 2.0) / 2)
    assert mse_loss(s, t, mask=torch.tensor([True, False])).item() == pytest.approx(1.0)


def test_cosine_is_zero_for_parallel_one_for_orthogonal_two_for_opposite():
    t = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    s = torch.tensor([[3.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    assert cosine_loss(s, t).item() == pytest.approx((0.0 + 1.0 + 2.0) / 3)


def test_relative_is_squared_error_over_teacher_energy():
    t = torch.tensor([[3.0, 4.0], [0.0, 0.0]])  # energy 25
    s = torch.tensor([[3.0, 3.0], [1.0, 0.0]])  # errors 1 and 1
    assert relative_loss(s, t).item() == pytest.approx(2.0 / 25.0)
    assert relative_loss(torch.zeros_like(t), t).item() == pytest.approx(1.0)


@pytest.mark.parametrize("name", ["mse", "cosine", "relative"])
def test_an_exact_copy_has_zero_loss(name):
    t = torch.randn(5, 8)
    assert layer_loss(name, t.clone(), t).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("fn", [mse_loss, cosine_loss, relative_loss])
def test_empty_mask_gives_a_finite_zero(fn):
    s, t = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4)
    value = fn(s, t, torch.zeros(3, dtype=torch.bool))
    assert value.item() == 0.0
    value.backward()  # still differentiable


def test_masked_mean_ignores_masked_positions():
    assert masked_mean(torch.tensor([1.0, 100.0, 3.0]), torch.tensor([1, 0, 1])).item() == pytest.approx(2.0)


def test_forward_and_reverse_kl_on_known_distributions():
    p = torch.tensor([0.5, 0.5])  # teacher
    q = torch.tensor([0.9, 0.1])  # student
    forward = (p * (p / q).log()).sum().item()
    reverse = (q * (q / p).log()).sum().item()
    s_logits, t_logits = q.log()[None], p.log()[None]
    assert kl_loss(s_logits, t_logits, direction="forward").item() == pytest.approx(forward, rel=1e-5)
    assert kl_loss(s_logits, t_logits, direction="reverse").item() == pytest.approx(reverse, rel=1e-5)
    assert forward != pytest.approx(reverse)


def test_kl_is_zero_for_equal_logits_and_shift_invariant():
    logits = torch.randn(2, 3, 11)
    assert kl_loss(logits + 5.0, logits).item() == pytest.approx(0.0, abs=1e-6)


def test_kl_masks_positions():
    t = torch.zeros(2, 4)
    s = torch.stack([torch.zeros(4), torch.tensor([9.0, 0, 0, 0])])
    assert kl_loss(s, t, mask=torch.tensor([True, False])).item() == pytest.approx(0.0, abs=1e-7)
    assert kl_loss(s, t).item() > 0.1
    assert not math.isnan(kl_loss(s, t, mask=torch.tensor([False, False])).item())


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="layer loss"):
        layer_loss("huber", torch.zeros(1, 2), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="direction"):
        kl_loss(torch.zeros(1, 2), torch.zeros(1, 2), direction="sideways")
