"""The shifting-load replay: stale EPLB refresh, replica routing, token streams, systems at equal memory."""

import pytest
import torch

from moe_understudy.config import ClusterCost, ShiftSimConfig
from moe_understudy.runtime.placement import rebalance_from_window
from moe_understudy.sim.cost import AssignmentStandInCost, expert_flops
from moe_understudy.sim.replay import replay, summarize
from moe_understudy.sim.stream import Source, StreamConfig, stream
from moe_understudy.sim.systems import EPLBSchedule, build_systems
from moe_understudy.sim.traces import RoutingTrace, synthetic_trace


def hot_load(expert: int, E: int = 8, L: int = 2) -> torch.Tensor:
    load = torch.full((L, E), 10.0)
    load[:, expert] = 200.0
    return load


def test_stale_plan_serves_until_its_refresh_then_follows_the_last_window():
    schedule = EPLBSchedule(num_ranks=4, window=2, refresh_every=3, slot_counts=(3,))
    for step in (-2, -1):  # warm-up: expert 0 is hot
        schedule.tick(step)
        schedule.observe(hot_load(0))
    schedule.tick(0)
    first = schedule.placement(3)
    assert (first.replica_count()[:, 0] > 1).all() and schedule.refreshes == [0]
    schedule.observe(hot_load(5))
    for step in (1, 2):  # no refresh before step 3: the stale plan still replicates expert 0
        schedule.tick(step)
        assert schedule.placement(3) is first
        schedule.observe(hot_load(5))
    schedule.tick(3)
    refreshed = schedule.placement(3)
    assert refreshed is not first and schedule.refreshes == [0, 3]
    # planned on the last `window` steps (1 and 2), where expert 5 was hot
    again = rebalance_from_window(torch.stack([hot_load(5)] * 2), 4, 3)
    assert torch.equal(refreshed.phys_to_logical, again.phys_to_logical)
    assert (refreshed.replica_count()[:, 5] > 1).all()
    schedule.tick(4)
    assert schedule.placement(3) is refreshed and schedule.last_due(5) == 3


def source(blocks: int = 24, prose: int = 8, S: int = 16) -> Source:
    trace = synthetic_trace(2, (blocks + prose) * S, 16, 4, zipf=1.0, seed=0)
    # prose blocks route elsewhere: shift their logits so other experts win
    logits = trace.logits.clone()
    logits[:, blocks * S :] = logits[:, blocks * S :].roll(5, dims=-1)
    w, i = torch.topk(torch.softmax(logits, -1), 4, dim=-1)
    trace = RoutingTrace(logits, w / w.sum(-1, keepdim=True), i, None, "synthetic")
    return Source(trace, S, blocks, prose)


def test_decode_stream_advances_every_sequence_one_token_and_shifts_to_prose():
    src = source()
    cfg = StreamConfig(
        "domain_shift",
        num_ranks=4,
        tokens_per_rank=8,
        steps=40,
        warmup_steps=4,
        sequence_tokens=8,
        shift_at=0.25,
    )
    steps = list(stream(src, cfg))
    assert [s.step for s in steps] == list(range(-4, 40))
    assert all(s.rows.numel() == 32 for s in steps)
    before = {s.step: s for s in steps}
    still = before[0].rows + 1 == before[1].rows  # most sequences just moved on by one token
    assert still.float().mean() > 0.75
    assert before[9].prose_fraction == 0.0  # the shift is at step 10
    assert before[10 + 8].prose_fraction == 1.0  # ... and complete one sequence length later
    assert 0.0 < before[13].prose_fraction < 1.0


def test_prefill_stream_takes_whole_blocks_per_rank_and_bursts_heat_one_expert():
    src = source()
    cfg = StreamConfig(
        "hot_burst", 2, 32, steps=20, warmup_steps=2, phase="prefill", burst_every=10, burst_len=3
    )
    steps = {s.step: s for s in stream(src, cfg)}
    rows = steps[0].rows.view(2, 2, 16)
    assert torch.equal(rows[..., 1:] - rows[..., :1], torch.arange(1, 16).expand(2, 2, 15))
    assert [t for t, s in steps.items() if s.hot is not None] == [7, 8, 9, 17, 18, 19]
    assert torch.equal(steps[7].hot, steps[9].hot) and steps[7].hot.shape == (2,)


def test_systems_share_one_memory_budget():
    systems = {
        s.name: s
        for s in build_systems(
            ("full", "eplb_stale", "eplb_stale_standin", "standin", "expanded_drop@1.5"), 2, 0.99
        )
    }
    assert systems["eplb_stale"].memory(0.99) == 2.0
    assert systems["eplb_stale_standin"].extra_slots == 1 and systems["eplb_stale_standin"].memory(
        0.99
    ) == pytest.approx(1.99)
    assert systems["full"].memory(0.99) == 0.0 and systems["expanded_drop@1.5"].capacity_factor == 1.5
    with pytest.raises(ValueError, match="memory budget"):
        build_systems(("standin",), 0, 1.0)
    with pytest.raises(ValueError, match="systems must be"):
        ShiftSimConfig(systems=("full", "teleport"))


def test_replay_charges_every_system_at_every_step():
    src = source()
    cost = ClusterCost()
    systems = build_systems(
        ("full", "drop", "expanded_drop", "eplb_fresh", "eplb_stale", "eplb_stale_standin", "standin"), 1, 1.0
    )
    stand_ins = [AssignmentStandInCost.per_assignment(1.0, 0.5, 4, expert_flops(cost))] * 2
    cfg = StreamConfig("domain_shift", 4, 16, steps=12, warmup_steps=4, sequence_tokens=8, shift_at=0.25)
    out = replay(
        src,
        cfg,
        systems,
        cost,
        capacity_factor=1.0,
        priority="score",
        split=None,
        stand_ins=stand_ins,
        window=4,
        refresh_every=6,
        fresh_window=4,
    )
    assert out.refreshes == [0, 6]
    rows = {name: summarize(r) for name, r in out.records.items()}
    assert all(len(r) == 12 for r in out.records.values())
    assert rows["full"]["frac_dropped"] == rows["full"]["frac_stand_in"] == 0.0
    assert rows["drop"]["frac_dropped"] > 0 and rows["standin"]["frac_stand_in"] == pytest.approx(
        rows["drop"]["frac_dropped"]
    )
    # balancing never loses to the contiguous full placement at its straggler
    assert rows["eplb_fresh"]["rank_work_imbalance"] < rows["full"]["rank_work_imbalance"]
    assert rows["standin"]["step_ms_p50"] < rows["full"]["step_ms_p50"]
    ages = [r.plan_age for r in out.records["eplb_stale"]]
    assert ages == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5]
    # charging every 3rd step, one layer each: the stale plan still refreshes at step 6
    thin = replay(
        src,
        cfg,
        systems[:5],
        cost,
        capacity_factor=1.0,
        priority="score",
        split=None,
        stand_ins=stand_ins,
        window=4,
        refresh_every=6,
        fresh_window=4,
        cycle_layers=True,
        stride=3,
    )
    assert [r.step for r in thin.records["eplb_stale"]] == [0, 3, 6, 9] and thin.refreshes == [0, 6]
    assert [r.plan_age for r in thin.records["eplb_stale"]] == [0, 3, 0, 3]
    assert all(r.layers == 1 for r in thin.records["full"])
