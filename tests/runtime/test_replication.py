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
