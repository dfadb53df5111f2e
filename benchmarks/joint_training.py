"""Joint training vs post-hoc distillation of the gated trunk, from the same teacher, on the same text.

Three arms continue the trained teacher for `--steps` more steps (lr `--lr`) with the product's own
commands (`understudy teacher --init-from`, `understudy capture`, `understudy distill`):

  post-hoc   plain continued training, then the trunk distilled layer-wise from a capture store
  detached   the trunk trained alongside on a detached loss (`--joint-understudy trunk`); no distill
  in-loop    detached until half-way, then each step's overflow is served by the trunk in the loop
             (`--joint-in-loop-from`, shadow policy, score priority, cf drawn from [1, 2]), so the
             language-model loss reaches the trunk and the model learns to tolerate it

Each arm's own model is scored under `full` (its perplexity: in-loop only counts if it does not get
worse) and under load (drop, expanded_drop and its trunk with policy shadow, score priority) on the
same held-out blocks. Compute: the three arms take the same teacher steps; post-hoc adds a capture
and a layer-wise fit, the joint arms train the trunk inside the teacher steps.

    .venv/bin/python benchmarks/joint_training.py --teacher runs/teacher --work runs/joint
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result  # noqa: E402

from moe_understudy.eval.quality import evaluate_policies  # noqa: E402

NAME = "joint_training"
console = Console(stderr=True)
UNDERSTUDY = str(Path(sys.executable).parent / "understudy")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="runs/teacher")
    p.add_argument("--work", default="runs/joint")
    p.add_argument("--steps", type=int, default=300, help="continued teacher steps per arm")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--distill-steps", type=int, default=1500, help="post-hoc layer-wise steps per layer")
    p.add_argument("--capacities", default="1,1.5,2")
    p.add_argument("--blocks", type=int, default=64)
    p.add_argument("--devices", type=int, default=4)
    p.add_argument(
        "--preset", default=None, help="the teacher's preset (default: read from its teacher.yaml)"
    )
    p.add_argument("--data", default=None, help="the teacher's corpus (default: read from its teacher.yaml)")
    p.add_argument("--name", default=NAME)
    return p.parse_args()


def run(*cmd: str) -> None:
    console.print("$ " + " ".join(cmd))
    done = subprocess.run(cmd, check=False)
    if done.returncode != 0:
        raise SystemExit(f"command failed (exit {done.returncode}): {' '.join(cmd)}")


def main() -> None:
    args = parse_args()
    from moe_understudy.config import TeacherConfig
    from moe_understudy.moe.loading import load_model_and_tokenizer
    from moe_understudy.understudy.io import load_understudies

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    base = TeacherConfig.from_yaml(Path(args.teacher) / "teacher.yaml")
    preset, data = args.preset or base.preset, args.data or base.data.source
    common = [
        "--preset", preset, "--data", data, "--tokenizer", args.teacher, "--max-chars", str(base.data.max_chars),
        "--init-from", args.teacher, "--steps", str(args.steps), "--lr", str(args.lr), "--warmup", "10",
        "--eval-every", str(max(1, args.steps // 3)),
    ]  # fmt: skip
    arms = {
        "post-hoc": [],
        "detached": ["--joint-understudy", "trunk"],
        "in-loop": ["--joint-understudy", "trunk", "--joint-in-loop-from", str(args.steps // 2)],
    }
    t0 = time.time()
    for arm, extra in arms.items():
        out = work / arm
        if not (out / "config.json").exists():
            run(UNDERSTUDY, "teacher", "--out", str(out), *common, *extra)
    posthoc = work / "post-hoc"
    if not (work / "store" / "manifest.json").exists():
        run(UNDERSTUDY, "capture", str(posthoc), "--tokens", "65536", "--out", str(work / "store"))
    if not (work / "post-hoc-trunk" / "config.json").exists():
        run(
            UNDERSTUDY, "distill", str(posthoc), "--store", str(work / "store"), "--arch", "trunk",
            "--steps", str(args.distill_steps), "--batch-tokens", "512", "--out", str(work / "post-hoc-trunk"),
        )  # fmt: skip
    stand_in_dirs = {
        "post-hoc": work / "post-hoc-trunk",
        "detached": work / "detached" / "understudies",
        "in-loop": work / "in-loop" / "understudies",
    }
    capacities = [float(c) for c in args.capacities.split(",")]
    blocks = torch.load(Path(args.teacher) / "blocks.pt")["val"][: args.blocks]
    rows = []
    for arm in arms:
        model, _ = load_model_and_tokenizer(work / arm)
        stand_ins = load_understudies(stand_in_dirs[arm], model)
        got = evaluate_policies(
            model, stand_ins, blocks, ["drop", "expanded_drop", "shadow"], capacities,
            priority="score", num_devices=args.devices,
        )  # fmt: skip
        rows += [{**r, "arm": arm} for r in got]
    seconds = time.time() - t0
    table = Table(
        title=f"joint vs post-hoc, {args.steps} continued steps each, score priority, {len(blocks)} blocks"
    )
    for c in ("arm", "full ppl", "policy", *[f"cf {c:g}" for c in capacities]):
        table.add_column(c)
    for arm in arms:
        full = next(r for r in rows if r["arm"] == arm and r["policy"] == "full")
        for policy in ("drop", "expanded_drop", "shadow"):
            by_cf = {r["capacity_factor"]: r for r in rows if r["arm"] == arm and r["policy"] == policy}
            table.add_row(
                arm,
                f"{full['perplexity']:.3f}",
                policy,
                *[f"{by_cf[cf]['ppl_delta_pct']:+.2f}%" for cf in capacities],
            )
    Console(width=160).print(table)
    path = write_result(
        args.name,
        {
            "teacher": args.teacher,
            "steps": args.steps,
            "lr": args.lr,
            "distill_steps": args.distill_steps,
            "blocks": int(blocks.shape[0]),
            "devices": args.devices,
            "capacities": capacities,
            "seconds": round(seconds, 1),
            "notes": "Each arm's rows are against its own full model (perplexity column). Compute: equal teacher "
            "steps; post-hoc adds a capture and a layer-wise fit of the trunk.",
            "rows": rows,
        },
    )
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
