"""The expert-parallel evaluation workflow (`understudy ep`, `evaluate --ep N`).

`launch_ep` writes the run's YAML and starts one process per rank through torchrun; each rank runs
`run_ep_evaluation`: load the model once, place its experts, then for every policy x capacity of
the sweep feed its slice of each step, and gather every rank's per-layer records. Rank 0 writes
ep.json (one summary per run, the placement, and every rank's records) and ep.yaml.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from moe_understudy.config import EPConfig, RuntimeConfig
from moe_understudy.errors import UserError
from moe_understudy.eval.metrics import next_token_view, token_nll
from moe_understudy.moe.adapters import find_moe_layers
from moe_understudy.runtime.ep.backend import EPRecorder, configure_ep, patch_ep
from moe_understudy.runtime.ep.group import collective, free_port, init_distributed
from moe_understudy.runtime.placement import Placement, plan_placement

# ---- evaluation workflow ------------------------------------------------------------------------


def measured_load(model: nn.Module, blocks: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """[layers, E] assignments per expert over `blocks`, recorded by the runtime's own ledger."""
    from moe_understudy.runtime.layer import patch
    from moe_understudy.runtime.ledger import LoadRecorder

    recorder = LoadRecorder()
    layers = find_moe_layers(model)
    with torch.no_grad(), patch(model, recorder=recorder):
        for start in range(0, len(blocks), batch_size):
            model(input_ids=blocks[start : start + batch_size])
    load = torch.zeros(len(layers), layers[0].num_experts, dtype=torch.float64)
    row = {m.index: i for i, m in enumerate(layers)}
    for step in recorder.steps:
        load[row[step.layer]] += torch.tensor(step.tokens_per_expert, dtype=torch.float64)
    return load


def build_placement(
    cfg: EPConfig, model: nn.Module, world: int, calibration: torch.Tensor | None
) -> Placement:
    """contiguous | replicate (hot experts measured on `calibration` blocks) | a JSON file."""
    layers = find_moe_layers(model)
    L, E = len(layers), layers[0].num_experts
    if cfg.placement == "contiguous":
        return plan_placement(L, E, world)
    if cfg.placement == "replicate":
        if calibration is None or len(calibration) == 0:
            raise UserError(
                "Placement 'replicate' needs calibration text (the model folder's train blocks, else "
                "the train split of --data); none found."
            )
        base = -(-E // world)
        return plan_placement(
            L, E, world, load=measured_load(model, calibration), slots_per_rank=base + cfg.extra_slots
        )
    return plan_placement(L, E, world, path=cfg.placement)


def calibration_blocks(cfg: EPConfig, tokenizer, blocks: torch.Tensor) -> torch.Tensor:
    """The text EPLB plans its replicas on (`cfg.calibration`).

    train: the model folder's train blocks, else the train split of --data (an earlier window of the
    same text: EPLB stale); eval: the evaluation blocks themselves (EPLB fresh, planned on the load
    it serves); anything else: a corpus source (another domain: EPLB stale across a shift).
    """
    from moe_understudy.config import DataConfig
    from moe_understudy.data.heldout import model_blocks

    if cfg.calibration == "eval":
        return blocks
    if cfg.calibration == "train":
        return model_blocks(cfg.model, cfg.data, tokenizer, 32, split="train", notice=_quiet)
    block_size = int(blocks.shape[1])
    data = DataConfig(source=cfg.calibration, block_size=block_size)
    return model_blocks(cfg.model, data, tokenizer, 32, split="train", notice=_quiet)


def _quiet(message: str) -> None:
    """Drop a notice another rank (or an earlier call) already printed."""


def sweep_runs(cfg: EPConfig) -> list[tuple[str, float]]:
    """(policy, capacity factor) pairs of one launch: `full` once, every other policy at every capacity."""
    runs = [("full", 1.0)] if "full" in cfg.policies else []
    return runs + [(p, cf) for p in cfg.policies if p != "full" for cf in cfg.capacities]


def run_ep_evaluation(cfg: EPConfig, destroy_group: bool = True) -> list[dict]:
    """Perplexity and per-rank traffic of every policy x capacity of `cfg` under expert parallelism.

    Call on every rank. The model is loaded and its experts placed once; the runs of the sweep
    reuse them. Rank 0 writes `cfg.out`/ep.json (one summary per run, the placement, and every
    rank's per-layer, per-step records per run) and ep.yaml. Returns the summaries on every rank,
    after a barrier that all ranks pass together; `destroy_group=False` leaves the process group
    up on success (for a process that exits right after, see `main`).
    """
    from moe_understudy.data.heldout import model_blocks
    from moe_understudy.moe.loading import load_model_and_tokenizer

    rank, world, device = init_distributed(cfg.backend, cfg.timeout_s)
    try:
        torch.manual_seed(0)
        model, tokenizer = load_model_and_tokenizer(cfg.model, device=device, dtype=cfg.dtype)
        understudies = None
        if cfg.understudies:
            from moe_understudy.understudy.io import load_understudies

            understudies = load_understudies(cfg.understudies, model, device=device)
        quiet = rank != 0  # one notice per run, not one per rank
        blocks = model_blocks(
            cfg.model, cfg.data, tokenizer, cfg.max_blocks, notice=_quiet if quiet else None
        )
        per_step = world * cfg.blocks_per_rank
        steps = len(blocks) // per_step
        if steps == 0:
            raise UserError(
                f"{len(blocks)} blocks cannot fill one step of {world} ranks x {cfg.blocks_per_rank} blocks; "
                f"lower --blocks-per-rank."
            )
        calibration = None
        if cfg.placement == "replicate":
            calibration = calibration_blocks(cfg, tokenizer, blocks)
        placement = build_placement(cfg, model, world, calibration)
        wrappers = patch_ep(model, placement, understudies, RuntimeConfig())
        summaries, all_records = [], {}
        for policy, cf in sweep_runs(cfg):
            runtime = RuntimeConfig(
                policy=policy,
                capacity_factor=cf,
                priority=cfg.priority,
                capacity_scope=cfg.capacity_scope,
                expanded_m=cfg.expanded_m,
            )
            recorder = EPRecorder(rank, world)
            configure_ep(wrappers, runtime, recorder)
            nll, wall = _evaluate(model, blocks, steps, per_step, rank, cfg.blocks_per_rank, recorder, device)
            gathered: list = [None] * world
            collective("all_gather_object(stats)", dist.all_gather_object, gathered, recorder.records)
            records = [r for part in gathered for r in part]
            summary = summarize(records, world, float(torch.exp(nll[0] / nll[1])), steps, placement, wall)
            summaries.append(
                {
                    "policy": policy,
                    "capacity_factor": cf,
                    "capacity_scope": cfg.capacity_scope,
                    "placement": cfg.placement,
                    **summary,
                }
            )
            all_records[f"{policy}@{cf}"] = records
        if rank == 0:
            out = Path(cfg.out)
            out.mkdir(parents=True, exist_ok=True)
            payload = {"runs": summaries, "placement": placement.to_json(), "records": all_records}
            (out / "ep.json").write_text(json.dumps(payload, indent=1))
            cfg.to_yaml(out / "ep.yaml")
        # every rank tears the group down together: a rank that exits while another still destroys
        # its gloo pairs made that one abort ("terminate called without an active exception")
        collective("barrier(teardown)", dist.barrier)
    except BaseException:
        if dist.is_initialized():
            dist.destroy_process_group()
        raise
    if destroy_group and dist.is_initialized():
        dist.destroy_process_group()
    return summaries


@torch.no_grad()
def _evaluate(
    model, blocks, steps, per_step, rank, blocks_per_rank, recorder, device
) -> tuple[torch.Tensor, float]:
    """(summed token NLL, tokens) over all ranks, and this rank's wall time; rank r feeds its slice of each step."""
    nll = torch.zeros(2, dtype=torch.float64, device=device)
    t_start = time.perf_counter()
    for step in range(steps):
        recorder.step = step
        start = step * per_step + rank * blocks_per_rank
        ids = blocks[start : start + blocks_per_rank].to(device)
        nll[0] += token_nll(*next_token_view(model(input_ids=ids).logits, ids)).sum().double()
        nll[1] += ids[:, 1:].numel()
    wall = time.perf_counter() - t_start
    collective("all_reduce(loss)", dist.all_reduce, nll)
    return nll, wall


def summarize(
    records: list[dict],
    world: int,
    perplexity: float,
    steps: int,
    placement: Placement,
    wall: float,
) -> dict:
    """Totals over ranks and steps: bytes on the wire, max/mean rank load, comm vs compute time."""
    by_key: dict[tuple[int, int], list[dict]] = {}
    for r in records:
        by_key.setdefault((r["step"], r["layer"]), []).append(r)

    def max_over_mean(key: str) -> float:
        ratios = []
        for recs in by_key.values():
            loads = [r[key] for r in recs]
            mean = sum(loads) / len(loads)
            ratios.append(max(loads) / mean if mean > 0 else 1.0)
        return sum(ratios) / max(len(ratios), 1)

    per_rank = {}
    for rk in range(world):
        mine = [r for r in records if r["rank"] == rk]
        per_rank[rk] = {
            "dispatch_send_bytes": sum(r["dispatch_send_bytes"] for r in mine),
            "dispatch_recv_bytes": sum(r["dispatch_recv_bytes"] for r in mine),
            "combine_send_bytes": sum(r["combine_send_bytes"] for r in mine),
            "rank_load": sum(r["rank_load"] for r in mine),
            "comm_s": sum(r["comm_s"] for r in mine),
            "compute_s": sum(r["compute_s"] for r in mine),
        }
    tokens = sum(r["tokens"] for r in records)
    return {
        "slots_per_rank": placement.slots_per_rank,
        "ranks": world,
        "steps": steps,
        "perplexity": perplexity,
        "a2a_bytes": sum(v["dispatch_send_bytes"] + v["combine_send_bytes"] for v in per_rank.values()),
        "exchange_bytes": sum(r["exchange_send_bytes"] for r in records),
        "total_bytes": sum(
            r["dispatch_send_bytes"] + r["combine_send_bytes"] + r["exchange_send_bytes"] for r in records
        ),
        "exchange_mode": records[0]["exchange_mode"] if records else None,
        "rank_work_imbalance": max_over_mean("work") - 1.0,  # (max - mean) / mean, all FLOPs
        "memory_expert_equiv": max((r["memory_expert_equiv"] for r in records), default=0.0),
        "max_over_mean_rank_load": max_over_mean("rank_load"),  # expert rows per rank, per layer-step
        "max_over_mean_rank_work": max_over_mean("work"),  # expert + stand-in FLOPs on each rank
        "understudy_token_fraction": sum(r["understudy_tokens"] for r in records) / max(tokens, 1),
        "degraded_token_fraction": sum(r["degraded_tokens"] for r in records) / max(tokens, 1),
        "comm_s": max(v["comm_s"] for v in per_rank.values()),
        "compute_s": max(v["compute_s"] for v in per_rank.values()),
        "wall_s": wall,
        "per_rank": per_rank,
    }


def runs_table(runs: list[dict], title: str = "expert parallelism"):
    """Rich table of run summaries: perplexity, all-to-all bytes, rank balance, comm vs compute."""
    from rich.table import Table

    t = Table(title=title)
    for c in (
        "policy",
        "cf",
        "perplexity",
        "a2a MB",
        "max/mean load",
        "max/mean work",
        "understudy",
        "comm s",
        "compute s",
    ):
        t.add_column(c, justify="left" if c == "policy" else "right")
    for r in runs:
        t.add_row(
            r["policy"],
            ""
            if r["policy"] == "full"
            else f"{r['capacity_factor']:g}" + (" per rank" if r.get("capacity_scope") == "rank" else ""),
            f"{r['perplexity']:.3f}",
            f"{r['a2a_bytes'] / 1e6:.2f}",
            f"{r['max_over_mean_rank_load']:.3f}",
            f"{r['max_over_mean_rank_work']:.3f}",
            f"{r['understudy_token_fraction']:.1%}",
            f"{r['comm_s']:.2f}",
            f"{r['compute_s']:.2f}",
        )
    return t


def launch_ep(cfg: EPConfig, nproc: int) -> list[dict]:
    """Run `run_ep_evaluation` on `nproc` local processes through torchrun; return the run summaries.

    This is what `understudy ep --nproc N` (and `evaluate --ep N`) call. Already inside torchrun
    (RANK set), it runs in-process instead.
    """
    if "RANK" in os.environ:
        return run_ep_evaluation(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg.to_yaml(out / "ep.yaml")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        "--master-addr=127.0.0.1",
        f"--master-port={free_port()}",
        "-m",
        "moe_understudy.runtime.ep",
        str(out / "ep.yaml"),
    ]
    done = subprocess.run(cmd, check=False)
    if done.returncode != 0:
        raise UserError(
            f"Expert-parallel run over {nproc} processes failed (exit {done.returncode}); see the rank logs above."
        )
    return json.loads((out / "ep.json").read_text())["runs"]


def main(argv: list[str] | None = None) -> None:
    """`torchrun --nproc-per-node N -m moe_understudy.runtime.ep EP_YAML`: one rank of an EP evaluation."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: torchrun --nproc-per-node N -m moe_understudy.runtime.ep EP_YAML")
    summaries = run_ep_evaluation(EPConfig.from_yaml(args[0]), destroy_group=False)
    if int(os.environ.get("RANK", 0)) == 0:
        for s in summaries:
            print(json.dumps({k: v for k, v in s.items() if k != "per_rank"}))
    # Past the teardown barrier every rank's results are written, so the rank leaves at once:
    # destroying gloo's process group (or letting interpreter exit destroy it) while the other
    # rank tears down its own still aborted one rank now and then ("terminate called without an
    # active exception", about one suite run in five under load), failing a finished run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
