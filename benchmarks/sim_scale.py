"""Simulated expert parallelism from 8 to 256 ranks with the routing skew captured from the default teacher.

The routing trace is captured from the teacher on its held-out blocks (a random half plans replication
and fits speculation, the other half is replayed). Beyond 8 ranks every expert is split into
siblings so each rank holds one expert (`sim.traces.expand_trace`): with `--expansion random` (the
default) the sibling is drawn per assignment, which keeps load shares and max/mean expert load as
captured but makes siblings unpredictable (pessimistic for speculation); `--expansion token` keys
the sibling on the token id, which keeps predictability but adds skew from frequent tokens.
Costs: `config.ClusterCost` defaults (a DeepSeek-V3-sized expert on H800/H200-class GPUs, NVLink
within 8-GPU nodes and RDMA across them as DeepEP reports them; sources in config.py), charged by
the runtime ledger; understudy at 0.5 x the active routed FLOPs, and replication gets the same
memory (one spare expert slot per rank). Work imbalance is (max - mean) / mean over ranks. The
shifting-load study against EPLB is benchmarks/sim_eplb.py. Quality is not simulated: it is
read from the real-model measurements (quality_under_load.json from the runtime benchmark, else
this project's ep_understudy.json) for the same policy and capacity factor.

Usage: python benchmarks/sim_scale.py [--model runs/teacher] [--capacity-factor 1.0] [--expansion random|token]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, write_result  # noqa: E402

from moe_understudy.config import SIM_POLICIES, SimConfig  # noqa: E402
from moe_understudy.sim.workflow import plot_scaling, run_simulation  # noqa: E402

console = Console()


def measured_quality(policy: str, cf: float, cost: float) -> str:
    """Perplexity change measured on the real model for this policy / capacity (and understudy cost)."""
    if policy in ("full", "replication", "speculative"):
        return "exact"
    for name in ("quality_under_load.json", "ep_understudy.json"):
        path = RESULTS / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        for r in data.get("rows", []):
            if r.get("policy") != policy or r.get("capacity_factor") != cf or "ppl_increase_pct" not in r:
                continue
            if policy == "understudy" and abs(r.get("understudy_cost", cost) - cost) > 0.05:
                continue
            return f"{r['ppl_increase_pct']:+.2f}% ppl ({name})"
    return "n/a"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="runs/teacher")
    ap.add_argument("--capacity-factor", type=float, default=1.0)
    ap.add_argument("--ranks", default="8,16,32,64,128,256")
    ap.add_argument("--tokens-per-rank", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--max-blocks", type=int, default=256)
    ap.add_argument(
        "--expansion",
        default="random",
        help="random (keeps the captured skew) | token (keeps predictability)",
    )
    ap.add_argument("--name", default="sim_scale")
    args = ap.parse_args()
    cfg = SimConfig(
        model=args.model,
        max_blocks=args.max_blocks,
        ranks=tuple(int(r) for r in args.ranks.split(",")),
        policies=SIM_POLICIES,
        capacity_factor=args.capacity_factor,
        tokens_per_rank=args.tokens_per_rank,
        expansion=args.expansion,
        steps=args.steps,
        out=f"runs/{args.name}",
    )
    payload = run_simulation(cfg, console=console)
    rows = payload["results"]
    for r in rows:
        r["quality"] = measured_quality(r["policy"], cfg.capacity_factor, cfg.cost.understudy_cost)
    by = {(r["ranks"], r["policy"]): r for r in rows}
    summary = {}
    for R in cfg.ranks:
        full, drop = by[(R, "full")], by[(R, "drop")]
        summary[R] = {
            p: {
                "step_ms": by[(R, p)]["step_ms"],
                "step_cut_vs_full_pct": 100 * (1 - by[(R, p)]["step_ms"] / full["step_ms"]),
                "step_cut_vs_drop_pct": 100 * (1 - by[(R, p)]["step_ms"] / drop["step_ms"]),
                "wire_cut_vs_full_pct": 100 * (1 - by[(R, p)]["wire_bytes"] / full["wire_bytes"]),
            }
            for p in cfg.policies
        }
    t = Table(
        title=f"Step-time and wire-byte cuts (positive = less than the reference) (cf {cfg.capacity_factor}), trace {payload['trace']['source']}"
    )
    for c in (
        "ranks",
        "policy",
        "step ms",
        "step cut vs full",
        "step cut vs drop",
        "wire cut vs full",
        "work imbalance",
        "degraded",
        "quality",
    ):
        t.add_column(c, justify="left" if c in ("policy", "quality") else "right")
    for R in cfg.ranks:
        for p in cfg.policies:
            s, r = summary[R][p], by[(R, p)]
            t.add_row(
                str(R),
                p,
                f"{s['step_ms']:.3f}",
                f"{s['step_cut_vs_full_pct']:+.1f}%",
                f"{s['step_cut_vs_drop_pct']:+.1f}%",
                f"{s['wire_cut_vs_full_pct']:+.1f}%",
                f"{r['work_imbalance']:.2f}",
                f"{r['degraded_fraction']:.1%}",
                r["quality"],
            )
    console.print(t)
    plot_scaling(
        rows,
        RESULTS / f"{args.name}.png",
        title=f"trace {payload['trace']['source']}, cf {cfg.capacity_factor}",
    )
    write_result(
        args.name,
        {
            "what": __doc__.splitlines()[0],
            "note": "Simulated times from the cost model (not measured), so CPU contention does not affect them.",
            "trace": payload["trace"],
            "config": payload["config"],
            "at_64_ranks": summary.get(64),
            "summary": summary,
            "results": rows,
        },
    )


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
