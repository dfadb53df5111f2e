"""The default `understudy teacher` run, timed: wall time, tokens/s, held-out perplexity, expert load.

    python benchmarks/teacher_default.py [--out runs/bench-teacher] [--steps N]

Trains the default TeacherConfig (Mixtral-style, 4 layers, hidden 128, 8 experts of 256, top-2,
BPE 4096, 1400 steps of 16 x 128 tokens on the Python stdlib) from scratch into --out and writes
benchmarks/results/teacher_default.json. Also reports the load average seen during the run,
since a busy machine stretches the wall time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time

from _common import write_result
from rich.console import Console
from rich.table import Table

from moe_understudy.config import TeacherConfig
from moe_understudy.teacher import train_teacher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench-teacher", help="run folder (deleted first)")
    parser.add_argument("--steps", type=int, default=None, help="override the default step count")
    args = parser.parse_args()
    cfg = TeacherConfig() if args.steps is None else TeacherConfig(steps=args.steps)
    shutil.rmtree(args.out, ignore_errors=True)
    console = Console()
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    result = train_teacher(cfg, args.out, console=console)
    wall = time.perf_counter() - t0
    load_after = os.getloadavg()
    table = Table(title="default teacher (understudy teacher --out DIR)")
    for col in [
        "wall min (incl. data + tokenizer)",
        "train min",
        "tokens/s",
        "held-out ppl",
        "max/mean load per layer-batch",
    ]:
        table.add_column(col, justify="right")
    table.add_row(
        f"{wall / 60:.2f}",
        f"{result.train_seconds / 60:.2f}",
        f"{result.tokens_per_second:,.0f}",
        f"{result.val_perplexity:.2f}",
        ", ".join(f"{r:.2f}" for r in result.max_over_mean_per_batch),
    )
    console.print(table)
    path = write_result(
        "teacher_default",
        {
            "config": cfg.to_dict(),
            "wall_seconds": round(wall, 1),
            "train_seconds": round(result.train_seconds, 1),
            "tokens_per_second": round(result.tokens_per_second, 1),
            "val_perplexity": round(result.val_perplexity, 3),
            "max_over_mean_per_layer_batch": result.max_over_mean_per_batch,
            "mean_max_over_mean": round(
                sum(result.max_over_mean_per_batch) / len(result.max_over_mean_per_batch), 3
            ),
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
