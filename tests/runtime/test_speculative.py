"""Speculative dispatch: affinity estimates, predictions, and the rows it saves or has to correct."""

import torch

from moe_understudy.runtime.placement import plan_placement
from moe_understudy.runtime.speculative import estimate_affinity, predict_experts, speculate


def chained_routing(T=400, L=3, E=8, seed=0):
    """Layer 0 expert = token id % E; each next layer's expert = previous + 1 (top-1)."""
    tok = torch.randint(0, 50, (T,), generator=torch.Generator().manual_seed(seed))
    first = tok % E
    idx = torch.stack([(first + layer) % E for layer in range(L)]).unsqueeze(-1)  # (L, T, 1)
    return tok, idx


def test_affinity_rows_are_distributions_and_find_the_chain():
    tok, idx = chained_routing()
    aff = estimate_affinity(idx, num_experts=8, token_ids=tok)
    assert torch.allclose(aff.expert_expert.sum(-1), torch.ones(2, 8))
    assert torch.allclose(aff.token_expert.sum(-1), torch.ones(3, 50))
    assert aff.expert_expert[0].argmax(-1).tolist() == [(e + 1) % 8 for e in range(8)]


def test_perfectly_predictable_routing_needs_no_correction():
    tok, idx = chained_routing()
    aff = estimate_affinity(idx, num_experts=8, token_ids=tok)
    pred = predict_experts(aff, idx, tok, num_predicted=1)
    place = plan_placement(3, 8, 4)
    home = torch.arange(400) * 4 // 400
    rep = speculate(idx, pred, place.expert_rank(), home, num_ranks=4)
    assert torch.equal(rep.expert_accuracy, torch.ones(3))
    assert rep.corrected_rows.sum() == 0
    assert torch.equal(rep.avoided_rows, rep.baseline_rows)
    assert rep.baseline_rows.sum() > 0 and rep.wasted_rows.sum() == 0


def test_unpredictable_routing_is_mostly_corrected_and_wastes_early_rows():
    g = torch.Generator().manual_seed(0)
    idx = torch.stack([torch.multinomial(torch.ones(2000, 8), 2, generator=g) for _ in range(3)])
    aff = estimate_affinity(idx[:, :1000], num_experts=8)
    pred = predict_experts(aff, idx[:, 1000:], None, num_predicted=2)
    place = plan_placement(3, 8, 4)
    home = torch.arange(1000) * 4 // 1000
    rep = speculate(idx[:, 1000:], pred, place.expert_rank(), home, num_ranks=4)
    assert 0.1 < float(rep.expert_accuracy.mean()) < 0.45  # near chance (2 of 8)
    assert rep.totals()["avoided_fraction"] < 0.6
    assert rep.wasted_rows.sum() > 0
    assert torch.equal(rep.corrected_send.sum(1).float(), rep.corrected_rows)
    assert torch.equal(rep.corrected_recv.sum(1).float(), rep.corrected_rows)


def test_assignments_not_sent_to_experts_are_not_counted():
    tok, idx = chained_routing(T=100)
    aff = estimate_affinity(idx, num_experts=8, token_ids=tok)
    pred = predict_experts(aff, idx, tok, 1)
    place = plan_placement(3, 8, 4)
    home = torch.zeros(100, dtype=torch.long)
    none_sent = speculate(
        idx, pred, place.expert_rank(), home, 4, sent=torch.zeros_like(idx, dtype=torch.bool)
    )
    assert none_sent.baseline_rows.sum() == 0 and none_sent.corrected_rows.sum() == 0
