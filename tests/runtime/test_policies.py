"""Overflow policies as pure functions: each test pins one behaviour a different policy would break."""

from __future__ import annotations

import pytest
import torch

from moe_understudy.moe.adapters import Routing
from moe_understudy.runtime.policies import POLICIES, PRIORITIES, expert_capacity, plan_routing


def routing_from_logits(logits: torch.Tensor, k: int = 2) -> Routing:
    probs = torch.softmax(logits, -1)
    w, idx = probs.topk(k, -1)
    return Routing(logits=logits, weights=w / w.sum(-1, keepdim=True), indices=idx)


def fixed(indices, weights, num_experts) -> Routing:
    """A routing with chosen indices/weights; logits rank the chosen experts first, then by expert id."""
    indices = torch.tensor(indices)
    weights = torch.tensor(weights, dtype=torch.float32)
    logits = -torch.arange(num_experts, dtype=torch.float32).repeat(len(indices), 1) * 0.01
    logits.scatter_(1, indices, 10.0 + weights)
    return Routing(logits=logits, weights=weights, indices=indices)


def random_routing(seed: int, T: int = 64, E: int = 8, k: int = 2, skew: float = 2.0) -> Routing:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g) + skew * torch.linspace(1, 0, E)  # imbalanced: low ids are hot
    return routing_from_logits(logits, k)


def test_capacity_is_ceil_of_cf_tokens_k_over_experts():
    assert expert_capacity(10, 2, 4, 1.0) == 5
    assert expert_capacity(10, 2, 4, 0.5) == 3  # ceil(2.5)
    assert expert_capacity(1024, 2, 8, 0.75) == 192  # exact product must not round up


def test_position_priority_queues_every_first_choice_before_any_second_choice():
    # Token 0's second choice and token 1's first choice both want expert 0, capacity 1.
    r = fixed([[1, 0], [0, 2]], [[0.6, 0.4], [0.7, 0.3]], num_experts=3)
    plan = plan_routing(r, "drop", capacity=1, priority="position")
    assert plan.dropped.tolist() == [[False, True], [False, False]]


def test_score_priority_overflows_the_lowest_weight_first():
    # Both tokens pick expert 0 first; token 1 has the larger weight, capacity 1.
    r = fixed([[0, 1], [0, 2]], [[0.55, 0.45], [0.9, 0.1]], num_experts=3)
    by_score = plan_routing(r, "drop", capacity=1, priority="score")
    by_position = plan_routing(r, "drop", capacity=1, priority="position")
    assert by_score.dropped[:, 0].tolist() == [True, False]
    assert by_position.dropped[:, 0].tolist() == [False, True]


def test_full_sends_every_assignment_to_its_expert_unchanged():
    r = random_routing(0)
    plan = plan_routing(r, "full", capacity=0)
    assert plan.expert_served.all() and not plan.dropped.any() and not plan.understudy_tokens.any()
    assert torch.equal(plan.indices, r.indices) and torch.equal(plan.weights, r.weights)


def test_drop_keeps_weights_and_drops_exactly_the_overflow():
    r = fixed([[0, 1], [0, 1], [0, 2]], [[0.6, 0.4], [0.7, 0.3], [0.8, 0.2]], num_experts=3)
    plan = plan_routing(r, "drop", capacity=2)
    assert plan.dropped.tolist() == [[False, False], [False, False], [True, False]]
    assert torch.equal(plan.weights, r.weights)


def test_drop_renorm_rescales_kept_weights_to_the_original_sum():
    r = fixed([[0, 1], [0, 1], [0, 2]], [[0.6, 0.4], [0.7, 0.3], [0.8, 0.2]], num_experts=3)
    plan = plan_routing(r, "drop_renorm", capacity=2)
    assert plan.dropped[2, 0] and plan.weights[2, 0] == 0
    assert plan.weights[2, 1].item() == pytest.approx(1.0)
    assert torch.allclose(plan.weights[:2], r.weights[:2])


def test_reroute_moves_overflow_to_the_next_best_expert_with_room():
    # Expert 0 holds one; token 1's first choice overflows. Its own choices are {0, 1}; by logits the
    # next-best outside them is expert 2 (full: token 2 holds it), then expert 3 (free).
    r = fixed([[0, 1], [0, 1], [2, 1]], [[0.6, 0.4], [0.7, 0.3], [0.8, 0.2]], num_experts=4)
    plan = plan_routing(r, "reroute", capacity=1)
    # Expert 1 also overflows (tokens 0, 1, 2 second choices; capacity 1): those go to free experts or drop.
    assert plan.indices[1, 0] == 3 and plan.expert_served[1, 0]
    assert plan.weights[1, 0] == r.weights[1, 0]  # keeps its combine weight
    assert (plan.served_per_expert(4) <= 1).all()
    assert int(plan.dropped.sum()) == 6 - 4  # four experts of capacity 1 serve four of six assignments


def test_reroute_drops_when_no_expert_has_room():
    r = fixed([[0, 1], [0, 1]], [[0.6, 0.4], [0.7, 0.3]], num_experts=2)
    plan = plan_routing(r, "reroute", capacity=1)
    assert plan.dropped.tolist() == [[False, False], [True, True]]


def test_understudy_takes_whole_tokens_that_overflow():
    r = fixed([[0, 1], [0, 2], [3, 2]], [[0.6, 0.4], [0.7, 0.3], [0.8, 0.2]], num_experts=4)
    plan = plan_routing(r, "understudy", capacity=1, readmit=False)
    assert plan.understudy_tokens.tolist() == [
        False,
        True,
        True,
    ]  # token 1 overflows expert 0, token 2 expert 2
    assert not plan.expert_served[1:].any() and not plan.dropped.any()


def test_understudy_readmits_tokens_that_fit_the_capacity_freed_by_others():
    # Capacity 1. Token 1 overflows on expert 0 and becomes an understudy token, which frees its
    # slot on expert 2; token 2 overflowed only on expert 2, so it fits again after readmission.
    r = fixed([[0, 1], [0, 2], [3, 2]], [[0.6, 0.4], [0.9, 0.1], [0.8, 0.2]], num_experts=4)
    without = plan_routing(r, "understudy", capacity=1, readmit=False)
    with_readmit = plan_routing(r, "understudy", capacity=1, readmit=True)
    assert without.understudy_tokens.tolist() == [False, True, True]
    assert with_readmit.understudy_tokens.tolist() == [False, True, False]
    assert (with_readmit.served_per_expert(4) <= 1).all()


def test_shadow_serves_each_overflowing_assignment_and_keeps_the_rest():
    r = fixed([[0, 1], [0, 2]], [[0.6, 0.4], [0.7, 0.3]], num_experts=3)
    plan = plan_routing(r, "shadow", capacity=1)
    assert plan.shadow_served.tolist() == [[False, False], [True, False]]
    assert plan.expert_served.tolist() == [[True, True], [False, True]]
    assert not plan.understudy_tokens.any()


def test_layer_switches_whole_layer_only_above_threshold():
    r = fixed([[0, 1], [0, 2], [0, 1]], [[0.6, 0.4]] * 3, num_experts=3)  # loads 3, 2, 1: max/mean 1.5
    assert plan_routing(r, "layer", capacity=10, threshold=1.6).expert_served.all()
    assert plan_routing(r, "layer", capacity=10, threshold=1.4).understudy_tokens.all()
    # Default threshold: switch exactly when an expert would overflow the capacity.
    assert plan_routing(r, "layer", capacity=3).expert_served.all()
    assert plan_routing(r, "layer", capacity=2).understudy_tokens.all()


def test_deadline_keeps_understudy_for_tokens_whose_expert_result_is_late():
    r = fixed([[0, 1], [0, 2], [0, 2]], [[0.6, 0.4]] * 3, num_experts=3)
    # Expert 0 queue: tokens 0, 1, 2 finish at 1, 2, 3 (+ latency 0.5); deadline 2.5 makes token 2 late.
    plan = plan_routing(r, "deadline", capacity=0, time_per_assignment=1.0, latency=0.5, deadline=2.5)
    assert plan.understudy_tokens.tolist() == [False, False, True]
    assert plan.sent().all()  # everything was dispatched before the cut
    # A slow expert 2 (3 units per assignment) makes token 1 late too: its result finishes at 3.5.
    slow = plan_routing(
        r,
        "deadline",
        capacity=0,
        time_per_assignment=torch.tensor([1.0, 1.0, 3.0]),
        latency=0.5,
        deadline=2.5,
    )
    assert slow.understudy_tokens.tolist() == [False, True, True]


def test_deadline_default_cuts_where_capacity_would():
    r = random_routing(3)
    cap = expert_capacity(64, 2, 8, 0.75)
    deadline = plan_routing(r, "deadline", capacity=cap)
    understudy = plan_routing(r, "understudy", capacity=cap, readmit=False)
    assert torch.equal(deadline.understudy_tokens, understudy.understudy_tokens)


@pytest.mark.parametrize("priority", PRIORITIES)
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("cf", [0.5, 1.0, 1.5])
def test_every_assignment_has_exactly_one_fate_and_no_expert_exceeds_capacity(policy, priority, cf):
    for seed in range(3):
        r = random_routing(seed)
        cap = expert_capacity(64, 2, 8, cf)
        plan = plan_routing(r, policy, cap, priority)
        fates = (
            plan.expert_served.int()
            + plan.shadow_served.int()
            + plan.dropped.int()
            + plan.understudy_served().int()
        )
        assert (fates == 1).all()
        c = plan.counts()
        assert c["expert"] + c["shadow"] + c["understudy"] + c["dropped"] == c["assignments"] == 128
        if policy != "full":
            assert int(plan.served_per_expert(8).max()) <= cap
        assert ((plan.indices >= 0) & (plan.indices < 8)).all()


def test_unknown_policy_and_priority_are_rejected():
    r = random_routing(0)
    with pytest.raises(ValueError, match="policy"):
        plan_routing(r, "teleport", 4)
    with pytest.raises(ValueError, match="priority"):
        plan_routing(r, "drop", 4, priority="random")


# --- capacity per group (rank) of experts ---------------------------------------------------------

RANKS = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])  # 8 experts, 2 per rank, contiguous


@pytest.mark.parametrize("policy", POLICIES)
def test_one_expert_per_group_plans_exactly_as_per_expert_capacity(policy):
    for seed in range(3):
        r = random_routing(seed)
        a = plan_routing(r, policy, 12, "score")
        b = plan_routing(r, policy, 12, "score", groups=torch.arange(8))
        for field in ("indices", "weights", "expert_served", "shadow_served", "dropped", "understudy_tokens"):
            assert torch.equal(getattr(a, field), getattr(b, field)), field


@pytest.mark.parametrize("policy", ["drop", "reroute", "understudy", "shadow", "deadline"])
@pytest.mark.parametrize("cf", [0.5, 0.75, 1.0])
def test_no_group_exceeds_its_capacity_and_every_assignment_keeps_one_fate(policy, cf):
    for seed in range(3):
        r = random_routing(seed, skew=3.0)
        cap = expert_capacity(64, 2, 4, cf)  # per rank: ceil(cf * T * k / ranks)
        plan = plan_routing(r, policy, cap, groups=RANKS)
        per_rank = torch.zeros(4, dtype=torch.long).index_add_(0, RANKS, plan.served_per_expert(8))
        assert int(per_rank.max()) <= cap
        fates = plan.expert_served.int() + plan.shadow_served.int() + plan.dropped.int()
        assert ((fates + plan.understudy_served().int()) == 1).all()


def test_rank_capacity_lets_a_cold_expert_lend_its_room_to_its_hot_neighbour():
    # Rank 0 holds expert 0 (hot: 6 assignments) and expert 1 (cold: 2); other ranks are idle.
    # Per expert (capacity 4 each) expert 0 overflows by 2; per rank (capacity 8) nothing does.
    r = fixed([[0, 1]] * 2 + [[0, 2]] * 4, [[0.6, 0.4]] * 6, num_experts=8)
    assert plan_routing(r, "understudy", 4, readmit=False).understudy_tokens.sum() == 2
    assert plan_routing(r, "understudy", 8, readmit=False, groups=RANKS).understudy_tokens.sum() == 0
    # One rank of capacity 5 holding both of a token's experts must have room for both to readmit it.
    tight = plan_routing(fixed([[0, 1]] * 3, [[0.6, 0.4]] * 3, 8), "understudy", 5, groups=RANKS)
    assert tight.understudy_tokens.tolist() == [False, False, True]


def test_groups_must_name_one_group_per_expert():
    with pytest.raises(ValueError, match="one group per expert"):
        plan_routing(random_routing(0), "drop", 4, groups=torch.tensor([0, 1]))


# --- expanded drop (Capacity-Aware Inference) ------------------------------------------------------

from moe_understudy.runtime.policies import expanded_candidates  # noqa: E402

TOKEN_DEVICE = torch.arange(64) * 4 // 64  # 64 tokens over 4 devices, contiguous
EXPERT_DEVICE = torch.arange(8) * 4 // 8  # 8 experts over 4 devices, contiguous


def test_expanded_drop_with_room_for_everything_equals_full():
    r = random_routing(0)
    plan = plan_routing(r, "expanded_drop", capacity=10_000, priority="score")
    assert plan.expert_served.all() and torch.equal(plan.indices, r.indices)
    assert torch.equal(plan.weights, r.weights)


def test_expanded_candidates_are_the_best_local_experts_outside_the_top_k():
    r = random_routing(1, skew=3.0)
    idx, w = expanded_candidates(r, m=1, token_device=TOKEN_DEVICE, expert_device=EXPERT_DEVICE)
    probs = torch.softmax(r.logits, -1)
    for t in range(64):
        local = [e for e in range(8) if EXPERT_DEVICE[e] == TOKEN_DEVICE[t] and e not in r.indices[t]]
        if not local:
            assert int(idx[t, 0]) == 8 and float(w[t, 0]) == 0.0
            continue
        best = max(local, key=lambda e: float(probs[t, e]))
        assert int(idx[t, 0]) == best
        # the weight the family would give it inside the top-k (top-k weights sum to 1 here)
        assert float(w[t, 0]) == pytest.approx(float(probs[t, best] / probs[t, r.indices[t]].sum()), rel=1e-5)


@pytest.mark.parametrize("policy", ["expanded_drop", "expanded_shadow"])
@pytest.mark.parametrize("cf", [0.5, 1.0, 1.5])
def test_expanded_policies_reroute_only_to_local_experts_and_keep_at_most_k(policy, cf):
    for seed in range(3):
        r = random_routing(seed, skew=3.0)
        cand = expanded_candidates(r, m=2, token_device=TOKEN_DEVICE, expert_device=EXPERT_DEVICE)
        cap = expert_capacity(64, 2, 8, cf)
        plan = plan_routing(r, policy, cap, "score", candidates=cand)
        moved = plan.indices != r.indices
        assert (plan.expert_served[moved]).all()
        assert (EXPERT_DEVICE[plan.indices[moved]] == TOKEN_DEVICE[:, None].expand(64, 2)[moved]).all()
        assert int(plan.served_per_expert(8).max()) <= cap
        fates = plan.expert_served.int() + plan.shadow_served.int() + plan.dropped.int()
        assert (fates == 1).all()  # k slots per token, each with one fate: never more than k experts
        if policy == "expanded_shadow":
            assert not plan.dropped.any()
            lost = plan.shadow_served
            assert torch.equal(plan.indices[lost], r.indices[lost])  # the stand-in serves the original expert
            assert torch.equal(plan.weights[lost], r.weights[lost])


def test_expanded_drop_loses_fewer_assignments_than_token_drop_under_skew():
    r = random_routing(2, skew=3.0)
    cand = expanded_candidates(r, m=1, token_device=TOKEN_DEVICE, expert_device=EXPERT_DEVICE)
    cap = expert_capacity(64, 2, 8, 1.0)
    expanded = plan_routing(r, "expanded_drop", cap, "score", candidates=cand)
    dropped = plan_routing(r, "drop", cap, "score")
    assert 0 < int(expanded.dropped.sum()) < int(dropped.dropped.sum())
    assert int(expanded.expert_served.sum()) > int(dropped.expert_served.sum())
