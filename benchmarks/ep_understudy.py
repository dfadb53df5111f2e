"""Expert parallelism over 4 ranks on the default teacher: understudies vs full, drop, replication, speculation.

Every system runs in this one invocation on the same held-out blocks:
  full         contiguous placement, every assignment to its expert (the reference)
  drop         capacity over the global batch, overflow dropped
  reroute      capacity over the global batch, overflow moved to the next-best expert with room
  understudy   capacity over the global batch, overflowing tokens served locally by the understudy
  ...-rankcap  the same policy with capacity per rank (ceil(cf * tokens * k / ranks) over all of a
               rank's experts) instead of per expert, so cold experts absorb hot neighbours' load
  balanced     `full` with experts packed onto ranks by measured load (EPLB packing, no replicas,
               no extra memory); `...-rankcap-balanced` adds capacity per rank on that placement
  replication  `full` on an EPLB-style placement that replicates hot experts (load measured on train
               blocks) into the spare slots one understudy's memory buys (equal memory)
  speculative  `full` with speculative pre-dispatch (affinities fitted on train blocks): counted
               from the routing trace of the same blocks, since the outputs equal `full`'s
All but `speculative` run for real through torchrun (gloo, one process per rank); bytes are the
split sizes passed to all_to_all_single. Perplexity is over the same blocks for every system.

Usage:
  python benchmarks/ep_understudy.py [--model runs/teacher] [--understudies DIR ...]
Without --understudies, dense understudies are fitted here by layer-wise MSE (a quick stand-in
for `understudy distill`) at the costs given by --costs.
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
from moe_understudy.runtime.ep import launch_ep  # noqa: E402
from moe_understudy.runtime.placement import plan_placement  # noqa: E402
from moe_understudy.runtime.speculative import estimate_affinity, predict_experts, speculate  # noqa: E402
from moe_understudy.sim.traces import capture_trace  # noqa: E402
from moe_understudy.understudy.io import load_understudies, save_understudies  # noqa: E402
from moe_understudy.understudy.modules import Shadows, build_understudy  # noqa: E402

console = Console()


@torch.no_grad()
def routed_pairs(model, blocks: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{layer index: (x (N, H), routed output y (N, H))} over `blocks`, via forward pre-hooks."""
    layers = find_moe_layers(model)
    xs = {m.index: [] for m in layers}
    ys = {m.index: [] for m in layers}

    def hook_for(m):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1])
            r = m.route(x)
            xs[m.index].append(x.clone())
            ys[m.index].append(m.experts(x, r.indices, r.weights))

        return hook

    handles = [m.block.register_forward_pre_hook(hook_for(m)) for m in layers]
    for s in range(0, len(blocks), 8):
        model(input_ids=blocks[s : s + 8])
    for h in handles:
        h.remove()
    return {i: (torch.cat(xs[i]), torch.cat(ys[i])) for i in xs}


def fit_dense(model, blocks: torch.Tensor, cost: float, steps: int, out: Path) -> Path:
    """Dense SwiGLU understudies of `cost` x the active routed FLOPs, fitted by MSE; saved to `out`."""
    if (out / "config.json").exists():
        return out
    torch.manual_seed(0)
    pairs = routed_pairs(model, blocks)
    understudies = {}
    for m in find_moe_layers(model):
        inter = int(round(cost * m.top_k * m.expert_intermediate_size))
        u = build_understudy("dense", m, seed=m.index, intermediate=inter)
        x, y = pairs[m.index]
        opt = torch.optim.AdamW(u.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(m.index)
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = 3e-3 * 0.5 * (1 + math.cos(math.pi * step / steps))
            idx = torch.randint(len(x), (1024,), generator=g)
            loss = torch.nn.functional.mse_loss(u(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        console.print(f"  layer {m.index}: dense understudy I={inter}, final MSE {loss.item():.4g}")
        understudies[m.index] = u.eval()
    save_understudies(out, understudies, model)
    return out


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
    return {
        "system": "speculative",
        "policy": "full",
        "capacity_factor": None,
        "perplexity": full["perplexity"],
        "a2a_bytes": critical,
        "a2a_bytes_on_wire": wire,
        "trace_dispatch_bytes": base_dispatch,
        "max_over_mean_rank_load": full["max_over_mean_rank_load"],
        "max_over_mean_rank_work": full["max_over_mean_rank_work"],
        "expert_accuracy_per_layer": rep.expert_accuracy.tolist(),
        "rank_accuracy_per_layer": rep.rank_accuracy.tolist(),
        "extra_memory": "affinity tables only",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="runs/teacher")
    ap.add_argument(
        "--understudies", nargs="*", default=None, help="understudy folders (from `understudy distill`)"
    )
    ap.add_argument(
        "--costs", default="0.5,1.0", help="costs of the quick MSE understudies fitted when none are given"
    )
    ap.add_argument("--fit-steps", type=int, default=1500)
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--max-blocks", type=int, default=64)
    ap.add_argument("--blocks-per-rank", type=int, default=2)
    ap.add_argument("--capacities", default="0.75,1.0,1.25,1.5,2.0")
    ap.add_argument("--work", default="runs/bench_ep")
    ap.add_argument("--name", default="ep_understudy")
    ap.add_argument("--replot", action="store_true", help="only redraw the PNG from the results JSON")
    args = ap.parse_args()
    if args.replot:
        plot(
            json.loads((RESULTS / f"{args.name}.json").read_text())["rows"],
            RESULTS / f"{args.name}.png",
            args.ranks,
        )
        return
    torch.set_num_threads(1)
    work = Path(args.work)
    model, _ = load_model_and_tokenizer(args.model)
    cache = torch.load(Path(args.model) / "blocks.pt")
    train, val = cache["train"], cache["val"][: args.max_blocks]
    layer0 = find_moe_layers(model)[0]
    expert_params = 3 * layer0.hidden_size * layer0.expert_intermediate_size

    # understudies: given, or fitted here
    sets: list[tuple[str, Path]] = []
    if args.understudies:
        sets = [(Path(p).name, Path(p)) for p in args.understudies]
    else:
        fit_blocks = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:256]]
        for c in (float(c) for c in args.costs.split(",")):
            console.print(f"fitting dense understudies at cost {c} (layer-wise MSE, {args.fit_steps} steps)")
            sets.append(
                (
                    f"mse-dense-cost{c}",
                    fit_dense(model, fit_blocks, c, args.fit_steps, work / f"understudies-cost{c}"),
                )
            )

    caps = tuple(float(c) for c in args.capacities.split(","))

    def ep(name: str, **kw) -> list[dict]:
        """One torchrun launch; a row per (policy, capacity) run, named `name` + policy + cf."""
        cfg = EPConfig(
            model=args.model,
            max_blocks=args.max_blocks,
            blocks_per_rank=args.blocks_per_rank,
            out=str(work / name),
            **kw,
        )
        console.print(
            f"[bold]{name}[/]: torchrun x{args.ranks}, policies {cfg.policies}, capacities {cfg.capacities}"
        )
        runs = launch_ep(cfg, args.ranks)
        return [{"system": system_name(name, r), **r} for r in runs]

    rows: list[dict] = []
    for i, (label, path) in enumerate(sets):
        us = load_understudies(path, model)
        u0 = next(iter(us.values()))
        cost = u0.flops_per_token() / layer0.active_expert_flops_per_token()
        slots = int(u0.param_count() // expert_params)
        # Per-expert shadows serve single overflowing assignments; dense understudies whole tokens.
        own = "shadow" if isinstance(u0, Shadows) else "understudy"
        policies = ("full", "drop", "reroute", own) if i == 0 else (own,)
        runs = ep(
            "full" if i == 0 else f"contiguous-{label}",
            policies=policies,
            capacities=caps,
            understudies=str(path),
        )
        # Capacity per rank: the lever for rank balance (one launch per understudy set; drop once).
        runs += ep(
            f"rankcap-{label}",
            policies=("drop", own) if i == 0 else (own,),
            capacities=caps,
            understudies=str(path),
            capacity_scope="rank",
        )
        # The same on a load-balanced placement: packing evens out what capacity per rank cannot
        # (a rank whose experts are all cold stays idle whatever the capacity).
        runs += ep(
            "balanced",
            policies=("full", own) if i == 0 else (own,),
            capacities=caps,
            understudies=str(path),
            capacity_scope="rank",
            placement="replicate",
            extra_slots=0,
        )
        for r in runs:
            if r["policy"] == own:
                r.update(
                    system=f"{r['system']} ({label})",
                    understudy=label,
                    understudy_cost=cost,
                    understudy_params=u0.param_count(),
                    equal_memory_slots=slots,
                )
            rows.append(r)
        if slots >= 1 and not any(r["system"] == f"replication-extra{slots}" for r in rows):
            for r in ep(f"replication-extra{slots}", placement="replicate", extra_slots=slots):
                rows.append({**r, "equal_memory_to": label})
    full = next(r for r in rows if r["system"] == "full")
    calib = train[:64]
    spec = speculative_row(
        model,
        calib,
        val[: (len(val) // (args.ranks * args.blocks_per_rank)) * args.ranks * args.blocks_per_rank],
        args.ranks,
        full,
        args.ranks * args.blocks_per_rank,
    )
    rows.append(spec)

    for r in rows:
        r["ppl_increase_pct"] = 100 * (r["perplexity"] / full["perplexity"] - 1)
        r["a2a_cut_pct"] = 100 * (1 - r["a2a_bytes"] / full["a2a_bytes"])
        r["meets_target"] = bool(
            r["ppl_increase_pct"] <= 1.0 and r["a2a_cut_pct"] >= 30.0 and r["max_over_mean_rank_load"] <= 1.1
        )
    # Per kind of system: the largest all-to-all cut among its runs within +1% perplexity.
    within = {}
    for r in rows:
        kind = system_kind(r["system"]).split(" ")[0]
        if r["ppl_increase_pct"] <= 1.0 and r["a2a_cut_pct"] > within.get(kind, {}).get("a2a_cut_pct", -1e9):
            within[kind] = {
                k: r[k] for k in ("system", "ppl_increase_pct", "a2a_cut_pct", "max_over_mean_rank_load")
            }
    table = Table(
        title=f"Expert parallelism over {args.ranks} ranks, {args.model} ({args.max_blocks} held-out blocks)"
    )
    for c in (
        "system",
        "cost",
        "ppl",
        "+ppl %",
        "a2a MB",
        "cut %",
        "max/mean load",
        "max/mean work",
        "degraded",
        "target",
    ):
        table.add_column(c, justify="left" if c == "system" else "right")
    for r in rows:
        table.add_row(
            r["system"],
            f"{r.get('understudy_cost', 0):.2f}" if "understudy_cost" in r else "",
            f"{r['perplexity']:.3f}",
            f"{r['ppl_increase_pct']:+.2f}",
            f"{r['a2a_bytes'] / 1e6:.2f}",
            f"{r['a2a_cut_pct']:.1f}",
            f"{r['max_over_mean_rank_load']:.3f}",
            f"{r['max_over_mean_rank_work']:.3f}",
            f"{r.get('degraded_token_fraction', 0):.1%}",
            "yes" if r["meets_target"] else "no",
        )
    console.print(table)
    plot(rows, RESULTS / f"{args.name}.png", args.ranks)
    write_result(
        args.name,
        {
            "what": __doc__.splitlines()[0],
            "note": (
                "CPU shared with other jobs: times are indicative only; bytes, loads and perplexity are exact. "
                "a2a_bytes counts rows crossing ranks in dispatch + combine (fp32 hidden rows); speculative's "
                "a2a_bytes is its critical-path volume (pre-dispatched rows overlapped), a2a_bytes_on_wire all rows."
            ),
            "target": "ppl <= +1%, a2a bytes cut >= 30%, max/mean rank load <= 1.1 (vs full)",
            "best_cut_within_1pct_ppl": within,
            "any_meets_target": any(r["meets_target"] for r in rows),
            "rows": rows,
        },
    )


def system_name(launch: str, run: dict) -> str:
    """Row name: the launch's name for `full`, else policy, capacity scope and capacity factor."""
    if run["policy"] == "full":
        return launch
    scope = "-rankcap" if run.get("capacity_scope") == "rank" else ""
    placed = "-balanced" if run.get("placement") == "replicate" else ""
    return f"{run['policy']}{scope}{placed}-cf{run['capacity_factor']:g}"


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
        a.plot([r["a2a_cut_pct"] for r in runs], [r["ppl_increase_pct"] for r in runs], **style)
        b.plot([r["max_over_mean_rank_load"] for r in runs], [r["ppl_increase_pct"] for r in runs], **style)
    a.set_xlabel("all-to-all bytes cut vs full (%)")
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
