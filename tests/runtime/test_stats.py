"""Load statistics and all-to-all byte accounting."""

from __future__ import annotations

import torch

from moe_understudy.moe.adapters import Routing
from moe_understudy.runtime.policies import Plan, plan_routing
from moe_understudy.runtime.stats import LoadRecorder, all_to_all_bytes, contiguous_placement, token_devices


def plan_of(indices, expert_served, understudy_tokens=None, dispatched=None) -> Plan:
    indices = torch.tensor(indices)
    served = torch.tensor(expert_served)
    none = torch.zeros_like(served)
    ut = (
        torch.zeros(len(indices), dtype=torch.bool)
        if understudy_tokens is None
        else torch.tensor(understudy_tokens)
    )
    dropped = ~served & ~ut[:, None]
    return Plan(indices, torch.ones(indices.shape), served, none, dropped, ut, dispatched)


def test_contiguous_layouts():
    assert contiguous_placement(8, 4).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert token_devices(6, 2).tolist() == [0, 0, 0, 1, 1, 1]


def test_only_remote_expert_served_assignments_move_bytes():
    # Tokens 0,1 live on device 0 and 2,3 on device 1; expert 0 on device 0, expert 1 on device 1.
    plan = plan_of([[0], [1], [0], [1]], [[True], [True], [True], [True]])
    assert all_to_all_bytes(plan, 2, hidden_size=8, dtype_bytes=4, num_devices=2) == (2 * 32, 2 * 32)
    dropped = plan_of([[0], [1], [0], [1]], [[True], [False], [True], [True]])
    assert all_to_all_bytes(dropped, 2, 8, 4, 2) == (32, 32)  # token 1 no longer travels
    understudy = plan_of([[0], [1], [0], [1]], [[True], [False], [False], [True]], [False, True, True, False])
    assert all_to_all_bytes(understudy, 2, 8, 4, 2) == (0, 0)
    assert all_to_all_bytes(plan, 2, 8, 4, num_devices=1) == (0, 0)


def test_late_deadline_work_is_dispatched_but_not_combined():
    plan = plan_of(
        [[0], [1], [0], [1]],
        [[True], [False], [True], [True]],
        [False, True, False, False],
        dispatched=torch.ones(4, 1, dtype=torch.bool),
    )
    assert all_to_all_bytes(plan, 2, 8, 4, 2) == (64, 32)


def test_custom_placement_changes_what_is_remote():
    plan = plan_of([[0], [1], [0], [1]], [[True]] * 4)
    swapped = torch.tensor([1, 0])
    assert all_to_all_bytes(plan, 2, 8, 4, 2, placement=swapped) == (64, 64)  # tokens 0 and 3 now remote


def test_recorder_summary_fractions_add_up():
    logits = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
    w, idx = torch.softmax(logits, -1).topk(2)
    r = Routing(logits, w, idx)
    rec = LoadRecorder(num_devices=2)
    for policy in ("drop", "understudy"):
        rec.record(0, r, plan_routing(r, policy, 10), 10, hidden_size=8, dtype_bytes=4)
    s = rec.summary()
    assert s["steps"] == 2
    assert abs(s["frac_expert"] + s["frac_dropped"] + s["frac_understudy"] + s["frac_shadow"] - 1) < 1e-9
    assert s["mean_max_over_mean"] == max(r.tokens_per_expert()).item() / 16
    assert s["bytes_moved"] == s["dispatch_bytes"] + s["combine_bytes"]
