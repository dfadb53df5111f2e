"""How much of a stand-in's figure is its training: one recipe trained with several seeds, read
from one `quality_under_load` run that scored them all on the same held-out batches.

A `quality_under_load` interval is the spread between held-out samples of one trained stand-in.
This script puts the spread between trainings beside it. Per recipe (the sets whose names differ
only by a trailing `-sN`) and capacity factor, under score priority: each training's Δppl with its
interval, the mean over trainings with its interval over batches (all trainings resampled together,
`eval.metrics.mean_paired_ppl_delta`), the standard deviation and range between trainings, and
the issue's targets read on every training and on the mean. Recipes after the first are set
against it seed by seed on the same batches (a paired gap per seed, then their mean).

    python benchmarks/quality_under_load.py --model runs/bench-demo/teacher --devices 4 --blocks 320 \
        --priorities score --standins runs/probe/a24f+e2e-s0 --standins runs/probe/a24f+e2e-s1 ... \
        --name quality_under_load_demo_seeds
    python benchmarks/seed_spread.py --source quality_under_load_demo_seeds
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, write_result  # noqa: E402
from quality_under_load import PPL_TARGETS, verdict  # noqa: E402

from moe_understudy.eval.metrics import mean_paired_ppl_delta, paired_ppl_delta  # noqa: E402
from moe_understudy.report import pyplot, save_figure  # noqa: E402

SEED_SUFFIX = re.compile(r"^(?P<recipe>.+)-s(?P<seed>\d+)$")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--source",
        required=True,
        help="a quality_under_load result: NAME (in benchmarks/results) or a path to its JSON",
    )
    p.add_argument("--policy", default="shadow", help="the stand-in policy whose rows are read")
    p.add_argument("--name", default=None, help="result name (default: SOURCE_spread)")
    return p.parse_args()


def load_source(source: str) -> tuple[Path, dict]:
    path = Path(source) if source.endswith(".json") else RESULTS / f"{source}.json"
    if not path.exists():
        sys.exit(f"{path} does not exist; run benchmarks/quality_under_load.py with --name first.")
    return path, json.loads(path.read_text())


def recipes_of(rows: list[dict], policy: str) -> dict[str, dict[int, str]]:
    """recipe -> {seed: set name}, for the sets named RECIPE-sN that have `policy` rows."""
    out: dict[str, dict[int, str]] = {}
    for name in dict.fromkeys(r["set"] for r in rows if r["set"] and r["policy"] == policy):
        m = SEED_SUFFIX.match(name)
        if m:
            out.setdefault(m["recipe"], {})[int(m["seed"])] = name
    return {k: dict(sorted(v.items())) for k, v in out.items() if len(v) > 1}


def per_batch(row: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        torch.tensor(row["batch_nll"], dtype=torch.float64),
        torch.tensor(row["batch_positions"], dtype=torch.float64),
    )


def spread(
    rows: list[dict], recipes: dict[str, dict[int, str]], policy: str, capacities: list[float]
) -> dict:
    """Per recipe and cf: every training's row, the mean over trainings and the spread between them."""
    score = [r for r in rows if r["priority"] == "score"]
    full, counts = per_batch(next(r for r in score if r["policy"] == "full"))
    at = {(r["policy"], r["set"], r["capacity_factor"]): r for r in score}
    lead = next(iter(recipes))
    out: dict = {}
    for recipe, seeds in recipes.items():
        for cf in capacities:
            mine = [at[(policy, name, cf)] for name in seeds.values()]
            nll = torch.stack([per_batch(r)[0] for r in mine])
            point, interval = mean_paired_ppl_delta(nll, full, counts)
            each = [r["ppl_delta_pct"] for r in mine]
            res = {
                "seeds": list(seeds),
                "each_pct": each,
                "each_ci95": [r["ppl_delta_ci95"] for r in mine],
                "mean_pct": point,
                "mean_ci95": list(interval),
                "sd_between_trainings_pct": statistics.stdev(each),
                "range_pct": [min(each), max(each)],
            }
            for target_cf, target, key in PPL_TARGETS:
                if cf == target_cf:
                    res[key] = {
                        "each": [verdict(r["ppl_delta_pct"], r["ppl_delta_ci95"], target) for r in mine],
                        "mean": verdict(point, interval, target),
                    }
            shared = [s for s in seeds if s in recipes[lead]]
            if recipe != lead and shared:
                theirs = torch.stack([per_batch(at[(policy, recipes[lead][s], cf)])[0] for s in shared])
                ours = torch.stack([per_batch(at[(policy, seeds[s], cf)])[0] for s in shared])
                gap, gap_interval = mean_paired_ppl_delta(ours, theirs, counts)
                res[f"vs {lead}"] = {
                    "each_pct": [paired_ppl_delta(o, t, counts) for o, t in zip(ours, theirs, strict=True)],
                    "mean_pct": gap,
                    "mean_ci95": list(gap_interval),
                }
            out.setdefault(recipe, {})[f"{cf:g}"] = res
    return out


def baselines(rows: list[dict], capacities: list[float]) -> dict:
    at = {(r["policy"], r["capacity_factor"]): r for r in rows if r["priority"] == "score" and not r["set"]}
    return {
        p: {f"{cf:g}": at[(p, cf)]["ppl_delta_pct"] for cf in capacities if (p, cf) in at}
        for p in ("drop", "expanded_drop")
    }


def print_table(result: dict, base: dict, capacities: list[float], title: str) -> None:
    t = Table(title=title)
    t.add_column("system (score priority)")
    for cf in capacities:
        t.add_column(f"cf {cf:g}", justify="right")
    for policy, by_cf in base.items():
        t.add_row(policy, *[f"{by_cf.get(f'{cf:g}', float('nan')):+.2f}%" for cf in capacities])
    for recipe, by_cf in result.items():
        first = by_cf[f"{capacities[0]:g}"]
        for i, seed in enumerate(first["seeds"]):
            t.add_row(
                f"{recipe}, seed {seed}", *[f"{by_cf[f'{cf:g}']['each_pct'][i]:+.2f}%" for cf in capacities]
            )
        t.add_row(
            f"[bold]{recipe}, mean of {len(first['seeds'])}[/]",
            *[
                "{:+.2f}% ({:+.2f}, {:+.2f}) sd {:.2f}".format(
                    r["mean_pct"], *r["mean_ci95"], r["sd_between_trainings_pct"]
                )
                for r in (by_cf[f"{cf:g}"] for cf in capacities)
            ],
        )
    Console(width=200).print(t)


def plot(result: dict, base: dict, capacities: list[float], path: Path, title: str) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for policy, by_cf in base.items():
        ax.plot(capacities, [by_cf[f"{cf:g}"] for cf in capacities], "--", marker="o", label=policy)
    for recipe, by_cf in result.items():
        rs = [by_cf[f"{cf:g}"] for cf in capacities]
        for i in range(len(rs[0]["each_pct"])):
            ax.plot(capacities, [r["each_pct"][i] for r in rs], color="grey", lw=0.6, alpha=0.7)
        mean = [r["mean_pct"] for r in rs]
        ax.errorbar(
            capacities,
            mean,
            yerr=[[m - r["mean_ci95"][0] for m, r in zip(mean, rs, strict=True)],
                  [r["mean_ci95"][1] - m for m, r in zip(mean, rs, strict=True)]],
            marker="o",
            capsize=2,
            label=f"{recipe} (mean of {len(rs[0]['each_pct'])}; grey: each)",
        )  # fmt: skip
    ax.set_yscale("symlog", linthresh=1.0)
    ax.axhline(1.0, color="grey", lw=0.6, ls=":")
    ax.axhline(0.1, color="grey", lw=0.6, ls=":")
    ax.set_xlabel("capacity factor")
    ax.set_ylabel("perplexity change vs full (%)")
    ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def main() -> None:
    args = parse_args()
    path, source = load_source(args.source)
    rows, capacities = source["rows"], [float(c) for c in source["capacities"]]
    recipes = recipes_of(rows, args.policy)
    if not recipes:
        sys.exit(f"{path} holds no sets named RECIPE-sN with two or more seeds; name the folders so.")
    name = args.name or f"{path.stem}_spread"
    result = spread(rows, recipes, args.policy, capacities)
    base = baselines(rows, capacities)
    title = (
        f"{source['model']}: {source['experts']} experts top-{source['top_k']}, {source['blocks']} blocks, "
        f"{source['devices']} devices; trainings of each recipe on the same batches"
    )
    print_table(result, base, capacities, title)
    png = plot(result, base, capacities, RESULTS / f"{name}.png", title)
    out = write_result(
        name,
        {
            "source": str(path),
            "source_command": source["command"],
            "model": source["model"],
            "blocks": source["blocks"],
            "devices": source["devices"],
            "policy": args.policy,
            "baselines_pct": base,
            "recipes": result,
            "notes": "each_ci95 and mean_ci95 are 95% bootstrap intervals over held-out batches (one trained "
            "stand-in, or the mean of the trainings with all of them resampled together); the spread between "
            "trainings is sd_between_trainings_pct and range_pct. Verdicts: met = the whole interval inside "
            "the target, 'met by the point estimate, inside the noise' = the point inside only.",
            "plot": str(png),
        },
    )
    print(f"wrote {out} and {png}")


if __name__ == "__main__":
    main()
