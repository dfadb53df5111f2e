"""Cluster simulator: cost model arithmetic and what each policy does to time, bytes and load."""

import json

import pytest
import torch

from moe_understudy.config import ClusterCost, SimConfig
from moe_understudy.sim.cost import compute_seconds, flat_all_to_all_seconds, understudy_slots
from moe_understudy.sim.simulator import simulate_cluster
from moe_understudy.sim.traces import synthetic_trace
from moe_understudy.sim.workflow import quality_lookup, run_simulation

POLICIES = ("full", "drop", "reroute", "understudy", "replication", "speculative")


@pytest.fixture(scope="module")
def skewed():
    return synthetic_trace(2, 4000, 8, 2, zipf=1.2, seed=0)


@pytest.fixture(scope="module")
def at8(skewed):
    rows = simulate_cluster(skewed, 8, POLICIES, ClusterCost(), tokens_per_rank=128, steps=1)
    return {r.policy: r for r in rows}


def test_flat_all_to_all_time_is_latency_plus_the_busiest_rank_over_bandwidth():
    cost = ClusterCost(link_gbps=10.0, nvlink_gbps=100.0, ranks_per_node=1, latency_us=5.0)
    t = flat_all_to_all_seconds(torch.tensor([10e9, 2e9]), torch.tensor([1e9, 20e9]), cost)
    assert t == pytest.approx(5e-6 + 2.0)
    assert flat_all_to_all_seconds(torch.tensor([5.0]), torch.tensor([5.0]), cost) == 0.0  # one rank
    assert compute_seconds(torch.tensor([4e12, 8e12]), ClusterCost(device_tflops=2.0)) == pytest.approx(4.0)


def test_understudy_memory_budget_in_expert_slots():
    assert understudy_slots(ClusterCost(understudy_cost=0.5), top_k=2) == 1
    assert understudy_slots(ClusterCost(understudy_cost=0.25), top_k=2) == 0


def test_step_time_is_the_sum_of_its_parts(at8):
    for r in at8.values():
        assert r.step_ms == pytest.approx(r.exchange_ms + r.dispatch_ms + r.compute_ms + r.combine_ms)


def test_full_and_baselines_degrade_nothing_while_drop_does(at8):
    for p in ("full", "replication", "speculative"):
        assert at8[p].degraded_fraction == 0.0
    assert at8["drop"].degraded_fraction > 0.2


def test_capacity_policies_cut_the_straggler_of_a_skewed_trace(at8):
    full = at8["full"]
    assert full.expert_imbalance > 2.0
    for p in ("drop", "reroute", "understudy", "replication"):
        assert at8[p].step_ms < full.step_ms
        assert at8[p].expert_imbalance < full.expert_imbalance


def test_understudy_tokens_stay_home_so_fewer_bytes_move(at8):
    assert at8["understudy"].wire_bytes < at8["full"].wire_bytes
    # the understudy's FLOPs land on the tokens' own ranks: rank work stays below expert-row skew
    assert 0.0 <= at8["understudy"].work_imbalance < at8["understudy"].expert_imbalance - 1.0


def test_speculation_moves_rows_off_the_critical_path_but_not_off_the_wire(at8):
    spec, full = at8["speculative"], at8["full"]
    assert spec.critical_bytes <= full.critical_bytes
    assert spec.wire_bytes >= spec.critical_bytes
    assert 0.0 <= spec.speculation_accuracy <= 1.0
    assert spec.compute_ms == pytest.approx(full.compute_ms)


def test_more_ranks_than_experts_expands_experts_to_one_per_rank(skewed):
    rows = simulate_cluster(skewed, 32, ("full",), ClusterCost(), tokens_per_rank=64, steps=1)
    assert rows[0].experts == 32 and rows[0].tokens == 32 * 64


def test_quality_is_read_from_the_runtime_results_or_marked_missing(tmp_path):
    f = tmp_path / "q.json"
    f.write_text(
        json.dumps({"rows": [{"policy": "understudy", "capacity_factor": 1.0, "ppl_increase_pct": 5.8}]})
    )
    assert quality_lookup(f, "understudy", 1.0) == "+5.8% ppl"
    assert quality_lookup(f, "drop", 1.0) == "n/a"
    assert quality_lookup(tmp_path / "missing.json", "understudy", 1.0) == "n/a"
    assert quality_lookup(f, "replication", 1.0) == "exact"


def test_simulation_writes_json_plot_and_config(tmp_path):
    cfg = SimConfig(
        ranks=(4, 16), policies=("full", "understudy"), tokens_per_rank=32, steps=1, out=str(tmp_path)
    )
    payload = run_simulation(cfg)
    assert {(r["ranks"], r["policy"]) for r in payload["results"]} == {
        (4, "full"),
        (4, "understudy"),
        (16, "full"),
        (16, "understudy"),
    }
    assert (tmp_path / "sim.png").stat().st_size > 0
    assert SimConfig.from_yaml(tmp_path / "sim.yaml") == cfg
    assert json.loads((tmp_path / "sim.json").read_text())["trace"]["experts"] == 8


def test_simulate_command_rejects_an_unknown_policy_in_one_sentence(tmp_path):
    from typer.testing import CliRunner

    from moe_understudy.cli import app

    res = CliRunner().invoke(app, ["simulate", "--policies", "full,teleport", "--out", str(tmp_path)])
    assert res.exit_code == 2
    assert "policies must be" in res.output and "teleport" in res.output


def test_rerouted_tokens_count_as_degraded(at8):
    assert at8["reroute"].degraded_fraction > 0.05
