"""The ledger: bytes on the wire (all-to-all and routing exchange), work per device, memory per device."""

from __future__ import annotations

import pytest
import torch
from load_aware_helpers import tiny_model

from moe_understudy.moe.adapters import Routing, find_moe_layers
from moe_understudy.runtime import exchange as xchg
from moe_understudy.runtime.core import Step
from moe_understudy.runtime.ledger import LoadRecorder, Topology, rank_work, traffic
from moe_understudy.runtime.placement import replicate_hot_experts
from moe_understudy.runtime.plan import Plan
from moe_understudy.runtime.policies import plan_routing
from moe_understudy.understudy.modules import build_understudy


def plan_of(indices, expert_served, understudy_tokens=None, dispatched=None, shadow=None) -> Plan:
    indices = torch.tensor(indices)
    served = torch.tensor(expert_served)
    shadow = torch.zeros_like(served) if shadow is None else torch.tensor(shadow)
    ut = (
        torch.zeros(len(indices), dtype=torch.bool)
        if understudy_tokens is None
        else torch.tensor(understudy_tokens)
    )
    dropped = ~served & ~ut[:, None] & ~shadow
    return Plan(indices, torch.ones(indices.shape), served, shadow, dropped, ut, dispatched)


def moved(plan: Plan, topo: Topology, row_bytes: int = 32):
    home = topo.token_device(plan.num_tokens)
    t = traffic(home, topo.destinations(plan), topo.num_devices, row_bytes)
    return t.dispatch_bytes, t.combine_bytes


def test_contiguous_layouts():
    topo = Topology.contiguous(8, 4)
    assert topo.expert_device.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert Topology.contiguous(4, 2).token_device(6).tolist() == [0, 0, 0, 1, 1, 1]


def test_only_remote_expert_served_assignments_move_bytes():
    # Tokens 0,1 live on device 0 and 2,3 on device 1; expert 0 on device 0, expert 1 on device 1.
    two = Topology.contiguous(2, 2)
    plan = plan_of([[0], [1], [0], [1]], [[True], [True], [True], [True]])
    assert moved(plan, two) == (2 * 32, 2 * 32)
    dropped = plan_of([[0], [1], [0], [1]], [[True], [False], [True], [True]])
    assert moved(dropped, two) == (32, 32)  # token 1 no longer travels
    understudy = plan_of([[0], [1], [0], [1]], [[True], [False], [False], [True]], [False, True, True, False])
    assert moved(understudy, two) == (0, 0)
    assert moved(plan, Topology.contiguous(2, 1)) == (0, 0)


def test_late_deadline_work_travels_both_ways():
    plan = plan_of(
        [[0], [1], [0], [1]],
        [[True], [False], [True], [True]],
        [False, True, False, False],
        dispatched=torch.ones(4, 1, dtype=torch.bool),
    )
    assert moved(plan, Topology.contiguous(2, 2)) == (64, 64)  # its late result still comes back


def test_custom_placement_changes_what_is_remote():
    plan = plan_of([[0], [1], [0], [1]], [[True]] * 4)
    assert moved(plan, Topology(2, torch.tensor([1, 0]))) == (64, 64)  # tokens 0 and 3 now remote


def test_replicated_experts_send_to_the_replica_that_serves_the_assignment():
    placement = replicate_hot_experts(torch.tensor([[100.0, 1.0]]), num_ranks=2, slots_per_rank=2)
    topo = Topology(2, placement.expert_rank()[0], placement, 0)
    plan = plan_of([[0], [0], [0], [0]], [[True]] * 4)
    dest = topo.destinations(plan)
    assert set(dest[:, 0].tolist()) == {0, 1}  # expert 0's work split over replicas on both ranks


def test_shadow_served_assignments_add_work_on_the_tokens_own_device():
    layer = find_moe_layers(tiny_model())[0]
    shadows = build_understudy("shadows", layer, width=8)
    topo = Topology.contiguous(layer.num_experts, 2)
    plan = plan_of([[0, 1], [2, 3]], [[True, False], [True, True]], shadow=[[False, True], [False, False]])
    home, dest = topo.token_device(2), topo.destinations(plan)
    with_shadow = rank_work(plan, home, dest, 2, layer.expert_flops_per_token(), shadows)
    without = rank_work(plan, home, dest, 2, layer.expert_flops_per_token(), None)
    assert with_shadow[0] - without[0] == pytest.approx(shadows.flops_per_assignment())  # token 0 lives on 0
    assert with_shadow[1] == without[1]


def test_understudy_work_counts_every_token_it_runs_on():
    layer = find_moe_layers(tiny_model())[0]
    dense = build_understudy("dense", layer, intermediate=16)
    topo = Topology.contiguous(layer.num_experts, 2)
    plan = plan_of([[0, 1], [2, 3]], [[False, False], [True, True]], [True, False])
    home, dest = topo.token_device(2), topo.destinations(plan)
    work = rank_work(plan, home, dest, 2, layer.expert_flops_per_token(), dense)
    assert work[0] == pytest.approx(dense.flops_per_token())  # device 0: the understudy token only
    assert work[1] == pytest.approx(2 * layer.expert_flops_per_token())  # device 1: experts 2, 3
    upfront = Plan(
        *[getattr(plan, f) for f in ("indices", "weights", "expert_served", "shadow_served")],
        plan.dropped,
        plan.understudy_tokens,
        None,
        True,
    )
    assert rank_work(upfront, home, dest, 2, layer.expert_flops_per_token(), dense)[1] == pytest.approx(
        2 * layer.expert_flops_per_token() + dense.flops_per_token()
    )  # deadline: the understudy also ran for token 1, up front


def _routing(seed=0, T=32, E=4):
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(seed))
    w, idx = torch.softmax(logits, -1).topk(2)
    return Routing(logits, w / w.sum(-1, keepdim=True), idx)


def test_exchange_sends_counts_where_position_priority_permits_and_compact_rows_otherwise():
    assert xchg.exchange_mode("drop", "position") == xchg.COUNTS
    assert xchg.exchange_mode("full", "score") == xchg.COUNTS
    assert xchg.exchange_mode("drop", "score") == xchg.ROWS
    assert xchg.exchange_mode("understudy", "position") == xchg.ROWS
    assert xchg.exchange_mode("drop", "position", "rank") == xchg.ROWS
    counts = xchg.exchange_bytes(xchg.COUNTS, [16, 16], num_experts=8, top_k=2, layout_bytes=0)
    assert counts == [2 * 8 * 4] * 2  # one (k, E) int32 table to the one other rank
    layout = xchg.row_layout("drop", 8, 2, torch.float32)
    assert xchg.row_bytes(layout) == 2 * 1 + 2 * 4  # uint8 experts, fp32 weights
    rows = xchg.exchange_bytes(xchg.ROWS, [16, 12], 8, 2, xchg.row_bytes(layout))
    assert rows == [(4 + 16 * 10) * 1] * 2  # token count + padded rows, each to one peer
    assert xchg.row_bytes(xchg.row_layout("reroute", 8, 2, torch.bfloat16)) == 2 + 4 + 6
    assert xchg.index_dtype(255) == torch.uint8 and xchg.index_dtype(256) == torch.int16


def test_packed_rows_round_trip_exactly():
    r = _routing()
    layout = xchg.row_layout("reroute", 4, 2, torch.float32)
    alternatives = torch.argsort(-r.logits, -1)[:, 2:]
    rows = xchg.pack_rows({"indices": r.indices, "weights": r.weights, "alternatives": alternatives}, layout)
    back = xchg.unpack_rows(rows, layout)
    assert rows.dtype == torch.uint8 and rows.shape == (32, xchg.row_bytes(layout))
    assert torch.equal(back["indices"], r.indices) and torch.equal(back["weights"], r.weights)
    assert torch.equal(back["alternatives"], alternatives)


def test_places_from_per_rank_counts_equal_the_global_position_queue():
    r = _routing(3, T=48, E=4)
    whole = plan_routing(r, "drop", capacity=9, priority="position")
    halves = [slice(0, 20), slice(20, 48)]  # two ranks with uneven batches
    counts = torch.stack([xchg.choice_counts(r.indices[h], r.weights[h], 4) for h in halves])
    for rank, h in enumerate(halves):
        places = xchg.global_places(r.indices[h], r.weights[h], counts, rank)
        assert torch.equal(places < 9, whole.expert_served[h])
    sent = xchg.admitted(counts, 9)
    for rank, h in enumerate(halves):
        served = whole.expert_served[h]
        assert sent[rank].tolist() == torch.bincount(r.indices[h][served], minlength=4).tolist()


def test_recorder_summary_adds_up_and_charges_the_exchange():
    layer = find_moe_layers(tiny_model())[0]
    r = _routing(E=layer.num_experts)
    rec = LoadRecorder()
    topo = Topology.contiguous(layer.num_experts, 2)
    for policy in ("drop", "understudy"):
        mode = xchg.exchange_mode(policy, "position")
        row = xchg.row_bytes(xchg.row_layout(policy, layer.num_experts, 2, torch.float32))
        rec.record(Step(layer, r, plan_routing(r, policy, 10), 10, 4, None, topo, mode, row))
    s = rec.summary()
    assert s["steps"] == 2
    assert abs(s["frac_expert"] + s["frac_dropped"] + s["frac_understudy"] + s["frac_shadow"] - 1) < 1e-9
    assert s["mean_max_over_mean"] == max(r.tokens_per_expert()).item() / 16
    assert s["bytes_moved"] == s["dispatch_bytes"] + s["combine_bytes"]
    assert s["exchange_bytes"] == 2 * (2 * 4 * 4) + 2 * (4 + 16 * 10)  # counts for drop, rows for understudy
    assert s["total_bytes"] == s["bytes_moved"] + s["exchange_bytes"]


def test_a_recorder_of_empty_steps_reports_zeros():
    layer = find_moe_layers(tiny_model())[0]
    empty = Routing(torch.zeros(0, layer.num_experts), torch.zeros(0, 2), torch.zeros(0, 2, dtype=torch.long))
    rec = LoadRecorder()
    rec.record(Step(layer, empty, plan_routing(empty, "drop", 0), 0, 4, None, Topology.contiguous(4, 2)))
    s = rec.summary()
    assert s["frac_dropped"] == 0.0 and s["bytes_per_token"] == 0.0 and s["bytes_moved"] == 0
    assert s["total_bytes"] == s["exchange_bytes"] == 2 * (2 * 4 * 4)  # ranks still send their count tables
