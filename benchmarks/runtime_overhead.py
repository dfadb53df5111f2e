"""Runtime overhead of the load-aware layer, measured side by side in one process.

1. Whole-model forward: unpatched transformers model vs patched with policy `full` (no recorder,
   the production path) vs patched `full` with a LoadRecorder, and the understudy policy at cf 1.0.
   Target: patched `full` at most 1.05x unpatched.
2. Per MoE layer and token: the routed-expert call of the block (router choice given) vs the
   understudy path the runtime takes for understudy tokens (gather, understudy, scatter-add), for
   dense understudies at several costs. Target: understudy path at most 1/4 of the routed-expert
   time per token.
3. Per MoE layer and served assignment: the assignment-level stand-in path (the core's
   `stand_in_output` on the assignments that overflow under score-priority drop at cf 1.0) vs the
   routed experts per assignment, for the gated trunk (plain, and with per-expert adapters of
   --adapter-rank) and for narrow per-expert shadows of about the same memory. Target: time share at most 1.2x the FLOP share (stand-in FLOPs per served assignment /
   one expert's).
Timings interleave the compared systems rep by rep and report medians, so CPU contention from other
processes affects all of them alike (the machine is shared; ratios are the meaningful figures).

    .venv/bin/python benchmarks/runtime_overhead.py --model runs/teacher
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result  # noqa: E402

from moe_understudy.moe.adapters import find_moe_layers  # noqa: E402
from moe_understudy.runtime.core import stand_in_output  # noqa: E402
from moe_understudy.runtime.layer import patch, unpatch  # noqa: E402
from moe_understudy.runtime.ledger import LoadRecorder  # noqa: E402
from moe_understudy.runtime.policies import expert_capacity, plan_routing  # noqa: E402
from moe_understudy.understudy.modules import build_understudy, cost_ratio  # noqa: E402
from moe_understudy.understudy.quantize import quantize_  # noqa: E402

NAME = "runtime_overhead"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="runs/teacher")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--reps", type=int, default=30, help="timed repetitions per system (after warm-up)")
    p.add_argument("--intermediate", default="128,256,512", help="dense understudy sizes timed in part 2")
    p.add_argument(
        "--shadow-width", type=int, default=32, help="narrow shadows timed in part 3 (8 x 32 = one expert)"
    )
    p.add_argument(
        "--adapter-rank",
        type=int,
        default=24,
        help="part 3 also times the trunk with per-expert adapters of this rank (0: not)",
    )
    p.add_argument(
        "--trunk-width",
        type=int,
        default=None,
        help="time the trunks at this width (default: the widest within half an expert per lone assignment)",
    )
    p.add_argument(
        "--int8",
        action="store_true",
        help="part 3 also times the no-FiLM trunk stored in int8 (`understudy quantize`), dequantized per call",
    )
    p.add_argument(
        "--width-per-pair",
        type=int,
        default=0,
        help="part 3 also times the no-FiLM trunk on a width ladder of this many units per served pair",
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default=NAME)
    return p.parse_args()


def interleaved(fns: dict[str, callable], reps: int, warmup: int = 3) -> dict[str, float]:
    """Median seconds per call of each fn, timed in round-robin so contention hits all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


@torch.no_grad()
def model_forward(model, blocks, reps: int, understudies) -> dict[str, float]:
    ids = blocks
    handle = patch(model, understudies, policy="full")
    layers = handle.layers

    def unpatched():
        for w in layers:
            w.moe.restore()
        model(input_ids=ids)
        for w in layers:
            w.moe.replace(w)

    def set_cfg(policy, recorder):
        def run():
            handle.configure(policy=policy, capacity_factor=1.0, recorder=recorder)
            model(input_ids=ids)

        return run

    fns = {
        "unpatched": unpatched,
        "patched full": set_cfg("full", None),
        "patched full + recorder": set_cfg("full", LoadRecorder()),
        "understudy cf 1.0 + recorder": set_cfg("understudy", LoadRecorder()),
        "drop cf 1.0 + recorder": set_cfg("drop", LoadRecorder()),
    }
    out = interleaved(fns, reps)
    unpatch(model)
    return out


@torch.no_grad()
def layer_parts(model, blocks, reps: int, intermediates: list[int]) -> list[dict]:
    """Per layer: routed-expert time per token vs the understudy path per token, on the layer's real input."""
    layers = find_moe_layers(model)
    inputs: dict[int, torch.Tensor] = {}
    hooks = [
        m.block.register_forward_pre_hook(
            lambda mod, args, L=m.index: inputs.__setitem__(L, args[0].reshape(-1, args[0].shape[-1]))
        )
        for m in layers
    ]
    model(input_ids=blocks)
    for h in hooks:
        h.remove()
    rows = []
    for moe in layers:
        x = inputs[moe.index]
        r = moe.route(x)
        T = x.shape[0]
        # The understudy serves the overflow tokens; time it on half the batch, a typical share at cf 1.
        tokens = torch.arange(0, T, 2)
        fns = {
            "experts": lambda x=x, r=r, moe=moe: moe.experts(x, r.indices, r.weights),
            "router": lambda x=x, moe=moe: moe.route(x),
        }
        modules = {}
        for inter in intermediates:
            u = build_understudy("dense", moe, seed=0, intermediate=inter).eval()
            modules[inter] = u
            fns[f"understudy {inter}"] = lambda u=u, x=x, tokens=tokens: torch.zeros_like(x).index_add(
                0, tokens, u(x[tokens])
            )
            gathered = x[tokens]
            fns[f"compute {inter}"] = lambda u=u, g=gathered: u(g)
        t = interleaved(fns, reps)
        per_tok_experts = t["experts"] / T
        for inter, u in modules.items():
            per_tok_u = t[f"understudy {inter}"] / len(tokens)
            rows.append(
                {
                    "layer": moe.index,
                    "tokens": T,
                    "understudy_tokens": len(tokens),
                    "understudy_intermediate": inter,
                    "flops_cost": round(cost_ratio(u, moe), 4),
                    "experts_us_per_token": 1e6 * per_tok_experts,
                    "understudy_us_per_token": 1e6 * per_tok_u,
                    "understudy_compute_only_us_per_token": 1e6 * t[f"compute {inter}"] / len(tokens),
                    "router_us_per_token": 1e6 * t["router"] / T,
                    "time_ratio": per_tok_u / per_tok_experts,
                }
            )
    return rows


@torch.no_grad()
def assignment_parts(
    model,
    blocks,
    reps: int,
    shadow_width: int,
    adapter_rank: int = 0,
    trunk_width: int | None = None,
    int8: bool = False,
    width_per_pair: int = 0,
) -> list[dict]:
    """Per layer: the assignment-level stand-in path per served assignment vs the experts per assignment."""
    layers = find_moe_layers(model)
    inputs: dict[int, torch.Tensor] = {}
    hooks = [
        m.block.register_forward_pre_hook(
            lambda mod, args, L=m.index: inputs.__setitem__(L, args[0].reshape(-1, args[0].shape[-1]))
        )
        for m in layers
    ]
    model(input_ids=blocks)
    for h in hooks:
        h.remove()
    rows = []
    for moe in layers:
        x = inputs[moe.index]
        r = moe.route(x)
        T, k = r.indices.shape
        plan = plan_routing(r, "shadow", expert_capacity(T, k, moe.num_experts, 1.0), "score")
        served = int(plan.shadow_served.sum())
        width = {} if trunk_width is None else {"width": trunk_width}
        stand_ins = {
            "trunk": build_understudy("trunk", moe, seed=0, init="random", **width).eval(),
            "trunk no-FiLM": build_understudy(
                "trunk", moe, seed=0, init="random", **width, film=False
            ).eval(),
            **(
                {
                    f"trunk a{adapter_rank}": build_understudy(
                        "trunk", moe, seed=0, init="random", **width, adapter_rank=adapter_rank
                    ).eval(),
                    f"trunk a{adapter_rank} no-FiLM": build_understudy(
                        "trunk", moe, seed=0, init="random", **width, adapter_rank=adapter_rank, film=False
                    ).eval(),
                }
                if adapter_rank
                else {}
            ),
            f"shadows w{shadow_width}": build_understudy(
                "shadows", moe, seed=0, width=shadow_width, init="random"
            ).eval(),
        }
        if width_per_pair:
            stand_ins[f"trunk no-FiLM ladder {width_per_pair}"] = build_understudy(
                "trunk", moe, seed=0, init="random", **width, film=False, width_per_pair=width_per_pair
            ).eval()
        if int8:
            for name in [n for n in stand_ins if n.startswith("trunk no-FiLM")]:
                stand_ins[f"{name} int8"] = quantize_(copy.deepcopy(stand_ins[name]))
        fns = {"experts": lambda x=x, r=r, moe=moe: moe.experts(x, r.indices, r.weights)}
        for name, s in stand_ins.items():
            fns[name] = lambda s=s, x=x, plan=plan, E=moe.num_experts: stand_in_output(x, plan, s, E)
        t = interleaved(fns, reps)
        per_assignment_experts = t["experts"] / (T * k)
        for name, s in stand_ins.items():
            flops = float(s.token_flops(plan.shadow_served, plan.indices).sum()) / max(served, 1)
            flop_share = flops / moe.expert_flops_per_token()
            time_share = (t[name] / max(served, 1)) / per_assignment_experts
            rows.append(
                {
                    "layer": moe.index,
                    "stand_in": name,
                    "served_assignments": served,
                    "assignments": T * k,
                    "memory_expert_equiv": round(s.memory_expert_equiv(moe.expert_params()), 4),
                    "flop_share_per_served": round(flop_share, 4),
                    "time_share_per_served": round(time_share, 4),
                    "time_over_flop_share": round(time_share / flop_share, 3),
                    "experts_us_per_assignment": 1e6 * per_assignment_experts,
                    "stand_in_us_per_served": 1e6 * t[name] / max(served, 1),
                }
            )
    return rows


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    from moe_understudy.moe.loading import load_model_and_tokenizer

    console = Console(width=140)
    model, _ = load_model_and_tokenizer(args.model)
    blocks = torch.load(Path(args.model) / "blocks.pt")["val"][: args.batch_size]
    inter = [int(i) for i in args.intermediate.split(",")]
    us = {
        m.index: build_understudy("dense", m, seed=0, intermediate=inter[len(inter) // 2]).eval()
        for m in find_moe_layers(model)
    }

    forward = model_forward(model, blocks, args.reps, us)
    base = forward["unpatched"]
    t1 = Table(title=f"whole-model forward, batch {tuple(blocks.shape)}, median of {args.reps}")
    for c in ("system", "ms", "x unpatched"):
        t1.add_column(c, justify="right" if c != "system" else "left")
    for k, v in forward.items():
        t1.add_row(k, f"{1e3 * v:.2f}", f"{v / base:.3f}")
    console.print(t1)

    parts = layer_parts(model, blocks, args.reps, inter)
    t2 = Table(title="per MoE layer and token: understudy path vs routed experts")
    for c in (
        "layer",
        "understudy I",
        "FLOPs cost",
        "experts µs/tok",
        "understudy path µs/tok",
        "compute only",
        "time ratio",
    ):
        t2.add_column(c, justify="right")
    for r in parts:
        t2.add_row(
            str(r["layer"]),
            str(r["understudy_intermediate"]),
            f"{r['flops_cost']:.2f}",
            f"{r['experts_us_per_token']:.2f}",
            f"{r['understudy_us_per_token']:.2f}",
            f"{r['understudy_compute_only_us_per_token']:.2f}",
            f"{r['time_ratio']:.3f}",
        )
    console.print(t2)
    assigned = assignment_parts(
        model,
        blocks,
        args.reps,
        args.shadow_width,
        args.adapter_rank,
        args.trunk_width,
        args.int8,
        args.width_per_pair,
    )
    t3 = Table(
        title="per MoE layer and served assignment: assignment-level stand-in vs routed experts (cf 1.0, score)"
    )
    for c in ("layer", "stand-in", "memory", "served", "FLOP share", "time share", "time / FLOP share"):
        t3.add_column(c, justify="right")
    for r in assigned:
        t3.add_row(
            str(r["layer"]),
            r["stand_in"],
            f"{r['memory_expert_equiv']:.2f}",
            f"{r['served_assignments']}/{r['assignments']}",
            f"{r['flop_share_per_served']:.3f}",
            f"{r['time_share_per_served']:.3f}",
            f"{r['time_over_flop_share']:.2f}",
        )
    console.print(t3)
    by_cost = {}
    for r in parts:
        by_cost.setdefault(r["understudy_intermediate"], []).append(r["time_ratio"])
    summary = {
        "patched_full_over_unpatched": forward["patched full"] / base,
        "patched_full_within_1_05": forward["patched full"] / base <= 1.05,
        "understudy_time_ratio_mean_by_intermediate": {k: statistics.mean(v) for k, v in by_cost.items()},
        "understudy_within_quarter_by_intermediate": {
            k: statistics.mean(v) <= 0.25 for k, v in by_cost.items()
        },
        "assignment_time_over_flop_share": {
            name: statistics.mean(r["time_over_flop_share"] for r in assigned if r["stand_in"] == name)
            for name in dict.fromkeys(r["stand_in"] for r in assigned)
        },
    }
    summary["assignment_within_1_2x_flop_share"] = {
        k: v <= 1.2 for k, v in summary["assignment_time_over_flop_share"].items()
    }
    console.print(summary)
    path = write_result(
        args.name,
        {
            "model": args.model,
            "batch": list(blocks.shape),
            "reps": args.reps,
            "notes": "CPU shared with other processes during the run; systems interleaved rep by rep and medians "
            "taken, so ratios measured in this run are comparable. Understudy weights are untrained (timing only). "
            "Understudy path = gather the understudy tokens, run the understudy, scatter-add (half the batch's tokens).",
            "forward_seconds": forward,
            "layer_parts": parts,
            "assignment_parts": assigned,
            "summary": summary,
        },
    )
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
