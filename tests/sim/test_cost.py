"""The cost model, pinned on a step computed by hand (4 ranks in 2 nodes, 4 tokens, top-2)."""

import pytest
import torch

from moe_understudy.config import ClusterCost
from moe_understudy.runtime import exchange as xchg
from moe_understudy.runtime.ledger import Topology
from moe_understudy.runtime.placement import contiguous_placement
from moe_understudy.sim.cost import (
    AssignmentStandInCost,
    exchange_layout_bytes,
    expert_flops,
    layer_cost,
)
from moe_understudy.sim.systems import SimRouting, build_systems, exchange_of, plan_layer

# Units chosen so every term is a whole number of seconds: one row = H x 2 = 8 bytes, NVLink moves
# 8 B/s, RDMA 4 B/s, an expert row is 6 H I = 192 FLOPs at 192 FLOP/s, latency 1 s.
COST = ClusterCost(
    hidden_size=4,
    expert_intermediate=8,
    dtype_bytes=2,
    device_tflops=192e-12,
    nvlink_gbps=8e-9,
    link_gbps=4e-9,
    ranks_per_node=2,
    latency_us=1e6,
)
# token t lives on rank t; expert e on rank e
INDICES = torch.tensor([[1, 2], [1, 0], [3, 1], [3, 2]])
WEIGHTS = torch.tensor([[0.6, 0.4], [0.3, 0.7], [0.8, 0.2], [0.5, 0.5]])


def topology():
    return Topology.of_placement(contiguous_placement(1, 4, 4), 0)


def test_full_step_by_hand():
    (full,) = build_systems(("full",), budget=0, stand_in_memory=1.0)
    plan = plan_layer(full, SimRouting(INDICES, WEIGHTS, 4), topology(), 1.0, "score")
    c = layer_cost(
        plan, topology(), COST, stand_in=None, exchange_mode=xchg.COUNTS, exchange_row_bytes=0, num_experts=4
    )
    # remote rows: t0->1 (same node), t0->2 (other node), t1->0, t2->3, t2->1 (other node), t3->2
    # busiest: rank 0 sends 8 B over NVLink (1 s) and 8 B over RDMA (2 s); rank 1 receives the same
    assert c.dispatch_s == pytest.approx(1 + 2) and c.combine_s == pytest.approx(3)
    # rows per rank 1, 3, 2, 2: rank 1 computes 3 x 192 FLOPs at 192 FLOP/s
    assert c.compute_s == pytest.approx(3)
    # counts exchange: a (k, E) int32 table = 32 B to each peer: 1 in the node (4 s), 2 outside (16 s)
    assert c.exchange_s == pytest.approx(1 + 16)
    assert c.seconds == pytest.approx(26)
    assert c.a2a_bytes == 6 * 8 * 2 and c.exchange_bytes == 4 * 3 * 32
    assert c.work.tolist() == [192.0, 576.0, 384.0, 384.0] and c.imbalance == pytest.approx(0.5)


def test_stand_in_step_by_hand():
    (standin,) = build_systems(("standin",), budget=1, stand_in_memory=1.0)
    half = AssignmentStandInCost.per_assignment(1.0, 0.5, 2, expert_flops(COST))
    plan = plan_layer(standin, SimRouting(INDICES, WEIGHTS, 4), topology(), 1.0, "score")
    # capacity per rank ceil(1.0 x 4 x 2 / 4) = 2; rank 1 gets 3, the lowest weight (t2's 0.2) overflows
    assert plan.shadow_served.nonzero().tolist() == [[2, 1]]
    row = exchange_layout_bytes("shadow", 4, 2, COST)
    assert row == 2 * 1 + 2 * 2  # two uint8 expert ids, two bf16 weights
    c = layer_cost(
        plan,
        topology(),
        COST,
        stand_in=half,
        exchange_mode=exchange_of(standin, "score"),
        exchange_row_bytes=row,
        num_experts=4,
    )
    assert exchange_of(standin, "score") == xchg.ROWS
    # rows exchange: 4 B count + 1 token x 6 B = 10 B per peer: 1.25 s in the node, 20 B / 4 = 5 s outside
    assert c.exchange_s == pytest.approx(1 + 5)
    assert c.dispatch_s == pytest.approx(3)  # rank 0 still sends 8 B over RDMA
    # work: rows 1, 2, 2, 2 x 192, and rank 2 (t2's home) spends half an expert on the stand-in
    assert c.work.tolist() == [192.0, 384.0, 480.0, 384.0]
    assert c.compute_s == pytest.approx(2.5) and c.seconds == pytest.approx(14.5)
    assert c.imbalance == pytest.approx(120 / 360)
    assert c.counts["shadow"] == 1 and c.counts["expert"] == 7


def test_stand_in_cost_charges_its_flops_table_and_memory():
    shared = AssignmentStandInCost(0.9, [0.0, 0.4, 0.5, 0.6], expert_flops=10.0)  # one trunk pass per token
    served = torch.tensor([[True, False, False], [True, True, True], [False, False, False]])
    assert shared.token_flops(served).tolist() == [4.0, 6.0, 0.0]
    assert shared.memory_expert_equiv(123) == 0.9 and shared.flops_per_assignment() == 4.0


def test_one_node_moves_everything_over_nvlink():
    cost = COST.replace(ranks_per_node=4)
    (full,) = build_systems(("full",), budget=0, stand_in_memory=1.0)
    plan = plan_layer(full, SimRouting(INDICES, WEIGHTS, 4), topology(), 1.0, "score")
    c = layer_cost(
        plan, topology(), cost, stand_in=None, exchange_mode=xchg.COUNTS, exchange_row_bytes=0, num_experts=4
    )
    # rank 0 sends 2 rows = 16 B at 8 B/s; rank 1 and rank 2 receive 2 rows each
    assert c.dispatch_s == pytest.approx(1 + 2)
    assert c.exchange_s == pytest.approx(1 + 3 * 32 / 8)
