"""Realism ladder: how the gaps between overflow policies move as teachers get better.

For each teacher (a size, a granularity or a training length) the same systems run on the same
held-out text: score-priority token drop, `expanded_drop`, the teacher's best stand-in at memory
<= 1 routed expert per layer (`shadow` over an assignment-level set), and full, at cf 1.0 / 1.5 /
2.0. Every teacher is scored on the same blocks (the default teacher's held-out stdlib text; all
teachers share its tokenizer), so its held-out perplexity is the x axis of the plot and the
per-system perplexity change the y axis: the trend with teacher quality is how we reason about
real sizes. Devices: `--experts-per-device` experts per device (so expanded drop's local pool and
the byte ledger scale with the teacher's granularity).

    .venv/bin/python benchmarks/realism_ladder.py \\
        --teacher default=runs/teacher --standin default=runs/bench-quality/trunk-e2e \\
        --teacher fine-500=runs/teacher-fine/at-500 --standin fine-500=runs/bench-fine/trunk-500 \\
        --teacher fine=runs/teacher-fine --standin fine=runs/bench-fine/trunk-e2e
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, write_result  # noqa: E402

from moe_understudy.eval.metrics import perplexity  # noqa: E402
from moe_understudy.eval.quality import evaluate_policies  # noqa: E402
from moe_understudy.moe.adapters import find_moe_layers  # noqa: E402
from moe_understudy.report import pyplot, save_figure  # noqa: E402

NAME = "realism_ladder"
console = Console(stderr=True)


def pairs(values: list[str], what: str) -> dict[str, str]:
    out = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep:
            raise SystemExit(f"{what} takes NAME=PATH, got {v!r}")
        out[name] = path
    return out


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", action="append", default=[], help="NAME=FOLDER (repeatable, in ladder order)")
    p.add_argument("--standin", action="append", default=[], help="NAME=FOLDER of the teacher's stand-in set")
    p.add_argument(
        "--heldout", default="runs/teacher", help="folder whose cached val blocks every teacher is scored on"
    )
    p.add_argument("--capacities", default="1,1.5,2")
    p.add_argument("--blocks", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--experts-per-device", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--name", default=NAME)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    from moe_understudy.moe.loading import load_model_and_tokenizer
    from moe_understudy.understudy.io import load_understudies

    teachers, standins = pairs(args.teacher, "--teacher"), pairs(args.standin, "--standin")
    capacities = [float(c) for c in args.capacities.split(",")]
    blocks = torch.load(Path(args.heldout) / "blocks.pt")["val"][: args.blocks]
    rows, facts = [], []
    t0 = time.time()
    for name, folder in teachers.items():
        model, _ = load_model_and_tokenizer(folder)
        layers = find_moe_layers(model)
        E, k = layers[0].num_experts, layers[0].top_k
        devices = max(1, E // args.experts_per_device)
        ppl = perplexity(model, blocks, batch_size=args.batch_size)
        facts.append(
            {
                "teacher": name,
                "folder": folder,
                "heldout_ppl": ppl,
                "experts": E,
                "top_k": k,
                "devices": devices,
            }
        )
        console.print(f"{name}: {E} experts top-{k}, held-out perplexity {ppl:.2f}, {devices} devices")
        common = dict(batch_size=args.batch_size, num_devices=devices, priority="score")
        got = evaluate_policies(model, None, blocks, ["drop", "expanded_drop"], capacities, **common)
        rows += [
            {**r, "teacher": name, "teacher_ppl": ppl, "experts": E, "top_k": k, "system": r["policy"]}
            for r in got
        ]
        if name in standins:
            stand_ins = load_understudies(standins[name], model)
            got = evaluate_policies(model, stand_ins, blocks, ["shadow"], capacities, **common)
            rows += [
                {**r, "teacher": name, "teacher_ppl": ppl, "experts": E, "top_k": k, "system": "stand-in (shadow)",
                 "standins": standins[name]}
                for r in got[1:]
            ]  # fmt: skip
    seconds = time.time() - t0
    table = Table(
        title=f"realism ladder: perplexity change vs full, score priority, {len(blocks)} held-out blocks"
    )
    for c in (
        "teacher",
        "experts/top-k",
        "held-out ppl",
        "system",
        "memory",
        *[f"cf {c:g}" for c in capacities],
    ):
        table.add_column(c)
    for f in facts:
        for system in ("drop", "expanded_drop", "stand-in (shadow)"):
            by_cf = {
                r["capacity_factor"]: r
                for r in rows
                if r["teacher"] == f["teacher"] and r["system"] == system
            }
            if not by_cf:
                continue
            memory = next(iter(by_cf.values()))["memory_expert_equiv"]
            table.add_row(
                f["teacher"], f"{f['experts']}/{f['top_k']}", f"{f['heldout_ppl']:.2f}", system, f"{memory:.2f}",
                *[f"{by_cf[cf]['ppl_delta_pct']:+.2f}%" if cf in by_cf else "" for cf in capacities],
            )  # fmt: skip
    Console(width=160).print(table)
    png = plot(rows, facts, capacities, RESULTS / f"{args.name}.png")
    path = write_result(
        args.name,
        {
            "teachers": facts,
            "capacities": capacities,
            "blocks": int(blocks.shape[0]),
            "heldout": args.heldout,
            "experts_per_device": args.experts_per_device,
            "seconds": round(seconds, 1),
            "notes": "Every teacher scored on the same held-out blocks (shared tokenizer); score priority; capacity "
            "per layer and step of batch_size blocks; stand-in rows: the teacher's assignment-level set under policy "
            "shadow, memory_expert_equiv per device per MoE layer in routed experts.",
            "plot": str(png),
            "rows": rows,
        },
    )
    console.print(f"wrote {path} and {png}")


def plot(rows, facts, capacities, path: Path) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(capacities), figsize=(5 * len(capacities), 4.5), sharey=True)
    order = {f["teacher"]: f["heldout_ppl"] for f in facts}
    for ax, cf in zip(axes, capacities, strict=True):
        for system in ("drop", "expanded_drop", "stand-in (shadow)"):
            pts = sorted(
                (order[r["teacher"]], r["ppl_delta_pct"], r["teacher"])
                for r in rows
                if r["system"] == system and r["capacity_factor"] == cf
            )
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=system)
                for x, y, name in pts:
                    ax.annotate(name, (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
        ax.set_xscale("log")
        ax.set_yscale("symlog", linthresh=1.0)
        ax.set_xlabel("teacher held-out perplexity (lower is better)")
        ax.set_title(f"cf {cf:g}")
        ax.invert_xaxis()
    axes[0].set_ylabel("perplexity change vs full (%)")
    axes[0].legend(fontsize=8)
    fig.suptitle("realism ladder: Δppl under load as teachers get better (score priority)")
    return save_figure(fig, path)


if __name__ == "__main__":
    main()
