"""Expert parallelism over gloo on loopback: equals one process, counts its bytes, fails fast.

Each test spawns N processes (torch.multiprocessing) that build the same tiny seeded model. Every
rank computes the single-process reference on the whole batch with `runtime.layer.patch`, then the
expert-parallel forward on its own slice, and writes what it saw to a JSON file the test reads.
"""

import json
import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# Imported here, before the workers fork, so that no worker pays for importing transformers again.
from moe_understudy.config import EPConfig, RuntimeConfig
from moe_understudy.moe.adapters import find_moe_layers
from moe_understudy.moe.presets import TINY_FAMILIES, build_model, preset_config, tiny_config
from moe_understudy.runtime.ep import EPRecorder, PeerFailure, patch_ep, sweep_runs
from moe_understudy.runtime.layer import patch, unpatch
from moe_understudy.runtime.placement import plan_placement, replicate_hot_experts
from moe_understudy.understudy.modules import build_understudy

pytestmark = pytest.mark.dist

# Build the models once in the parent so that the model classes are loaded before forking.
build_model(preset_config("quick", vocab_size=300), seed=0)
for _family in TINY_FAMILIES:
    build_model(tiny_config(_family), seed=0)

from moe_understudy.runtime.ledger import LoadRecorder  # noqa: E402
from moe_understudy.runtime.policies import NEEDS_SHADOWS, POLICIES  # noqa: E402

ALL_POLICIES = ("full", "drop", "drop_renorm", "reroute", "understudy", "shadow", "layer", "deadline")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank, world, port, timeout_s=30.0):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))


def _stand_ins(model, policy):

    arch = "shadows" if policy in NEEDS_SHADOWS else "dense"
    return {m.index: build_understudy(arch, m, seed=m.index, intermediate=32) for m in find_moe_layers(model)}


def _model(family):
    if family is None:
        return build_model(preset_config("quick", vocab_size=300), seed=0), 300
    return build_model(tiny_config(family), seed=0), 97


def _equivalence_worker(rank, world, port, policies, placement_kind, out_dir, family=None, scope="expert"):

    _join(rank, world, port)
    passed = []  # (bytes of the input tensor, input splits) of every all_to_all_single call
    real = dist.all_to_all_single

    def spy(output, input, output_split_sizes=None, input_split_sizes=None, **kw):
        passed.append((input.numel() * input.element_size(), list(input_split_sizes)))
        return real(output, input, output_split_sizes, input_split_sizes, **kw)

    dist.all_to_all_single = spy
    model, vocab = _model(family)
    ids = torch.randint(0, vocab, (2 * world, 16), generator=torch.Generator().manual_seed(1))
    mine = slice(2 * rank, 2 * rank + 2)
    if placement_kind == "replicate":
        load = torch.tensor([[50.0, 5, 5, 5], [5, 50, 5, 5]])
        placement = replicate_hot_experts(load, world, slots_per_rank=3 if world == 2 else 2)
    else:
        moe = find_moe_layers(model)
        placement = plan_placement(len(moe), moe[0].num_experts, world)
    result = {}
    for policy in policies:
        stand_ins = _stand_ins(model, policy)
        with torch.no_grad():
            # the one-process reference simulates the same devices (contiguous experts, tokens by rank)
            patch(
                model, stand_ins, policy=policy, capacity_factor=0.5, capacity_scope=scope, num_devices=world
            )
            ref = model(input_ids=ids).logits[mine]
            unpatch(model)
            recorder = EPRecorder(rank, world)
            patch_ep(
                model,
                placement,
                stand_ins,
                RuntimeConfig(policy=policy, capacity_factor=0.5, capacity_scope=scope),
                recorder,
                keep_all_experts=True,
            )
            passed.clear()
            out = model(input_ids=ids[mine]).logits
            unpatch(model)
        result[policy] = {
            "max_diff": float((out - ref).abs().max()),
            "records": recorder.records,
            "passed": list(passed),
        }
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def _run(world, policies, placement_kind, tmp_path, family=None, scope="expert"):
    mp.start_processes(
        _equivalence_worker,
        args=(world, free_port(), policies, placement_kind, tmp_path, family, scope),
        nprocs=world,
        start_method="fork",
    )
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return _run(2, ALL_POLICIES, "contiguous", tmp_path_factory.mktemp("ep2"))


@pytest.mark.parametrize("policy", ALL_POLICIES)
def test_two_rank_ep_equals_one_process(two_ranks, policy):
    for rank in two_ranks:
        assert rank[policy]["max_diff"] < 1e-5


def test_four_rank_ep_with_replicated_hot_experts_equals_one_process(tmp_path):
    ranks = _run(4, ("full", "understudy", "reroute"), "replicate", tmp_path)
    for rank in ranks:
        for policy in ("full", "understudy", "reroute"):
            assert rank[policy]["max_diff"] < 1e-5
    loads = [sum(r["rank_load"] for r in rank["full"]["records"]) for rank in ranks]
    assert min(loads) > 0  # every rank computed expert work


def test_rank_capacity_under_ep_equals_one_process_and_caps_every_rank(tmp_path):
    policies = ("drop", "understudy", "reroute", "shadow")
    for rank in _run(2, policies, "contiguous", tmp_path, scope="rank"):
        for policy in policies:
            assert rank[policy]["max_diff"] < 1e-5, policy
            for rec in rank[policy]["records"]:
                # capacity per rank = ceil(0.5 * 64 tokens * k 2 / 2 ranks) = 32 expert rows
                assert rec["rank_load"] <= 32, (policy, rec)


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3", "olmoe", "qwen3_moe"])
def test_ep_equals_one_process_for_other_families(tmp_path, family):
    for rank in _run(2, ("full", "understudy"), "contiguous", tmp_path, family):
        assert rank["full"]["max_diff"] < 1e-5 and rank["understudy"]["max_diff"] < 1e-5


def test_a_sweep_runs_full_once_and_every_other_policy_at_every_capacity():
    cfg = EPConfig(policies=("drop", "full", "understudy"), capacities=(0.5, 1.0))
    assert sweep_runs(cfg) == [
        ("full", 1.0),
        ("drop", 0.5),
        ("drop", 1.0),
        ("understudy", 0.5),
        ("understudy", 1.0),
    ]


def test_byte_counters_equal_the_sizes_passed_to_all_to_all(two_ranks):
    for rank in two_ranks:
        for policy in ("full", "drop", "understudy"):
            recs, passed = rank[policy]["records"], rank[policy]["passed"]
            assert len(passed) == 2 * len(recs)  # dispatch + combine per layer
            for rec, dispatch, combine in zip(recs, passed[0::2], passed[1::2], strict=True):
                assert dispatch[1] == rec["send_splits"]
                assert combine[1] == rec["recv_splits"]
                assert dispatch[0] == rec["dispatch_send_bytes"] + rec["self_bytes"]
                assert dispatch[0] + combine[0] == rec["passed_bytes"]


def test_what_one_rank_sends_the_other_receives(two_ranks):
    for policy in ("full", "understudy"):
        a, b = two_ranks[0][policy]["records"], two_ranks[1][policy]["records"]
        for ra, rb in zip(a, b, strict=True):
            assert ra["send_splits"][1] == rb["recv_splits"][0]
            assert ra["dispatch_send_bytes"] == rb["dispatch_recv_bytes"]


def test_understudy_tokens_never_leave_their_rank(two_ranks):
    full = sum(r["dispatch_send_bytes"] for rank in two_ranks for r in rank["full"]["records"])
    und = sum(r["dispatch_send_bytes"] for rank in two_ranks for r in rank["understudy"]["records"])
    tokens = sum(r["understudy_tokens"] for rank in two_ranks for r in rank["understudy"]["records"])
    assert tokens > 0 and und < full


def _dead_rank_worker(rank, world, port, out_dir):

    _join(rank, world, port, timeout_s=3.0)
    if rank == 1:
        return  # this rank dies before the first collective
    model = build_model(preset_config("quick", vocab_size=300), seed=0)
    patch_ep(model, None, None, RuntimeConfig(), keep_all_experts=True)
    try:
        model(input_ids=torch.zeros(1, 8, dtype=torch.long))
        (out_dir / "rank0.txt").write_text("no error")
    except PeerFailure as err:
        (out_dir / "rank0.txt").write_text(str(err))


def test_a_dead_rank_makes_the_others_fail_with_a_clear_error(tmp_path):
    import time

    t0 = time.monotonic()
    mp.start_processes(_dead_rank_worker, args=(2, free_port(), tmp_path), nprocs=2, start_method="fork")
    message = (tmp_path / "rank0.txt").read_text()
    assert "rank 0: all_gather" in message and "another rank probably died" in message
    assert time.monotonic() - t0 < 40


def _evaluation_worker(rank, world, port, model_dir, out_dir):
    from moe_understudy.runtime.ep import run_ep_evaluation

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    cfg = EPConfig(
        model=str(model_dir),
        policies=("full", "drop"),
        capacities=(1.0,),
        max_blocks=8,
        blocks_per_rank=2,
        out=str(out_dir),
    )
    run_ep_evaluation(cfg)


def test_ep_evaluation_perplexity_under_full_equals_one_process(tmp_path):
    from moe_understudy.data import train_bpe
    from moe_understudy.eval.metrics import perplexity

    model_dir = tmp_path / "model"
    tokenizer = train_bpe(["def f(x):\n    return x + 1\n" * 20, "class A:\n    pass\n" * 20], 300, model_dir)
    model = build_model(preset_config("quick", vocab_size=len(tokenizer)), seed=0)
    model.save_pretrained(model_dir)
    blocks = torch.randint(0, len(tokenizer), (12, 16), generator=torch.Generator().manual_seed(3))
    torch.save({"train": blocks[:4], "val": blocks[4:]}, model_dir / "blocks.pt")
    mp.start_processes(
        _evaluation_worker, args=(2, free_port(), model_dir, tmp_path / "out"), nprocs=2, start_method="fork"
    )
    runs = json.loads((tmp_path / "out" / "ep.json").read_text())["runs"]
    assert [(r["policy"], r["capacity_factor"]) for r in runs] == [("full", 1.0), ("drop", 1.0)]
    with torch.no_grad():
        single = perplexity(model, blocks[4:], batch_size=4)
    assert runs[0]["perplexity"] == pytest.approx(single, rel=1e-5)
    assert runs[1]["degraded_token_fraction"] > 0 and runs[1]["a2a_bytes"] < runs[0]["a2a_bytes"]
    assert set(runs[0]["per_rank"]) == {"0", "1"}


def test_ep_command_rejects_an_unknown_policy_before_launching(tmp_path):
    from typer.testing import CliRunner

    from moe_understudy.cli import app

    res = CliRunner().invoke(app, ["ep", "--policies", "full,teleport", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "teleport" in res.output
    assert not (tmp_path / "ep.yaml").exists()


# ---- the ledger under expert parallelism: exchange, all-to-all and work equal the one-process ledger ----


def _ledger_worker(rank, world, port, policies, priority, scope, placement_kind, out_dir):
    _join(rank, world, port)
    gathered = []  # bytes of every tensor handed to all_gather
    real = dist.all_gather

    def spy(tensor_list, tensor, *a, **kw):
        gathered.append(tensor.numel() * tensor.element_size())
        return real(tensor_list, tensor, *a, **kw)

    dist.all_gather = spy
    model, vocab = _model(None)
    ids = torch.randint(0, vocab, (2 * world, 16), generator=torch.Generator().manual_seed(2))
    mine = slice(2 * rank, 2 * rank + 2)
    moe = find_moe_layers(model)
    if placement_kind == "replicate":
        placement = replicate_hot_experts(
            torch.tensor([[50.0, 5, 5, 5], [5, 50, 5, 5]]), world, slots_per_rank=2
        )
    else:
        placement = plan_placement(len(moe), moe[0].num_experts, world)
    result = {}
    for policy in policies:
        stand_ins = _stand_ins(model, policy)
        cfg = RuntimeConfig(policy=policy, capacity_factor=0.5, priority=priority, capacity_scope=scope)
        with torch.no_grad():
            one = LoadRecorder()
            patch(model, stand_ins, config=cfg, recorder=one, placement=placement)
            ref = model(input_ids=ids).logits[mine]
            unpatch(model)
            recorder = EPRecorder(rank, world)
            patch_ep(model, placement, stand_ins, cfg, recorder, keep_all_experts=True)
            gathered.clear()
            out = model(input_ids=ids[mine]).logits
            unpatch(model)
        result[policy] = {
            "max_diff": float((out - ref).abs().max()),
            "records": recorder.records,
            "gathered": list(gathered),
            "one_process": [
                {"dispatch": s.dispatch_bytes, "exchange": s.exchange_bytes, "rank_flops": s.rank_flops}
                for s in one.steps
            ],
        }
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def _run_ledger(world, policies, priority, scope, placement_kind, tmp_path):
    mp.start_processes(
        _ledger_worker,
        args=(world, free_port(), policies, priority, scope, placement_kind, tmp_path),
        nprocs=world,
        start_method="fork",
    )
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module")
def score_ranks(tmp_path_factory):
    return _run_ledger(2, POLICIES, "score", "expert", "contiguous", tmp_path_factory.mktemp("score"))


@pytest.mark.parametrize("policy", POLICIES)
def test_score_priority_ep_equals_one_process_for_every_policy(score_ranks, policy):
    for rank in score_ranks:
        assert rank[policy]["max_diff"] < 1e-5


@pytest.mark.parametrize("policy", ["full", "drop", "understudy", "reroute", "expanded_drop", "shadow"])
def test_ep_charges_what_its_collectives_moved_and_what_the_one_process_ledger_computes(score_ranks, policy):
    per_rank = [rank[policy] for rank in score_ranks]
    for rank in per_rank:
        passed = [n for rec in rank["records"] for n in rec["exchange_payloads"]]
        assert passed == rank["gathered"]  # every all_gather payload is recorded, nothing else
        for rec in rank["records"]:
            assert rec["exchange_send_bytes"] == sum(rec["exchange_payloads"]) * (2 - 1)
    one = per_rank[0]["one_process"]  # the same on every rank
    for layer_step, ledger in enumerate(one):
        recs = [rank["records"][layer_step] for rank in per_rank]
        assert sum(r["exchange_send_bytes"] for r in recs) == ledger["exchange"]
        assert sum(r["dispatch_send_bytes"] for r in recs) == ledger["dispatch"]
        assert [r["work"] for r in recs] == pytest.approx(ledger["rank_flops"])


def test_position_priority_capacity_policies_exchange_only_counts(score_ranks, tmp_path):
    ranks = _run_ledger(2, ("drop", "shadow", "full"), "position", "expert", "contiguous", tmp_path)
    for rank in ranks:
        for policy in ("drop", "shadow", "full"):
            assert rank[policy]["max_diff"] < 1e-5
            for rec in rank[policy]["records"]:
                assert rec["exchange_mode"] == "counts"
                assert rec["exchange_payloads"] == [2 * 4 * 4]  # one (k=2, E=4) int32 table
    rows = score_ranks[0]["drop"]["records"][0]
    assert rows["exchange_mode"] == "rows" and sum(rows["exchange_payloads"]) > 2 * 4 * 4


def test_rank_capacity_over_replicated_experts_equals_one_process(tmp_path):
    policies = ("drop", "understudy", "shadow", "deadline")
    for rank in _run_ledger(2, policies, "score", "rank", "replicate", tmp_path):
        for policy in policies:
            assert rank[policy]["max_diff"] < 1e-5, policy
            for rec in rank[policy]["records"]:
                if policy != "deadline":  # deadline dispatches late work too
                    assert rec["rank_load"] <= rec["capacity"], (policy, rec)
