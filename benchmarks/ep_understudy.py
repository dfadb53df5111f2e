"""Expert parallelism over R gloo ranks: stand-ins against token drop, expanded drop and EPLB (fresh / stale).

Every system runs through `understudy ep` (torchrun, one process per rank) on the same held-out
blocks, score priority (capacity over the GLOBAL batch of all ranks):
  full              contiguous placement, every assignment to its expert (the reference)
  drop              token drop (Capacity-Aware Inference), overflow dropped
  expanded_drop     its expanded drop: the best expert on the token's own rank beyond its top-k
  <stand-in>        each `understudy distill` set given (--standins): assignment-level sets serve
                    overflowing assignments (policy shadow), token-level sets whole tokens (understudy)
  ...-rankcap       the same with capacity per rank (ceil(cf * tokens * k / ranks) over a rank's experts)
  eplb-fresh        hot-expert replication planned on the served blocks' own load (`--calibration eval`)
  eplb-stale        the same planned on the model's train blocks (an earlier window of the text)
  eplb-stale+<s>    stale EPLB with capacity per rank (each assignment owned by the replica it was routed
                    to) and the stand-in serving the residual overflow
  speculative       `full` with speculative pre-dispatch, counted from the routing trace
Replication gets ceil(the stand-in's memory) extra slots per rank, so it never holds less memory
than the stand-in it is compared with. Rows carry all-to-all bytes, routing-exchange bytes, total
bytes, rank load and rank work (all FLOPs), memory per rank and the perplexity change.

Usage:
  python benchmarks/ep_understudy.py --model runs/teacher --standins runs/bench-quality/trunk-e2e
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, write_result  # noqa: E402

from moe_understudy.config import EPConfig  # noqa: E402
from moe_understudy.moe.adapters import find_moe_layers  # noqa: E402
from moe_understudy.moe.loading import load_model_and_tokenizer  # noqa: E402
from moe_understudy.moe.standins import ASSIGNMENT, level_of  # noqa: E402
from moe_understudy.runtime.ep import launch_ep  # noqa: E402
from moe_understudy.runtime.placement import plan_placement  # noqa: E402
from moe_understudy.runtime.speculative import estimate_affinity, predict_experts, speculate  # noqa: E402
from moe_understudy.sim.traces import capture_trace  # noqa: E402
from moe_understudy.understudy.io import load_understudies  # noqa: E402

console = Console()


def speculative_row(
    model, calib: torch.Tensor, blocks: torch.Tensor, ranks: int, full: dict, blocks_per_step: int
) -> dict:
    """Speculative dispatch on the same blocks: bytes avoided / corrected, accuracy per layer."""
    cal = capture_trace(model, calib)
    ev = capture_trace(model, blocks)
    E, k = ev.num_experts, ev.top_k
    aff = estimate_affinity(
        cal.indices, E, cal.token_ids, vocab_size=int(max(cal.token_ids.max(), ev.token_ids.max())) + 1
    )
    pred = predict_experts(aff, ev.indices, ev.token_ids, k)
    place = plan_placement(ev.num_layers, E, ranks)
    # home rank of every token: rank r holds blocks_per_step / ranks consecutive blocks of each step
    S = blocks.shape[1]
    block_of = torch.arange(ev.num_tokens) // S
    home = (block_of % blocks_per_step) // (blocks_per_step // ranks)
    rep = speculate(ev.indices, pred, place.expert_rank(), home, ranks)
    H = find_moe_layers(model)[0].hidden_size
    row = H * 4  # fp32 rows, as in the EP runs
    base_dispatch = float(rep.baseline_rows.sum()) * row
    # Full's all_to_all bytes = dispatch + combine; speculation changes only the dispatch part.
    critical = full["a2a_bytes"] - float(rep.avoided_rows.sum()) * row
    wire = (
        full["a2a_bytes"]
        - base_dispatch
        + float(rep.predispatched_rows.sum() + rep.corrected_rows.sum()) * row
    )
    # Every byte is charged: the pre-dispatched rows, the corrections, and the routing exchange that
    # full already needs; speculation shortens the critical path, it does not shrink the traffic.
    return {
        "system": "speculative",
        "policy": "full",
        "capacity_factor": None,
        "perplexity": full["perplexity"],
        "a2a_bytes": wire,
        "exchange_bytes": full["exchange_bytes"],
        "total_bytes": wire + full["exchange_bytes"],
        "critical_path_a2a_bytes": critical,
        "trace_dispatch_bytes": base_dispatch,
        "memory_expert_equiv": 0.0,
        "max_over_mean_rank_load": full["max_over_mean_rank_load"],
        "max_over_mean_rank_work": full["max_over_mean_rank_work"],
        "rank_work_imbalance": full["rank_work_imbalance"],
        "expert_accuracy_per_layer": rep.expert_accuracy.tolist(),
        "rank_accuracy_per_layer": rep.rank_accuracy.tolist(),
        "extra_memory": "affinity tables only",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="runs/teacher")
    ap.add_argument("--standins", nargs="+", required=True, help="stand-in folders from `understudy distill`")
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--max-blocks", type=int, default=64)
    ap.add_argument("--blocks-per-rank", type=int, default=2)
    ap.add_argument("--capacities", default="1.0,1.5,2.0")
    ap.add_argument("--work", default="runs/bench_ep")
    ap.add_argument("--name", default="ep_understudy")
    ap.add_argument("--replot", action="store_true", help="only redraw the PNG from the results JSON")
    args = ap.parse_args()
    if args.replot:
        rows = json.loads((RESULTS / f"{args.name}.json").read_text())["rows"]
        plot(rows, RESULTS / f"{args.name}.png", args.ranks)
        return
    torch.set_num_threads(1)
    work = Path(args.work)
    model, _ = load_model_and_tokenizer(args.model)
    cache = torch.load(Path(args.model) / "blocks.pt")
    train, val = cache["train"], cache["val"][: args.max_blocks]
    caps = tuple(float(c) for c in args.capacities.split(","))

    def ep(name: str, **kw) -> list[dict]:
        """One torchrun launch; a row per (policy, capacity) run, named `name` + policy + cf."""
        cfg = EPConfig(
            model=args.model,
            max_blocks=args.max_blocks,
            blocks_per_rank=args.blocks_per_rank,
            out=str(work / name),
            priority="score",
            **kw,
        )
        console.print(
            f"[bold]{name}[/]: torchrun x{args.ranks}, policies {cfg.policies}, capacities {cfg.capacities}"
        )
        return [{"system": system_name(name, r), **r} for r in launch_ep(cfg, args.ranks)]

    rows: list[dict] = ep("full", policies=("full", "drop", "expanded_drop"), capacities=caps)
    rows += ep("rankcap", policies=("drop",), capacities=caps, capacity_scope="rank")
    slots_done: set[int] = set()
    for path in args.standins:
        label = Path(path).name
        stand_ins = load_understudies(path, model)
        u0 = next(iter(stand_ins.values()))
        own = "shadow" if level_of(u0) == ASSIGNMENT else "understudy"
        runs = ep(f"contiguous-{label}", policies=(own,), capacities=caps, understudies=str(path))
        runs += ep(
            f"rankcap-{label}",
            policies=(own,),
            capacities=caps,
            understudies=str(path),
            capacity_scope="rank",
        )
        # EPLB at least the stand-in's memory: ceil(its memory) extra expert slots per rank
        layer0 = find_moe_layers(model)[0]
        slots = max(1, math.ceil(u0.memory_expert_equiv(layer0.expert_params()) - 1e-9))
        if slots not in slots_done:
            slots_done.add(slots)
            rows += ep(f"eplb-fresh-x{slots}", placement="replicate", extra_slots=slots, calibration="eval")
            rows += ep(f"eplb-stale-x{slots}", placement="replicate", extra_slots=slots, calibration="train")
        runs += ep(
            f"eplb-stale-x{slots}+{label}", policies=(own,), capacities=caps, understudies=str(path),
            placement="replicate", extra_slots=slots, calibration="train", capacity_scope="rank",
        )  # fmt: skip
        rows += [{**r, "standin": label} for r in runs]
    full = next(r for r in rows if r["system"] == "full")
    calib = train[:64]
    steps_blocks = (len(val) // (args.ranks * args.blocks_per_rank)) * args.ranks * args.blocks_per_rank
    rows.append(
        speculative_row(model, calib, val[:steps_blocks], args.ranks, full, args.ranks * args.blocks_per_rank)
    )

    for r in rows:
        r["ppl_increase_pct"] = 100 * (r["perplexity"] / full["perplexity"] - 1)
        r["total_bytes_cut_pct"] = 100 * (1 - r["total_bytes"] / full["total_bytes"])
    table = Table(
        title=f"Expert parallelism over {args.ranks} ranks, {args.model} ({args.max_blocks} held-out blocks)"
    )
    for c in (
        "system",
        "memory/rank",
        "+ppl %",
        "a2a MB",
        "exchange MB",
        "total cut %",
        "max/mean load",
        "work imb.",
    ):
        table.add_column(c, justify="left" if c == "system" else "right")
    for r in rows:
        table.add_row(
            r["system"],
            f"{r.get('memory_expert_equiv', 0):.2f}",
            f"{r['ppl_increase_pct']:+.2f}",
            f"{r['a2a_bytes'] / 1e6:.2f}",
            f"{r.get('exchange_bytes', 0) / 1e6:.3f}",
            f"{r['total_bytes_cut_pct']:.1f}",
            f"{r['max_over_mean_rank_load']:.3f}",
            f"{r['rank_work_imbalance']:.3f}",
        )
    console.print(table)
    plot(rows, RESULTS / f"{args.name}.png", args.ranks)
    write_result(
        args.name,
        {
            "what": __doc__.splitlines()[0],
            "note": (
                "CPU shared with other jobs: times are indicative only; bytes, loads and perplexity are exact. "
                "a2a_bytes: rows crossing ranks in dispatch + combine (fp32 hidden rows); exchange_bytes: the routing "
                "information all-gathered to plan (per-rank counts or compact rows, see runtime/exchange.py); "
                "total_bytes = both. memory_expert_equiv: per rank per MoE layer beyond its own experts (stand-in "
                "and replica slots). Speculative's a2a_bytes are all its rows on the wire (pre-dispatched, corrected, "
                "combined); critical_path_a2a_bytes is what remains after the router."
            ),
            "rows": rows,
        },
    )


def system_name(launch: str, run: dict) -> str:
    """Row name: the launch's name for `full`, else policy, capacity scope and capacity factor."""
    if run["policy"] == "full":
        return launch
    scope = "-rankcap" if run.get("capacity_scope") == "rank" else ""
    return f"{launch}:{run['policy']}{scope}-cf{run['capacity_factor']:g}"


def system_kind(system: str) -> str:
    """A row's system without its capacity factor: the rows of one kind form a curve over cf."""
    return re.sub(r"-cf[\d.]+", "", system)


def plot(rows: list[dict], path: Path, ranks: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = {"full": "o", "drop": "x", "reroute": "v", "understudy": "s", "shadow": "P"}
    markers |= {"replication": "^", "speculative": "D", "balanced": "o"}
    kinds: dict[str, list[dict]] = {}
    for r in rows:
        kinds.setdefault(system_kind(r["system"]), []).append(r)
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 6))
    colors = plt.cm.tab20(range(20))
    for n, (kind, runs) in enumerate(kinds.items()):
        runs = sorted(runs, key=lambda r: r.get("capacity_factor") or 0)
        # Capacity per rank dashed, so the two scopes of one policy read as a pair.
        style = dict(
            marker=markers.get(kind.split(" ")[0].split("-")[0], "."),
            ls="--" if "rankcap" in kind else "-",
            color=colors[n % 20],
            label=kind,
        )
        a.plot([r["total_bytes_cut_pct"] for r in runs], [r["ppl_increase_pct"] for r in runs], **style)
        b.plot([r["max_over_mean_rank_load"] for r in runs], [r["ppl_increase_pct"] for r in runs], **style)
    a.set_xlabel("total bytes cut vs full (%): all-to-all + routing exchange")
    a.set_ylabel("perplexity increase vs full (%)")
    a.set_yscale("symlog", linthresh=1.0)
    a.axhline(1.0, ls=":", c="grey")
    a.axvline(30.0, ls=":", c="grey")
    b.set_xlabel("max / mean rank load (expert rows)")
    b.set_yscale("symlog", linthresh=1.0)
    b.axhline(1.0, ls=":", c="grey")
    b.axvline(1.1, ls=":", c="grey")
    fig.suptitle(
        f"Expert parallelism over {ranks} ranks (gloo); each curve sweeps the capacity factor; "
        "target: bottom right (left plot), bottom left (right plot)",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0.16, 1, 1))
    fig.legend(*a.get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=7, frameon=False)
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
