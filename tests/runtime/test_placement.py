"""Placement of experts over ranks: contiguous, from a file, hot-expert replication."""

import json

import pytest
import torch

from moe_understudy.errors import UserError
from moe_understudy.runtime.placement import (
    Placement,
    dispatch_traffic,
    plan_placement,
    replicate_hot_experts,
)


def test_contiguous_placement_puts_consecutive_experts_on_each_rank():
    p = plan_placement(num_layers=2, num_experts=8, num_ranks=4)
    assert p.slots_per_rank == 2
    assert p.phys_to_logical[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    assert p.expert_rank()[1].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert p.local_experts(layer=0, rank=3) == [6, 7]


def test_uneven_contiguous_placement_leaves_empty_slots_but_places_every_expert():
    p = plan_placement(num_layers=1, num_experts=6, num_ranks=4)
    assert p.slots_per_rank == 2
    assert sorted(e for e in p.phys_to_logical[0].tolist() if e >= 0) == list(range(6))
    assert (p.replica_count() == 1).all()


def test_placement_file_with_one_rank_list_applies_to_every_layer(tmp_path):
    f = tmp_path / "place.json"
    f.write_text(json.dumps({"expert_to_rank": [1, 0, 1, 0]}))
    p = plan_placement(num_layers=3, num_experts=4, num_ranks=2, path=f)
    assert p.expert_rank().tolist() == [[1, 0, 1, 0]] * 3


def test_placement_file_round_trips_a_replicated_placement(tmp_path):
    load = torch.tensor([[100.0, 10, 10, 10], [10, 10, 10, 100]])
    p = replicate_hot_experts(load, num_ranks=2, slots_per_rank=3)
    f = tmp_path / "place.json"
    f.write_text(json.dumps(p.to_json()))
    q = plan_placement(num_layers=2, num_experts=4, num_ranks=2, path=f)
    assert torch.equal(q.phys_to_logical, p.phys_to_logical)
    assert torch.allclose(q.replica_share, p.replica_share)


@pytest.mark.parametrize(
    "content, words",
    [
        ({"expert_to_rank": [0, 1, 2]}, "one rank per expert"),
        ({"expert_to_rank": [0, 1, 5, 0]}, "only 2 ranks"),
        ({"ranks": [0, 1]}, "expert_to_rank"),
    ],
)
def test_bad_placement_file_is_a_user_error_naming_the_problem(tmp_path, content, words):
    f = tmp_path / "place.json"
    f.write_text(json.dumps(content))
    with pytest.raises(UserError, match=words):
        plan_placement(num_layers=1, num_experts=4, num_ranks=2, path=f)


def test_placement_that_loses_an_expert_is_refused():
    with pytest.raises(ValueError, match="expert 3"):
        Placement(
            torch.tensor([[0, 1, 2, 2]]), torch.ones(1, 4), num_ranks=2, slots_per_rank=2, num_experts=4
        )


def test_replication_gives_spare_slots_to_the_hottest_expert_on_other_ranks():
    load = torch.tensor([[800.0, 100, 100, 100, 100, 100, 100, 100]])
    p = replicate_hot_experts(load, num_ranks=4, slots_per_rank=3)  # 4 spare slots
    count = p.replica_count()[0]
    assert count[0] == 5 and (count[1:] == 1).all()
    ranks_of_0 = {int(s) // 3 for s in p.slots_of(0, 0)}
    assert ranks_of_0 == {0, 1, 2, 3}  # replicas spread, not stacked on one rank
    shares = p.replica_share[0, p.slots_of(0, 0)]
    assert torch.allclose(shares, torch.full((5,), 0.2))


def test_replication_balances_rank_load_better_than_contiguous():
    g = torch.Generator().manual_seed(0)
    load = torch.rand(3, 8, generator=g) ** 4 * 1000
    rep = replicate_hot_experts(load, num_ranks=4, slots_per_rank=3)
    con = plan_placement(3, 8, 4)

    def max_over_mean(p):
        per_slot = load.gather(1, p.phys_to_logical.clamp(min=0)) * p.replica_share
        per_rank = per_slot.view(3, 4, -1).sum(-1)
        return (per_rank.max(1).values / per_rank.mean(1)).mean()

    assert max_over_mean(rep) < max_over_mean(con)


def test_replication_refuses_too_few_slots():
    with pytest.raises(UserError, match="cannot hold 8 experts"):
        replicate_hot_experts(torch.ones(1, 8), num_ranks=2, slots_per_rank=3)


def test_dispatch_traffic_counts_only_off_rank_assignments_that_are_sent():
    src = torch.tensor([0, 0, 1])
    dest = torch.tensor([[0, 1], [1, 1], [0, 1]])
    sent = torch.tensor([[True, True], [True, False], [True, True]])
    t = dispatch_traffic(src, dest, sent, num_ranks=2, bytes_per_row=10)
    assert t.rank_load.tolist() == [2, 3]
    assert t.send_bytes.tolist() == [20, 10]  # rank 0 sends two rows to rank 1; rank 1 one row to 0
    assert t.recv_bytes.tolist() == [10, 20]
    assert t.wire_bytes == 60
    assert t.load_imbalance() == pytest.approx(3 / 2.5)


def test_rebalance_from_window_plans_on_the_mean_load_of_the_window():
    from moe_understudy.runtime.placement import rebalance_from_window

    g = torch.Generator().manual_seed(0)
    window = torch.randint(0, 50, (5, 2, 8), generator=g).float()
    window[:, :, 3] += 400.0  # expert 3 is hot in every step of the window
    p = rebalance_from_window(window, num_ranks=4, slots_per_rank=3)
    assert torch.equal(p.phys_to_logical, replicate_hot_experts(window.mean(0), 4, 3).phys_to_logical)
    assert (p.replica_count()[:, 3] >= 2).all()
    with pytest.raises(ValueError, match="window_loads"):
        rebalance_from_window(window[0], 4, 3)
