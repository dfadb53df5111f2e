"""Which lever moves the gated trunk: steps, width (memory and FLOPs), per-expert adapters, warm start.

Each variant is a layer-wise `understudy distill --arch trunk` from the same capture store with its
own flags; all are then evaluated side by side in one run on the same held-out blocks, beside
score-priority token drop and expanded drop (the strongest baselines, no memory). Every row states
memory per device (routed experts per MoE layer), FLOPs of a lone served assignment (x one expert's)
and the measured FLOPs per served assignment at cf 1.0, since the issue caps memory at 1 expert and
FLOPs per served assignment at 1/2 an expert. A variant NAME+e2e... starts from NAME's layer-wise fit
and adds end-to-end steps with overflow drawn as at serving (score priority, cf from [1, 2]): 600
unless its own flags say otherwise.

    understudy capture runs/teacher --tokens 65536 --out runs/store
    .venv/bin/python benchmarks/trunk_variants.py --model runs/teacher --store runs/store --work runs/probe
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
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
from moe_understudy.moe.adapters import find_moe_layers  # noqa: E402

NAME = "trunk_variants"
console = Console(stderr=True)
UNDERSTUDY = str(Path(sys.executable).parent / "understudy")
VARIANTS = (
    "s1500=--steps 1500",  # the default trunk (width: half an expert's FLOPs per lone assignment)
    "w64=--steps 1500 --width 64",  # memory and FLOPs a quarter of an expert
    "w180=--steps 1500 --width 180",  # memory and FLOPs about 3/4 of an expert
    "w240=--steps 1500 --width 240",  # memory ~1 expert, FLOPs ~1 expert per lone assignment
    "a8=--steps 1500 --adapter-rank 8",
    "a16=--steps 1500 --adapter-rank 16",
    "a24=--steps 1500 --adapter-rank 24",  # memory ~0.94 expert: the adapters' share grows, the trunk narrows
    "union=--steps 1500 --init union",
    "s1500+e2e=",  # NAME+e2e: NAME's layer-wise fit, then end-to-end steps with serving overflow
    "a16+e2e=",
    "a24+e2e=",
    "a24+e2e1500=--e2e-steps 1500 --e2e-overflow serving --e2e-lr 3e-4",
)
E2E = "--e2e-steps 600 --e2e-overflow serving --e2e-lr 3e-4"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="runs/teacher")
    p.add_argument("--store", default="runs/store")
    p.add_argument(
        "--work", default="runs/probe", help="one distilled folder per variant (reused if present)"
    )
    p.add_argument("--variant", action="append", help="NAME=FLAGS for `understudy distill` (repeatable)")
    p.add_argument("--capacities", default="1,1.5,2")
    p.add_argument("--blocks", type=int, default=64)
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--name", default=NAME)
    return p.parse_args()


def _base(name: str) -> str:
    """The layer-wise variant an end-to-end variant (NAME+e2e...) starts from."""
    return name.split("+e2e")[0]


def distilled(model: str, store: str, folder: Path, flags: str, base: Path | None = None) -> Path:
    """The variant's stand-ins in `folder`, distilled there unless already done; with `base`, starting
    from base's finished layer-wise fit (which distill reuses)."""
    if base is not None and not (folder / "layerwise").exists():
        shutil.copytree(base / "layerwise", folder / "layerwise")
    if not (folder / "config.json").exists():
        cmd = [UNDERSTUDY, "distill", model, "--store", store, "--arch", "trunk", "--batch-tokens", "512"]
        cmd += ["--out", str(folder), *shlex.split(flags)]
        console.print("$ " + " ".join(cmd))
        if subprocess.run(cmd, check=False).returncode != 0:
            raise SystemExit(f"command failed: {' '.join(cmd)}")
    return folder


def main() -> None:
    args = parse_args()
    from moe_understudy.moe.loading import load_model_and_tokenizer
    from moe_understudy.understudy.io import load_understudies

    variants = dict(v.split("=", 1) for v in (args.variant or VARIANTS))
    for name in variants:  # NAME+e2e...: NAME's flags (NAME listed before it), then its own or E2E's
        if "+e2e" in name:
            variants[name] = f"{variants[_base(name)]} {variants[name] or E2E}"
    capacities = [float(c) for c in args.capacities.split(",")]
    t0 = time.time()
    work, folders = Path(args.work), {}
    for name, flags in variants.items():
        base = work / _base(name) if "+e2e" in name else None
        folders[name] = distilled(args.model, args.store, work / name, flags, base)
    model, _ = load_model_and_tokenizer(args.model)
    layer = find_moe_layers(model)[0]
    blocks = torch.load(Path(args.model) / "blocks.pt")["val"][: args.blocks]
    baseline = evaluate_policies(
        model, None, blocks, ["drop", "expanded_drop"], capacities, priority="score", num_devices=args.devices
    )
    rows = [{**r, "variant": r["policy"]} for r in baseline]
    for name, folder in folders.items():
        stand_ins = load_understudies(folder, model)
        report = json.loads((folder / "report.json").read_text())
        trunk = next(iter(stand_ins.values()))
        meta = {
            "variant": name,
            "flags": variants[name],
            "width": trunk.width,
            "adapter_rank": trunk.adapter_rank,
            "lone_assignment_flops_x_expert": trunk.flops_per_assignment() / layer.expert_flops_per_token(),
            "layerwise_val_rel_error": statistics.mean(m["val_rel_error"] for m in report["layers"].values()),
        }
        got = evaluate_policies(
            model, stand_ins, blocks, ["shadow"], capacities, priority="score", num_devices=args.devices
        )
        rows += [{**r, **meta} for r in got if r["policy"] == "shadow"]
    seconds = time.time() - t0

    table = Table(title=f"trunk variants, score priority, {len(blocks)} blocks, {args.devices} devices")
    for col in (
        "system",
        "memory",
        "FLOPs lone",
        "FLOPs/served cf1",
        "rel err",
        *[f"cf {c:g}" for c in capacities],
    ):
        table.add_column(col, justify="right")
    for name in ("drop", "expanded_drop", *folders):
        by_cf = {r["capacity_factor"]: r for r in rows if r["variant"] == name}
        first = by_cf[capacities[0]]
        lone = first.get("lone_assignment_flops_x_expert")
        table.add_row(
            name,
            f"{first['memory_expert_equiv']:.2f}",
            "-" if lone is None else f"{lone:.2f}",
            "-" if first["stand_in_cost_per_served"] is None else f"{first['stand_in_cost_per_served']:.2f}",
            "-" if lone is None else f"{first['layerwise_val_rel_error']:.4f}",
            *[f"{by_cf[c]['ppl_delta_pct']:+.2f}%" for c in capacities],
        )
    Console(width=160).print(table)
    path = write_result(
        args.name,
        {
            "model": args.model,
            "store": args.store,
            "variants": variants,
            "blocks": int(blocks.shape[0]),
            "devices": args.devices,
            "capacities": capacities,
            "seconds": round(seconds, 1),
            "rows": rows,
        },
    )
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
