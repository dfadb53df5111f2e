"""Quality under load on natural held-out text: every overflow policy side by side.

Capacity factors 0.5 / 0.75 / 1.0 / 1.25, priority position, per-step capacity over a batch of
8 x 128 tokens. Systems: full, drop, drop_renorm, reroute (no understudy needed), then for each
understudy set: understudy (with and without readmission), layer, deadline; shadow when a shadows
set is given. Every system runs on the same batches in the same process and is compared with
`full` on the same tokens.

Understudies come from `understudy distill` folders (--understudies, repeatable; each set's cost
= understudy FLOPs / active routed-expert FLOPs is reported). Without --understudies the script
makes dense sets itself through the library's own capture + distill workflows (cached in --work).

    .venv/bin/python benchmarks/quality_under_load.py --model runs/teacher
    .venv/bin/python benchmarks/quality_under_load.py --model runs/teacher --scenario domain_shift
    .venv/bin/python benchmarks/quality_under_load.py --model runs/teacher --scenario hot_expert
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, write_result  # noqa: E402

from moe_understudy.eval.quality import evaluate_policies, understudy_cost  # noqa: E402
from moe_understudy.moe.adapters import find_moe_layers  # noqa: E402
from moe_understudy.report import plot_quality_vs_bytes, print_table  # noqa: E402
from moe_understudy.runtime.scenarios import domain_shift_blocks, hot_expert_bias, natural_blocks  # noqa: E402

NAME = "quality_under_load"
SCENARIO_NOTES = {
    "natural": "Held-out blocks cached with the teacher (validation split of its corpus).",
    "domain_shift": "English prose (IDLE docs, licence, e-mail test data) unlike the code the teacher and the "
    "understudies were trained on.",
    "hot_expert": "The router logit bias is applied inside every layer's router, for every system including full; "
    "deltas are against the biased full model. Understudies stand in for the unbiased layer (they never see the "
    "bias), so for understudy tokens they undo the perturbation: perplexity can fall below the biased full model "
    "while KL to it is large. Read KL and agreement here, not the perplexity delta.",
}
console = Console(stderr=True)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="runs/teacher", help="saved teacher folder")
    p.add_argument("--understudies", action="append", default=[], help="understudy folder (repeatable)")
    p.add_argument("--shadows", default=None, help="shadows folder (`understudy distill --arch shadows`)")
    p.add_argument(
        "--intermediate", default="128,256,512", help="auto-distilled dense sets: intermediate sizes"
    )
    p.add_argument(
        "--shadow-width", type=int, default=128, help="auto-fitted shadows: per-expert width (0 = none)"
    )
    p.add_argument("--distill-steps", type=int, default=1500, help="auto-distill: layer-wise steps per layer")
    p.add_argument(
        "--capture-tokens", type=int, default=131_072, help="auto-distill: captured training tokens"
    )
    p.add_argument("--work", default="runs/bench-quality", help="cache folder for auto capture/distill")
    p.add_argument("--capacities", default="0.5,0.75,1,1.25")
    p.add_argument("--blocks", type=int, default=128, help="held-out blocks evaluated")
    p.add_argument("--batch-size", type=int, default=8, help="blocks per step (capacity is per step)")
    p.add_argument("--devices", type=int, default=4, help="devices for all-to-all byte counting")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--scenario", default="natural", choices=["natural", "domain_shift", "hot_expert"])
    p.add_argument(
        "--hot-expert", type=int, default=0, help="hot_expert scenario: expert raised in every layer"
    )
    p.add_argument("--hot-bias", type=float, default=2.0, help="hot_expert scenario: router logit bias")
    p.add_argument("--name", default=None, help="result name under benchmarks/results (default by scenario)")
    return p.parse_args()


def auto_understudies(
    model_dir: str, work: Path, intermediates: list[int], steps: int, tokens: int, shadow_width: int = 0
) -> tuple[list[str], str | None]:
    """Dense understudy sets (and a shadows set when `shadow_width`) fitted layer-wise with MSE on a
    capture store, by the library's pieces (cached in `work`)."""
    from moe_understudy.capture import CaptureStore, default_data_config, run_capture
    from moe_understudy.config import CaptureConfig
    from moe_understudy.moe.loading import load_model_and_tokenizer
    from moe_understudy.understudy.io import save_understudies
    from moe_understudy.understudy.layerwise import fit_layer
    from moe_understudy.understudy.modules import build_understudy

    store_dir = work / "store"
    if not (store_dir / "manifest.json").exists():
        cfg = CaptureConfig(
            model=model_dir, out=str(store_dir), data=default_data_config(model_dir), tokens=tokens
        )
        run_capture(cfg, console=console)
    store = CaptureStore(store_dir)
    model, _ = load_model_and_tokenizer(model_dir)

    def fitted(name: str, arch: str, **kw) -> str:
        folder = work / name
        if not (folder / "config.json").exists():
            sets = {}
            for layer in find_moe_layers(model):
                module = build_understudy(arch, layer, seed=layer.index, **kw)
                with console.status(f"layer-wise MSE fit: {name}, layer {layer.index}"):
                    fit = fit_layer(
                        module, store.load(layer.index, "train"), store.load(layer.index, "val"), steps=steps
                    )
                console.print(
                    f"{name} layer {layer.index}: held-out rel. error {fit.val_error:.4f} after {fit.steps} steps"
                )
                sets[layer.index] = module.eval()
            save_understudies(folder, sets, model)
        return str(folder)

    dense = [fitted(f"dense-{inter}", "dense", intermediate=inter) for inter in intermediates]
    shadows = fitted(f"shadows-{shadow_width}", "shadows", width=shadow_width) if shadow_width > 0 else None
    return dense, shadows


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    from moe_understudy.moe.loading import load_model_and_tokenizer
    from moe_understudy.understudy.io import load_understudies

    capacities = [float(c) for c in args.capacities.split(",")]
    model, tokenizer = load_model_and_tokenizer(args.model)
    layers = find_moe_layers(model)
    from moe_understudy.capture import default_data_config

    data = default_data_config(args.model)
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
    sets, shadows = args.understudies, args.shadows
    if not sets:
        sets, auto_shadows = auto_understudies(
            args.model,
            Path(args.work),
            [int(i) for i in args.intermediate.split(",")],
            args.distill_steps,
            args.capture_tokens,
            0 if shadows else args.shadow_width,
        )
        shadows = shadows or auto_shadows
    common = dict(batch_size=args.batch_size, num_devices=args.devices, priority="position", logit_bias=bias)
    t0 = time.time()
    rows = evaluate_policies(model, None, blocks, ["drop", "drop_renorm", "reroute"], capacities, **common)
    for folder in sets:
        us = load_understudies(folder, model)
        cost = understudy_cost(model, us)
        tag = f"cost {cost:.2f}, {Path(folder).name}"  # the name keeps two sets of one cost apart
        for policy, options in (("understudy", {}), ("layer", {}), ("deadline", {})):
            got = evaluate_policies(
                model, us, blocks, [policy], capacities, runtime_options=options, **common
            )
            rows += [
                {**r, "policy": f"{policy} ({tag})", "base_policy": policy, "understudies": folder}
                for r in got[1:]
            ]
        got = evaluate_policies(
            model, us, blocks, ["understudy"], capacities, runtime_options={"readmit": False}, **common
        )
        rows += [
            {
                **r,
                "policy": f"understudy no-readmit ({tag})",
                "base_policy": "understudy",
                "readmit": False,
                "understudies": folder,
            }
            for r in got[1:]
        ]
    if shadows:
        sh = load_understudies(shadows, model)
        got = evaluate_policies(model, sh, blocks, ["shadow"], capacities, **common)
        cost = understudy_cost(model, sh)
        rows += [
            {
                **r,
                "policy": f"shadow (cost {cost:.2f})",
                "base_policy": "shadow",
                "understudies": shadows,
            }
            for r in got[1:]
        ]
    seconds = time.time() - t0
    for r in rows:
        r.setdefault("base_policy", r["policy"])

    print_table(
        rows,
        Console(),
        title=f"quality under load: {text}, {len(blocks)} blocks, batch {args.batch_size} x {blocks.shape[1]}",
    )
    png = plot_quality_vs_bytes(rows, RESULTS / f"{name}.png", title=f"quality under load, {text}")
    targets = check_targets(rows, capacities)
    for line in targets["summary"]:
        console.print(line)
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
            "blocks": int(blocks.shape[0]),
            "block_size": int(blocks.shape[1]),
            "batch_size": args.batch_size,
            "priority": "position",
            "capacities": capacities,
            "understudy_sets": sets,
            "shadows": shadows,
            "seconds": round(seconds, 1),
            "notes": "Capacity ceil(cf*T*k/E) per layer and step of batch_size x block_size tokens; every system "
            "compared with full on the same batches in one run. bytes_per_token: dispatch + combine over "
            f"{args.devices} devices (contiguous experts and tokens), summed over MoE layers, fp32 hidden.",
            "scenario_note": SCENARIO_NOTES[args.scenario],
            "targets": targets,
            "plot": str(png),
            "rows": rows,
        },
    )
    console.print(f"wrote {path} and {png}")


def check_targets(rows: list[dict], capacities: list[float]) -> dict:
    """Issue targets: understudy within +1% of full at cf 1, +3% at 0.5; ahead of drop and reroute everywhere."""

    def delta(policy: str, cf: float) -> float | None:
        got = [r["ppl_delta_pct"] for r in rows if r["policy"] == policy and r["capacity_factor"] == cf]
        return got[0] if got else None

    out: dict = {"summary": [], "sets": {}}
    for policy in sorted({r["policy"] for r in rows if r["policy"].startswith("understudy (")}):
        at1, at05 = delta(policy, 1.0), delta(policy, 0.5)
        ahead = all(
            delta(policy, cf) is not None and delta(policy, cf) < min(delta("drop", cf), delta("reroute", cf))
            for cf in capacities
        )
        res = {
            "cf1_delta_pct": at1,
            "cf1_within_1pct": at1 is not None and at1 <= 1.0,
            "cf05_delta_pct": at05,
            "cf05_within_3pct": at05 is not None and at05 <= 3.0,
            "ahead_of_drop_and_reroute_everywhere": ahead,
        }
        out["sets"][policy] = res
        out["summary"].append(
            f"{policy}: cf1 {at1:+.2f}% (target <= +1%: {'met' if res['cf1_within_1pct'] else 'missed'}), "
            f"cf0.5 {at05:+.2f}% (target <= +3%: {'met' if res['cf05_within_3pct'] else 'missed'}), "
            f"ahead of drop & reroute at every cf: {'yes' if ahead else 'no'}"
        )
    return out


if __name__ == "__main__":
    main()
