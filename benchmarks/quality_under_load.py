"""Quality under load: every overflow policy side by side, led by the strongest baselines.

Perplexity change vs `full` on held-out text, per-step capacity ceil(cf * T * k / E) over a batch
of 8 x 128 tokens, every system on the same batches in one run. Baselines (no stand-in, no memory):
score-priority drop (Capacity-Aware Inference's token drop), `expanded_drop` (its expanded drop: the
best local expert per token beyond its top-k, over `--devices` devices), drop_renorm and reroute.
Stand-in sets are folders written by `understudy distill` (--standins, repeatable): token-level sets
run `understudy` (and `layer`, `deadline`), assignment-level sets run `shadow` and `expanded_shadow`.
Every stand-in row states its memory per device (`memory_expert_equiv`, routed experts per MoE
layer), its FLOPs (`understudy_cost` per token x active experts, and the measured
`stand_in_cost_per_served` per served assignment x one expert). Priorities: score leads, position
is a row (`--priorities score,position`).

    understudy capture runs/teacher --tokens 131072 --out runs/store
    understudy distill runs/teacher --store runs/store --arch trunk --out runs/bench-quality/trunk
    .venv/bin/python benchmarks/quality_under_load.py --model runs/teacher --standins runs/bench-quality/trunk
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, write_result  # noqa: E402

from moe_understudy.eval.metrics import paired_ppl_delta, paired_ppl_delta_interval  # noqa: E402
from moe_understudy.eval.quality import evaluate_policies  # noqa: E402
from moe_understudy.moe.adapters import find_moe_layers  # noqa: E402
from moe_understudy.moe.standins import ASSIGNMENT, level_of  # noqa: E402
from moe_understudy.report import pyplot, save_figure  # noqa: E402
from moe_understudy.runtime.scenarios import (  # noqa: E402
    domain_shift_blocks,
    hot_expert_bias,
    model_data_config,
    natural_blocks,
)

NAME = "quality_under_load"
BASELINES = ("drop", "expanded_drop", "drop_renorm", "reroute")
SCENARIO_NOTES = {
    "natural": "Held-out blocks cached with the teacher (validation split of its corpus).",
    "domain_shift": "English prose (IDLE docs, licence, e-mail test data) unlike the code the teacher and the "
    "stand-ins were trained on.",
    "hot_expert": "The router logit bias is applied inside every layer's router, for every system including full; "
    "deltas are against the biased full model. Token-level understudies stand in for the unbiased layer, so read "
    "KL and agreement there, not only the perplexity delta.",
}
console = Console(stderr=True)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="runs/teacher", help="saved teacher folder")
    p.add_argument("--standins", action="append", default=[], help="`understudy distill` folder (repeatable)")
    p.add_argument("--capacities", default="1,1.25,1.5,2")
    p.add_argument("--priorities", default="score,position", help="score leads; position is a row")
    p.add_argument("--blocks", type=int, default=128, help="held-out blocks evaluated")
    p.add_argument("--batch-size", type=int, default=8, help="blocks per step (capacity is per step)")
    p.add_argument(
        "--devices", type=int, default=4, help="devices: expanded_drop's locality and the byte ledger"
    )
    p.add_argument("--expanded-m", type=int, default=1, help="expanded_drop: local candidates per token")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--scenario", default="natural", choices=["natural", "domain_shift", "hot_expert"])
    p.add_argument(
        "--hot-expert", type=int, default=0, help="hot_expert scenario: expert raised in every layer"
    )
    p.add_argument("--hot-bias", type=float, default=2.0, help="hot_expert scenario: router logit bias")
    p.add_argument("--name", default=None, help="result name under benchmarks/results (default by scenario)")
    return p.parse_args()


def stand_in_policies(stand_ins: dict) -> tuple[str, ...]:
    """What a set serves: single overflowing assignments, or whole tokens."""
    if level_of(next(iter(stand_ins.values()))) == ASSIGNMENT:
        return ("shadow", "expanded_shadow")
    return ("understudy", "layer", "deadline")


def run(args, model, blocks, bias, capacities) -> list[dict]:
    from moe_understudy.understudy.io import load_understudies

    rows: list[dict] = []
    for priority in args.priorities.split(","):
        common = dict(
            batch_size=args.batch_size,
            num_devices=args.devices,
            priority=priority,
            logit_bias=bias,
            runtime_options={"expanded_m": args.expanded_m},
        )
        got = evaluate_policies(model, None, blocks, list(BASELINES), capacities, **common)
        rows += [
            {**r, "set": None}
            for r in got
            if r["policy"] != "full" or priority == args.priorities.split(",")[0]
        ]
        for folder in args.standins:
            stand_ins = load_understudies(folder, model)
            for policy in stand_in_policies(stand_ins):
                got = evaluate_policies(model, stand_ins, blocks, [policy], capacities, **common)
                rows += [{**r, "set": Path(folder).name, "standins": folder} for r in got[1:]]
    return rows


def label(r: dict) -> str:
    return r["policy"] if r["set"] is None else f"{r['policy']} [{r['set']}]"


def print_lead_table(rows: list[dict], capacities: list[float], title: str) -> None:
    """Δppl per system and cf, strongest baseline first; memory and cost beside every stand-in."""
    t = Table(title=title)
    for c in ("priority", "system", "memory (experts/layer/device)", "cost/served"):
        t.add_column(c)
    for cf in capacities:
        t.add_column(f"cf {cf:g}", justify="right")
    systems: dict[tuple, dict[float, dict]] = {}
    for r in rows:
        if r["policy"] == "full":
            continue
        systems.setdefault((r["priority"], label(r)), {})[r["capacity_factor"]] = r
    rank = {name: i for i, name in enumerate(BASELINES)}  # the strongest baselines lead
    order = sorted(systems, key=lambda k: (k[0] != "score", rank.get(k[1], len(rank)), k[1]))
    for key in order:
        by_cf = systems[key]
        any_row = next(iter(by_cf.values()))
        cost = any_row.get("stand_in_cost_per_served")
        t.add_row(
            key[0],
            escape(key[1]),
            f"{any_row['memory_expert_equiv']:.2f}",
            "-" if cost is None else f"{cost:.2f}",
            *[with_interval(by_cf[cf]) if cf in by_cf else "" for cf in capacities],
        )
    Console(width=200).print(t)


def with_interval(r: dict) -> str:
    """Δppl and its paired 95% bootstrap interval over batches, e.g. "+0.95% (0.80, 1.10)"."""
    low, high = r["ppl_delta_ci95"]
    return f"{r['ppl_delta_pct']:+.2f}% ({low:+.2f}, {high:+.2f})"


def verdict(point: float, interval: list[float], target: float) -> str:
    """A target read against the spread between held-out samples, not the point alone."""
    low, high = interval
    if high <= target:
        return "met"
    if point <= target:
        return "met by the point estimate, inside the noise"
    return "missed inside the noise" if low <= target else "missed"


def plot(rows: list[dict], path: Path, title: str) -> Path:
    plt = pyplot()
    priorities = [p for p in ("score", "position") if any(r["priority"] == p for r in rows)]
    fig, axes = plt.subplots(
        1, len(priorities), figsize=(10 if len(priorities) == 1 else 13, 5), squeeze=False
    )
    for ax, priority in zip(axes[0], priorities, strict=True):
        series: dict[str, list[dict]] = {}
        for r in rows:
            if r["priority"] == priority and r["policy"] != "full":
                series.setdefault(label(r), []).append(r)
        for name, rs in sorted(series.items()):
            rs = sorted(rs, key=lambda r: r["capacity_factor"])
            style = "--" if r_is_baseline(rs[0]) else "-"
            point = [r["ppl_delta_pct"] for r in rs]
            ax.errorbar(
                [r["capacity_factor"] for r in rs],
                point,
                yerr=[
                    [p - r["ppl_delta_ci95"][0] for p, r in zip(point, rs, strict=True)],
                    [r["ppl_delta_ci95"][1] - p for p, r in zip(point, rs, strict=True)],
                ],
                fmt=style,
                marker="o",
                capsize=2,
                label=name,
            )
        ax.set_yscale("symlog", linthresh=1.0)
        ax.axhline(1.0, color="grey", lw=0.6, ls=":")
        ax.set_xlabel("capacity factor")
        ax.set_ylabel("perplexity change vs full (%)")
        ax.set_title(f"{priority} priority")
        if series:
            ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def r_is_baseline(r: dict) -> bool:
    return r["set"] is None


def paired_gap(row: dict, other: dict) -> dict:
    """row's perplexity over other's, in %, with its paired 95% interval over the shared batches."""
    per_batch = [row["batch_nll"], other["batch_nll"], row["batch_positions"]]
    mine, theirs, positions = torch.tensor(per_batch, dtype=torch.float64)
    return {
        "pct": paired_ppl_delta(mine, theirs, positions),
        "ci95": list(paired_ppl_delta_interval(mine, theirs, positions)),
    }


def paired_gaps(rows: list[dict], capacities: list[float]) -> dict:
    """Score priority, per stand-in row: its perplexity against token drop's and against the lead
    set's (the first --standins) at the same cf, each with a paired interval over the same batches
    (one run, the same batches: a far tighter test than two rows' own intervals side by side)."""
    score = [r for r in rows if r["priority"] == "score" and r["policy"] != "full"]
    at = {(label(r), r["capacity_factor"]): r for r in score}
    lead_set = next((r["set"] for r in score if r["set"]), None)
    out: dict = {}
    for r in score:
        if r["set"] is None:
            continue
        cf, key = r["capacity_factor"], label(r)
        gaps = {"vs drop": paired_gap(r, at[("drop", cf)])}
        lead = at.get((f"{r['policy']} [{lead_set}]", cf))
        if lead is not None and lead is not r:
            gaps[f"vs {label(lead)}"] = paired_gap(r, lead)
        out.setdefault(key, {})[f"{cf:g}"] = gaps
    return out


# (cf, Δppl target in %, key of its verdict): the issue's two perplexity targets
PPL_TARGETS = ((1.0, 1.0, "cf1_within_1pct"), (2.0, 0.1, "cf2_within_0.1pct"))


def check_targets(rows: list[dict], capacities: list[float]) -> dict:
    """Issue targets for assignment-level sets at memory <= 1 (score priority): below drop and
    expanded_drop at every cf; <= +1% at cf 1.0; <= +0.1% at cf 2.0; FLOPs per served assignment at
    most half an expert's at every cf (a trunk pass shared by fewer pairs costs more per pair)."""

    def row(policy: str, cf: float, set_name=None) -> dict | None:
        got = [
            r
            for r in rows
            if r["priority"] == "score"
            and r["policy"] == policy
            and r["capacity_factor"] == cf
            and r["set"] == set_name
        ]
        return got[0] if got else None

    def delta(policy: str, cf: float, set_name=None) -> float | None:
        got = row(policy, cf, set_name)
        return got["ppl_delta_pct"] if got else None

    out: dict = {"summary": [], "sets": {}}
    for set_name in sorted(
        {r["set"] for r in rows if r["set"] and r["policy"] in ("shadow", "expanded_shadow")}
    ):
        for policy in ("shadow", "expanded_shadow"):
            mine = {cf: delta(policy, cf, set_name) for cf in capacities}
            if any(v is None for v in mine.values()):
                continue
            memory = max(r["memory_expert_equiv"] for r in rows if r["set"] == set_name)
            below = all(mine[cf] < min(delta("drop", cf), delta("expanded_drop", cf)) for cf in capacities)
            res = {"memory_expert_equiv": memory, "below_drop_and_expanded_drop_everywhere": below}
            readings = []
            for cf, target, key in PPL_TARGETS:
                mine_row = row(policy, cf, set_name)
                if mine_row is None:
                    continue
                res[f"cf{cf:g}_delta_pct"] = mine_row["ppl_delta_pct"]
                res[f"cf{cf:g}_delta_ci95"] = mine_row["ppl_delta_ci95"]
                res[key] = verdict(mine_row["ppl_delta_pct"], mine_row["ppl_delta_ci95"], target)
                readings.append(f"cf {cf:g} {with_interval(mine_row)} (<= +{target:g}%: {res[key]})")
            cost = {cf: row(policy, cf, set_name)["stand_in_cost_per_served"] for cf in capacities}
            worst = max(cost, key=lambda cf: cost[cf] or 0.0)
            res["flops_per_served_by_cf"] = {f"{cf:g}": c for cf, c in cost.items()}
            res["flops_per_served_within_half"] = all(c is not None and c <= 0.5 for c in cost.values())
            out["sets"][f"{policy} [{set_name}]"] = res
            out["summary"].append(
                f"{policy} [{set_name}] (memory {memory:.2f}): below drop and expanded_drop at every cf: "
                f"{'yes' if below else 'no'}; " + "; ".join(readings) + "; FLOPs per served <= 0.5 expert at "
                f"every cf: {'yes' if res['flops_per_served_within_half'] else 'no'} (most {cost[worst]:.2f} at "
                f"cf {worst:g})"
            )
    return out


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    from moe_understudy.moe.loading import load_model_and_tokenizer

    capacities = [float(c) for c in args.capacities.split(",")]
    model, tokenizer = load_model_and_tokenizer(args.model)
    layers = find_moe_layers(model)
    data = model_data_config(args.model, None)
    if args.scenario == "domain_shift":
        blocks = domain_shift_blocks(tokenizer, data.block_size, args.blocks)
    else:
        blocks = natural_blocks(args.model, data, tokenizer, args.blocks)
    bias = (
        hot_expert_bias(layers[0].num_experts, args.hot_expert, args.hot_bias)
        if args.scenario == "hot_expert"
        else None
    )
    name = args.name or (NAME if args.scenario == "natural" else f"{NAME}_{args.scenario}")
    text = {
        "natural": "natural held-out text",
        "domain_shift": "domain shift (prose)",
        "hot_expert": f"hot expert {args.hot_expert} (+{args.hot_bias:g} logit)",
    }[args.scenario]
    t0 = time.time()
    rows = run(args, model, blocks, bias, capacities)
    seconds = time.time() - t0
    title = (
        f"quality under load, {text}: {len(layers)} layers x {layers[0].num_experts} experts top-{layers[0].top_k}, "
        f"{len(blocks)} blocks, batch {args.batch_size} x {blocks.shape[1]}, {args.devices} devices"
    )
    print_lead_table(rows, capacities, title)
    png = plot(rows, RESULTS / f"{name}.png", title)
    targets = check_targets(rows, capacities)
    for line in targets["summary"]:
        console.print(escape(line))
    path = write_result(
        name,
        {
            "model": args.model,
            "scenario": args.scenario,
            "hot_expert": args.hot_expert if bias is not None else None,
            "hot_bias": args.hot_bias if bias is not None else None,
            "model_layers": len(layers),
            "experts": layers[0].num_experts,
            "top_k": layers[0].top_k,
            "hidden": layers[0].hidden_size,
            "expert_intermediate": layers[0].expert_intermediate_size,
            "blocks": int(blocks.shape[0]),
            "block_size": int(blocks.shape[1]),
            "batch_size": args.batch_size,
            "priorities": args.priorities.split(","),
            "capacities": capacities,
            "devices": args.devices,
            "expanded_m": args.expanded_m,
            "standin_sets": args.standins,
            "seconds": round(seconds, 1),
            "notes": "Capacity ceil(cf*T*k/E) per layer and step of batch_size x block_size tokens; every system "
            "compared with full on the same batches in one run. memory_expert_equiv: stand-in parameters per device "
            "per MoE layer in units of one routed expert (3 H I); understudy_cost: stand-in FLOPs per token / the "
            "active routed experts'; stand_in_cost_per_served: measured stand-in FLOPs per assignment it served / one "
            f"expert's. Bytes: dispatch + combine + routing exchange over {args.devices} devices (contiguous experts "
            "and tokens), summed over MoE layers, fp32 hidden.",
            "scenario_note": SCENARIO_NOTES[args.scenario],
            "targets": targets,
            "paired_gaps": paired_gaps(rows, capacities),
            "plot": str(png),
            "rows": rows,
        },
    )
    console.print(f"wrote {path} and {png}")


if __name__ == "__main__":
    main()
