"""Hot-expert replication baseline: replicas split an expert's tokens; loads and bytes follow."""

import torch

from moe_understudy.runtime.placement import plan_placement, replicate_hot_experts
from moe_understudy.runtime.replication import assign_replicas, extra_expert_bytes, replicated_dispatch


def test_assignments_of_a_replicated_expert_are_split_evenly_across_replicas():
    load = torch.tensor([[300.0, 10, 10, 10]])
    p = replicate_hot_experts(load, num_ranks=2, slots_per_rank=3)  # expert 0 gets 3 replicas
    indices = torch.zeros(12, 1, dtype=torch.long)
    slots = assign_replicas(indices, p, layer=0)
    counts = torch.bincount(slots.view(-1), minlength=6)
    replicas = p.slots_of(0, 0)
    assert counts[replicas].tolist() == [4, 4, 4]


def test_unsent_assignments_get_no_slot():
    p = plan_placement(1, 4, 2)
    indices = torch.tensor([[0, 3], [1, 2]])
    sent = torch.tensor([[True, False], [False, True]])
    slots = assign_replicas(indices, p, 0, sent)
    assert slots.tolist() == [[0, -1], [-1, 2]]


def test_replication_lowers_max_over_mean_rank_load_of_a_skewed_routing():
    g = torch.Generator().manual_seed(1)
    probs = torch.tensor([0.5, 0.2, 0.1, 0.05, 0.05, 0.04, 0.03, 0.03])
    indices = torch.multinomial(probs.expand(512, -1), 2, generator=g)  # (512, 2), distinct per token
    src = torch.arange(512) * 4 // 512
    load = torch.bincount(indices.view(-1), minlength=8).float().unsqueeze(0)
    base = replicated_dispatch(indices, plan_placement(1, 8, 4), 0, src, bytes_per_row=4)
    rep = replicated_dispatch(indices, replicate_hot_experts(load, 4, 3), 0, src, bytes_per_row=4)
    assert rep.traffic.rank_load.sum() == base.traffic.rank_load.sum() == 1024
    assert rep.traffic.load_imbalance() < 1.1 < base.traffic.load_imbalance()


def test_extra_bytes_count_spare_slots_per_rank_over_layers():
    p = replicate_hot_experts(torch.ones(4, 8), num_ranks=4, slots_per_rank=3)
    assert extra_expert_bytes(p, expert_bytes=1000) == 4 * 1000  # one spare slot x 4 layers


def _assign_by_loop(indices, placement, layer, sent):
    """The rule spelled out: each expert's sent assignments, token-major, cut into chunks by share."""
    from moe_understudy.runtime.replication import replica_of_position

    flat, keep = indices.reshape(-1), sent.reshape(-1)
    out = torch.full_like(flat, -1)
    for e in torch.unique(flat[keep]).tolist():
        rows = ((flat == e) & keep).nonzero().squeeze(1)
        slots = placement.slots_of(layer, e)
        share = placement.replica_share[layer, slots]
        out[rows] = slots[replica_of_position(torch.arange(rows.numel()), rows.numel(), share)]
    return out.view_as(indices)


def test_vectorised_replica_choice_follows_the_chunk_rule_for_every_expert():
    g = torch.Generator().manual_seed(4)
    load = torch.tensor([[90.0, 30, 10, 5, 5, 3, 2, 1], [1, 1, 1, 1, 1, 1, 1, 80]])
    placement = replicate_hot_experts(load, num_ranks=4, slots_per_rank=4)
    for layer in range(2):
        for _ in range(3):
            indices = torch.multinomial(torch.softmax(load[layer] / 20, 0).expand(50, 8), 2, generator=g)
            sent = torch.rand(50, 2, generator=g) < 0.7
            assert torch.equal(
                assign_replicas(indices, placement, layer, sent),
                _assign_by_loop(indices, placement, layer, sent),
            )


def test_vectorised_replica_choice_matches_the_rule_on_random_placements():
    g = torch.Generator().manual_seed(0)
    for _ in range(25):
        E = int(torch.randint(4, 40, (1,), generator=g))
        R = int(torch.randint(2, 9, (1,), generator=g))
        slots = -(-E // R) + int(torch.randint(0, 4, (1,), generator=g))
        placement = replicate_hot_experts(torch.rand(2, E, generator=g) ** 4 * 100, R, slots)
        T, k = int(torch.randint(1, 300, (1,), generator=g)), min(3, E)
        indices = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
        sent = torch.rand(T, k, generator=g) < 0.8
        for layer in range(2):
            assert torch.equal(
                assign_replicas(indices, placement, layer, sent),
                _assign_by_loop(indices, placement, layer, sent),
            )
