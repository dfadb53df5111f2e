"""Quality metrics are pure functions with known values on hand-made inputs."""

from __future__ import annotations

import math

import pytest
import torch

from moe_understudy.errors import UserError
from moe_understudy.eval.metrics import (
    kl_per_token,
    mean_paired_ppl_delta,
    next_token_view,
    paired_ppl_delta,
    paired_ppl_delta_interval,
    perplexity,
    ratio_interval,
    token_nll,
    top1_agreement,
)
from moe_understudy.reduce import masked_mean


class _Uniform(torch.nn.Module):
    """A causal LM stub whose next-token distribution is uniform over `vocab` tokens."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the stub a device

    def forward(self, input_ids):
        logits = torch.zeros(*input_ids.shape, self.vocab) + self.anchor
        return type("Out", (), {"logits": logits})()


def test_a_uniform_model_has_perplexity_equal_to_the_vocabulary():
    blocks = torch.randint(0, 7, (5, 9), generator=torch.Generator().manual_seed(0))
    assert perplexity(_Uniform(7), blocks, batch_size=2) == pytest.approx(7.0, rel=1e-6)


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


def test_paired_interval_is_a_point_when_every_batch_has_the_same_gap():
    reference = torch.tensor([900.0, 1100.0, 1000.0, 950.0], dtype=torch.float64)
    counts = torch.tensor([1000.0, 1000.0, 1000.0, 1000.0], dtype=torch.float64)
    low, high = paired_ppl_delta_interval(reference + 10.0, reference, counts)  # 0.01 nats per token
    assert low == pytest.approx(100 * math.expm1(0.01)) and high == pytest.approx(low)


def test_paired_delta_is_the_pooled_nll_gap_per_position_not_the_mean_of_batch_ratios():
    reference = torch.tensor([100.0, 300.0], dtype=torch.float64)
    counts = torch.tensor([100.0, 300.0], dtype=torch.float64)
    nll = reference + torch.tensor([4.0, 0.0], dtype=torch.float64)  # 0.04 nats/token in the small batch only
    assert paired_ppl_delta(nll, reference, counts) == pytest.approx(100 * math.expm1(4.0 / 400.0))


def test_paired_interval_holds_the_point_estimate_and_narrows_with_more_batches():
    gen = torch.Generator().manual_seed(1)

    def interval(batches):
        reference = 1000.0 + 50 * torch.randn(batches, generator=gen, dtype=torch.float64)
        gap = 5.0 + 3.0 * torch.randn(batches, generator=gen, dtype=torch.float64)  # noisy, mean > 0
        counts = torch.full((batches,), 1000.0, dtype=torch.float64)
        return paired_ppl_delta(reference + gap, reference, counts), paired_ppl_delta_interval(
            reference + gap, reference, counts
        )

    point, (low, high) = interval(16)
    assert low < point < high and low > 0  # a gap of 5 +- 3 nats per batch is clearly positive
    _, (wide_low, wide_high) = interval(4)
    _, (narrow_low, narrow_high) = interval(256)
    assert narrow_high - narrow_low < (wide_high - wide_low) / 3


def test_mean_over_trainings_is_the_mean_of_their_paired_deltas_with_a_batch_interval_around_it():
    gen = torch.Generator().manual_seed(2)
    reference = 1000.0 + 50 * torch.randn(32, generator=gen, dtype=torch.float64)
    counts = torch.full((32,), 1000.0, dtype=torch.float64)
    gaps = torch.stack(
        [g + 2.0 * torch.randn(32, generator=gen, dtype=torch.float64) for g in (2.0, 6.0, 10.0)]
    )
    nll = reference + gaps  # three trainings, 2 / 6 / 10 nats worse per batch on average
    point, (low, high) = mean_paired_ppl_delta(nll, reference, counts)
    each = [paired_ppl_delta(n, reference, counts) for n in nll]
    assert point == pytest.approx(sum(each) / 3)
    assert low < point < high and low > min(each) and high < max(each)  # the trainings spread wider
    one_point, one_interval = mean_paired_ppl_delta(nll[1:2], reference, counts)
    assert one_point == pytest.approx(each[1])
    assert one_interval == pytest.approx(paired_ppl_delta_interval(nll[1], reference, counts), rel=0.05)
    with pytest.raises(UserError, match="one NLL sum per training and batch"):
        mean_paired_ppl_delta(nll[0], reference, counts)


def test_paired_interval_refuses_mismatched_batches_in_one_sentence():
    with pytest.raises(UserError, match="one NLL sum per batch"):
        paired_ppl_delta_interval(torch.ones(3), torch.ones(4), torch.ones(3))
    with pytest.raises(UserError, match="one sum and one count per unit"):
        paired_ppl_delta_interval(torch.ones(3), torch.ones(3), torch.ones(4))


def test_ratio_interval_of_agreement_covers_the_pooled_rate_and_is_seeded():
    agree = torch.tensor([30.0, 31.0, 25.0, 31.0, 28.0, 31.0, 29.0, 30.0])  # of 31 decode steps each
    steps = torch.full((8,), 31.0)
    low, high = ratio_interval(agree, steps)
    assert low < float(agree.sum() / steps.sum()) < high <= 1.0
    assert ratio_interval(agree, steps) == (low, high)
