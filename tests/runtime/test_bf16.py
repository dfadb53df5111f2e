"""The runtime's invariants in bfloat16, with bf16 tolerances: `full` equals the unpatched forward for
every family, every stand-in policy runs (stand-ins take the model's dtype, counts add up),
distillation keeps fp32 master weights, and expert parallelism equals one process.

Each test runs on the CPU and, when a GPU is present, on CUDA too (the CUDA cases skip, saying so,
on a machine without one; expert parallelism on CUDA needs two GPUs, one per NCCL rank).
"""

from __future__ import annotations

import json
import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moe_understudy.config import EndToEndConfig, RuntimeConfig
from moe_understudy.moe.adapters import find_moe_layers
from moe_understudy.moe.presets import TINY_FAMILIES, build_model, tiny_config
from moe_understudy.runtime.ep import EPRecorder, patch_ep
from moe_understudy.runtime.layer import patch, unpatch
from moe_understudy.runtime.ledger import LoadRecorder
from moe_understudy.runtime.placement import plan_placement
from moe_understudy.runtime.policies import POLICIES
from moe_understudy.understudy.modules import build_understudy

BF16 = torch.bfloat16
NO_GPU = "no CUDA device here: the CUDA case of this bf16 invariant runs on a machine with a GPU"
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)),
]
# bf16 keeps 8 bits of mantissa: relative 1.6e-2 (torch's own bf16 rtol) plus a small absolute floor
TOL = dict(rtol=1.6e-2, atol=1e-2)

for _family in TINY_FAMILIES:  # model classes loaded before any worker forks
    build_model(tiny_config(_family), seed=0)


def _model(family: str, device: str):
    return build_model(tiny_config(family), seed=0).to(device=device, dtype=BF16)


def _ids(n: int = 4, seq: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 97, (n, seq), generator=torch.Generator().manual_seed(seed))


def _stand_ins(model, policy: str) -> dict:
    arch = "shadows" if "shadow" in policy else "dense"  # built in fp32, on the CPU
    return {m.index: build_understudy(arch, m, seed=m.index, intermediate=32) for m in find_moe_layers(model)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_full_equals_the_unpatched_forward_in_bf16(family, device):
    model = _model(family, device)
    ids = _ids().to(device)
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        with patch(model, _stand_ins(model, "understudy"), policy="full"):
            out = model(input_ids=ids).logits
    assert out.dtype == BF16 and out.device.type == device
    torch.testing.assert_close(out.float(), reference.float(), **TOL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("policy", [p for p in POLICIES if p != "full"])
def test_every_stand_in_policy_runs_in_bf16_and_its_counts_add_up(policy, device):
    model = _model("qwen2_moe", device)  # shared experts too
    stand_ins = _stand_ins(model, policy)
    recorder = LoadRecorder()
    with torch.no_grad(), patch(model, stand_ins, policy=policy, capacity_factor=0.5, recorder=recorder):
        logits = model(input_ids=_ids().to(device)).logits
    assert logits.dtype == BF16 and torch.isfinite(logits).all()
    for module in stand_ins.values():  # stand-ins follow the model: dtype and device
        assert {(p.dtype, p.device.type) for p in module.parameters()} == {(BF16, device)}
    for step in recorder.steps:
        served = step.expert + step.shadow + step.understudy + step.dropped
        assert served == step.assignments, (policy, step)
        assert step.capacity is not None and max(step.served_per_expert) <= step.capacity
    assert sum(s.expert for s in recorder.steps) < sum(s.assignments for s in recorder.steps)


@pytest.mark.parametrize("device", DEVICES)
def test_end_to_end_distillation_of_a_bf16_model_keeps_fp32_master_weights(device):
    from moe_understudy.understudy.e2e import train_end_to_end

    model = _model("mixtral", device)
    understudies = {k: m.to(device) for k, m in _stand_ins(model, "understudy").items()}  # fp32 masters
    before = {k: [p.detach().clone() for p in m.parameters()] for k, m in understudies.items()}
    cfg = EndToEndConfig(steps=3, blocks=4, batch_size=2, eval_blocks=2, lr=1e-2, warmup=1)
    result = train_end_to_end(model, understudies, _ids(n=6), cfg)
    assert result.steps == 3 and result.kl_after == result.kl_after  # finite, not NaN
    for k, module in understudies.items():
        assert {p.dtype for p in module.parameters()} == {torch.float32}
        assert any(not torch.equal(a, b) for a, b in zip(before[k], module.parameters(), strict=True))
    assert {p.dtype for p in model.parameters()} == {BF16}  # the model is untouched


# ---- expert parallelism in bf16 ------------------------------------------------------------------

EP_POLICIES = ("full", "drop", "understudy", "shadow")
NEED_TWO_GPUS = "expert parallelism on CUDA needs two GPUs (one per NCCL rank); this machine has fewer"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ep_worker(rank: int, world: int, port: int, device: str, out_dir) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, timeout=timedelta(seconds=60))
    where = torch.device(device, rank) if device == "cuda" else torch.device("cpu")
    model = _model("mixtral", where)
    ids = _ids(n=2 * world).to(where)
    mine = slice(2 * rank, 2 * rank + 2)
    moe = find_moe_layers(model)
    placement = plan_placement(len(moe), moe[0].num_experts, world)
    result = {}
    for policy in EP_POLICIES:
        stand_ins = _stand_ins(model, policy)
        with torch.no_grad():
            patch(model, stand_ins, policy=policy, capacity_factor=0.5, num_devices=world)
            reference = model(input_ids=ids).logits[mine].float()
            unpatch(model)
            config = RuntimeConfig(policy=policy, capacity_factor=0.5)
            patch_ep(model, placement, stand_ins, config, EPRecorder(rank, world), keep_all_experts=True)
            out = model(input_ids=ids[mine]).logits
            unpatch(model)
        close = torch.isclose(out.float(), reference, rtol=TOL["rtol"], atol=TOL["atol"])
        result[policy] = {
            "dtype": str(out.dtype),
            "close_fraction": float(close.float().mean()),
            "top1_agreement": float((out.float().argmax(-1) == reference.argmax(-1)).float().mean()),
        }
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


@pytest.mark.dist
@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param("cuda", marks=pytest.mark.skipif(torch.cuda.device_count() < 2, reason=NEED_TWO_GPUS)),
    ],
)
def test_two_rank_ep_equals_one_process_in_bf16(tmp_path, device):
    mp.start_processes(
        _ep_worker,
        args=(2, _free_port(), device, tmp_path),
        nprocs=2,
        start_method="fork" if device == "cpu" else "spawn",
    )
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for policy in EP_POLICIES:
            r = result[policy]
            assert r["dtype"] == "torch.bfloat16", policy
            if device == "cpu":  # every logit within bf16 tolerance of the one-process forward
                assert r["close_fraction"] == 1.0 and r["top1_agreement"] == 1.0, (policy, r)
            else:  # GPU kernels may round a near-tied routing choice differently per batch shape
                assert r["close_fraction"] >= 0.98 and r["top1_agreement"] >= 0.95, (policy, r)
