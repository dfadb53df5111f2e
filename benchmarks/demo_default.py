"""`understudy demo` from scratch, timed stage by stage, with the default teacher's figures.

    python benchmarks/demo_default.py [--out runs/bench-demo]

Runs the whole main job (train the default teacher, capture, distil dense understudies layer-wise
then end-to-end, evaluate every policy at cf 0.5-1.25) into a fresh --out and writes
benchmarks/results/demo_default.json: wall time per stage, the teacher's held-out perplexity,
tokens/s and expert-load imbalance, and the evaluation rows. The load average is recorded since a
busy machine stretches wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from _common import write_result
from rich.console import Console
from rich.table import Table

from moe_understudy.config import DemoConfig
from moe_understudy.demo import run_demo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench-demo", help="run folder (deleted first)")
    parser.add_argument(
        "--keep-teacher",
        action="store_true",
        help="keep OUT/teacher from an earlier launch; its minutes then come from its metrics.json",
    )
    args = parser.parse_args()
    for stage in ("store", "understudies", "eval") if args.keep_teacher else ("",):
        shutil.rmtree(Path(args.out) / stage, ignore_errors=True)
    console = Console()
    cfg = DemoConfig(out=args.out)
    load_before = os.getloadavg()[0]
    result = run_demo(cfg, console=console)
    load_after = os.getloadavg()
    teacher = json.loads((Path(args.out) / "teacher" / "metrics.json").read_text())
    if args.keep_teacher:  # trained by an earlier launch: count its own training time
        result["timings"]["teacher"] = teacher["train_seconds"]
    distill = json.loads((Path(args.out) / "understudies" / "report.json").read_text())

    table = Table(title="understudy demo, from scratch")
    for col in ["stage", "minutes"]:
        table.add_column(col, justify="right")
    for stage, seconds in result["timings"].items():
        table.add_row(stage, f"{seconds / 60:.2f}")
    table.add_row("total", f"{sum(result['timings'].values()) / 60:.2f}")
    console.print(table)
    ratios = teacher["expert_load"]["max_over_mean_per_batch"]
    path = write_result(
        "demo_default",
        {
            "config": cfg.to_dict(),
            "teacher_from_earlier_launch": args.keep_teacher,
            "minutes": {k: round(v / 60, 2) for k, v in result["timings"].items()},
            "total_minutes": round(sum(result["timings"].values()) / 60, 2),
            "teacher": {
                "val_perplexity": teacher["val_perplexity"],
                "tokens_per_second": teacher["tokens_per_second"],
                "train_minutes": round(teacher["train_seconds"] / 60, 2),
                "train_tokens": teacher["train_tokens"],
                "max_over_mean_per_layer_batch": ratios,
                "mean_max_over_mean": round(sum(ratios) / len(ratios), 3),
            },
            "distill": {k: distill.get(k) for k in ("ppl_teacher", "ppl_layerwise", "ppl_e2e")},
            "rows": result["rows"],
            "load_average_1min": {
                "before": load_before,
                "after": load_after[0],
                "after_15min": load_after[2],
            },
        },
    )
    console.print(f"written {path}")


if __name__ == "__main__":
    main()
