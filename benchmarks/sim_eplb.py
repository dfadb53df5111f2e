"""EPLB against stand-ins under shifting load, 8-256 ranks, replayed from the fine-grained teacher's routing.

What it does (every part is in src/moe_understudy/sim/; see sim/study.py):
- captures the teacher's routing per layer on natural and prose blocks, fits the sibling expansion
  used where ranks exceed experts, and replays three scenarios (natural, domain shift mid-stream,
  hot-expert bursts) step by step through every system at equal memory per device, with capacity
  per rank and the routing exchange charged as the runtime's ledger charges it;
- `--quality`: measures `ppl_delta_pct` for the rows that change outputs, on the same teacher,
  policy and capacity (capacity per rank over R simulated devices in one process, a batch of the
  step's token count); the EPLB + stand-in rows with the stale placement itself; rows at more ranks
  than experts quote the largest device count the experts allow, and say so. Stand-in rows need a
  trained stand-in (`--stand-in DIR`); without one they stay None, never made up;
- `--measure-ep`: `understudy ep` at 2 and 4 gloo ranks (full; EPLB; EPLB + stand-in), one after the
  other in this run, wall time per step beside the simulated ratios at the same ranks.
Writes benchmarks/results/sim_eplb.json and sim_eplb.png.

Usage:
  python benchmarks/sim_eplb.py --model runs/teacher-fine [--stand-in DIR] [--quality] [--measure-ep]
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, write_result  # noqa: E402

from moe_understudy.config import SHIFT_SYSTEMS, ClusterCost, EPConfig, ShiftSimConfig  # noqa: E402
from moe_understudy.sim.study import EXACT, plot_study, run_study  # noqa: E402

console = Console()
EQUAL_QUALITY_CFS = (1.5, 2.0)  # expanded_drop at more capacity, to compare at equal quality


# ---- measured quality -------------------------------------------------------------------------------


def scenario_blocks(cfg: ShiftSimConfig, tokenizer):
    from moe_understudy.sim.study import study_blocks

    return study_blocks(cfg.model, tokenizer, cfg.max_blocks)


def measure_quality(
    cfg: ShiftSimConfig,
    payload: dict,
    model,
    tokenizer,
    understudies,
    devices: tuple[int, ...],
    source_names: tuple[str, ...],
) -> list[dict]:
    """Perplexity change of every non-exact system at `devices` (<= E), on the scenarios' token sources.

    One batch is one simulated step's tokens (devices x tokens_per_rank), capacity per rank over
    that many simulated devices, so overflow is decided as in the simulated step.
    """
    from moe_understudy.eval.quality import evaluate_policies
    from moe_understudy.runtime.placement import rebalance_from_window
    from moe_understudy.runtime.scenarios import hot_expert_bias
    from moe_understudy.sim.stream import StreamConfig, hot_experts

    natural, prose = scenario_blocks(cfg, tokenizer)
    E = payload["trace"]["experts"]
    n_nat = payload["trace"]["natural_blocks"] * payload["trace"]["block_size"]
    from moe_understudy.sim.traces import RoutingTrace

    trace = RoutingTrace.load(Path(cfg.out) / "trace.safetensors")
    natural_load = torch.stack([torch.bincount(i[:n_nat].reshape(-1), minlength=E) for i in trace.indices])
    burst = StreamConfig(
        "hot_burst", 1, 1, 1, 0, burst_every=cfg.burst_every, burst_len=cfg.burst_len, seed=cfg.seed
    )
    hot = hot_experts(burst.burst_every - 1, burst, trace.num_layers, E)
    from moe_understudy.moe.adapters import find_moe_layers

    layers = find_moe_layers(model)
    bias = {m.index: hot_expert_bias(E, int(hot[i]), cfg.burst_bias) for i, m in enumerate(layers)}
    systems = {s["name"]: s for s in payload["systems"]}
    measured = []
    for R in devices:
        batch = max(1, R * cfg.tokens_per_rank // natural.shape[1])
        blocks_n = max(batch, 32)
        sources = {"natural": (natural[:blocks_n], None), "prose": (prose[:blocks_n], None)}
        sources["burst"] = (natural[:blocks_n], bias)
        for name, (blocks, logit_bias) in sources.items():
            if name not in source_names:
                continue
            policies = ["drop", "expanded_drop"] + (["shadow"] if understudies else [])
            t0 = time.time()
            calls = [(policies, (cfg.capacity_factor,))]
            if R == E:  # expanded_drop at more capacity, for the comparison at equal quality
                calls.append((["expanded_drop"], EQUAL_QUALITY_CFS))
            for call_policies, cfs in calls:
                rows = evaluate_policies(
                    model,
                    understudies,
                    blocks,
                    call_policies,
                    cfs,
                    priority=cfg.priority,
                    batch_size=batch,
                    num_devices=R,
                    logit_bias=logit_bias,
                    runtime_options={"capacity_scope": "rank"},
                    progress=False,
                )
                for r in rows:
                    system = {
                        "drop": "drop",
                        "expanded_drop": "expanded_drop",
                        "shadow": "standin",
                        "full": "full",
                    }[r["policy"]]
                    if r["capacity_factor"] not in (None, cfg.capacity_factor):
                        system = f"{system}@{r['capacity_factor']:g}"
                    measured.append({"system": system, "devices": R, "source": name, **_keep(r)})
            if understudies and "eplb_stale_standin" in systems:
                extra = systems["eplb_stale_standin"]["extra_slots"]
                placement = rebalance_from_window(natural_load[None].double(), R, -(-E // R) + extra)
                rows = evaluate_policies(
                    model,
                    understudies,
                    blocks,
                    ["shadow"],
                    (cfg.capacity_factor,),
                    priority=cfg.priority,
                    batch_size=batch,
                    num_devices=R,
                    logit_bias=logit_bias,
                    runtime_options={"capacity_scope": "rank", "placement": placement},
                    progress=False,
                )
                for r in rows:
                    system = "full" if r["policy"] == "full" else "eplb_stale_standin"
                    measured.append(
                        {"system": system, "devices": R, "source": name, "placement": "stale", **_keep(r)}
                    )
            console.log(f"quality at {R} devices on {name}: {time.time() - t0:.0f} s")
    return measured


def _keep(r: dict) -> dict:
    keys = (
        "policy",
        "capacity_factor",
        "perplexity",
        "ppl_delta_pct",
        "frac_shadow",
        "frac_dropped",
        "frac_tokens_degraded",
        "rank_work_imbalance",
        "memory_expert_equiv",
        "batch_size",
        "positions",
    )
    return {k: r.get(k) for k in keys}


def fill_quality(payload: dict, measured: list[dict], cfg: ShiftSimConfig) -> None:
    """ppl_delta_pct of each simulated row from the measured runs, mixed as the scenario's tokens are mixed."""
    E = payload["trace"]["experts"]
    prose_share = {
        (s["scenario"], s["ranks"]): sum(s["prose_fraction"]) / len(s["prose_fraction"])
        for s in payload["series"]
    }
    burst_share = cfg.burst_len / cfg.burst_every

    def ppl(system: str, devices: int, source: str) -> float | None:
        for m in measured:
            if m["system"] == system and m["devices"] == devices and m["source"] == source:
                return m["perplexity"]
        return None

    def reference(system: str, devices: int, source: str) -> float | None:
        # the `full` run of the same evaluate call (placement runs carry their own)
        want = "stale" if system == "eplb_stale_standin" else None
        for m in measured:
            if (
                m["system"] == "full"
                and m["devices"] == devices
                and m["source"] == source
                and m.get("placement") == want
            ):
                return m["perplexity"]
        return None

    for row in payload["rows"]:
        if row["system"] in EXACT:
            continue
        devices = min(row["ranks"], E)
        mix = {
            "natural": {"natural": 1.0},
            "domain_shift": {
                "natural": 1 - prose_share[(row["scenario"], row["ranks"])],
                "prose": prose_share[(row["scenario"], row["ranks"])],
            },
            "hot_burst": {"natural": 1 - burst_share, "burst": burst_share},
        }[row["scenario"]]
        logs = []
        for source, share in mix.items():
            p, base = ppl(row["system"], devices, source), reference(row["system"], devices, source)
            if p is None or base is None:
                logs = None
                break
            logs.append((share, math.log(p), math.log(base)))
        if logs is None:
            continue
        mixed = sum(s * lp for s, lp, _ in logs) - sum(s * lb for s, _, lb in logs)
        row["ppl_delta_pct"] = 100.0 * (math.exp(mixed) - 1.0)
        where = f"measured at {devices} devices" + (
            "" if devices == row["ranks"] else f" (the most the {E} experts allow)"
        )
        row["quality_source"] = where + ", token mix " + ", ".join(f"{k} {v:.2f}" for k, v in mix.items())


# ---- measured expert parallelism ---------------------------------------------------------------------


def contention() -> dict:
    """What else ran on the machine: load average and the busiest other processes."""
    out = subprocess.run(
        ["ps", "-eo", "pcpu,args", "--sort=-pcpu"], capture_output=True, text=True, check=False
    )
    me = str(os.getpid())
    busy = [line.strip()[:120] for line in out.stdout.splitlines()[1:8] if me not in line]
    return {"loadavg": os.getloadavg(), "cpu_count": os.cpu_count(), "busiest_processes": busy}


def measure_ep(
    model: str,
    stand_in: str,
    budget: int,
    cf: float,
    priority: str,
    nprocs: tuple[int, ...],
    max_blocks: int,
    blocks_per_rank: int,
    out: Path,
) -> list[dict]:
    """full / EPLB / EPLB + stand-in under `understudy ep`, one launch each, back to back per rank count."""
    from moe_understudy.runtime.ep import launch_ep

    runs = []
    for n in nprocs:
        common = dict(
            model=model,
            priority=priority,
            max_blocks=max_blocks,
            blocks_per_rank=blocks_per_rank,
            backend="gloo",
            timeout_s=300.0,
        )
        launches = {
            "full": EPConfig(
                **common, policies=("full",), placement="contiguous", out=str(out / f"ep{n}-full")
            ),
            "eplb_stale": EPConfig(
                **common,
                policies=("full",),
                placement="replicate",
                extra_slots=budget,
                out=str(out / f"ep{n}-eplb"),
            ),
            "eplb_stale_standin": EPConfig(
                **common,
                policies=("shadow",),
                capacities=(cf,),
                placement="replicate",
                extra_slots=budget - 1,
                capacity_scope="rank",
                understudies=stand_in,
                out=str(out / f"ep{n}-eplb-standin"),
            ),
        }
        for system, ep_cfg in launches.items():
            before = contention()
            t0 = time.time()
            (summary,) = launch_ep(ep_cfg, n)
            runs.append(
                {
                    "system": system,
                    "ranks": n,
                    "launch_s": time.time() - t0,
                    "wall_s_per_step": summary["wall_s"] / summary["steps"],
                    "moe_s_per_step": (summary["comm_s"] + summary["compute_s"]) / summary["steps"],
                    "contention_before": before,
                    **{
                        k: summary[k]
                        for k in (
                            "steps",
                            "wall_s",
                            "comm_s",
                            "compute_s",
                            "a2a_bytes",
                            "exchange_bytes",
                            "total_bytes",
                            "rank_work_imbalance",
                            "memory_expert_equiv",
                            "perplexity",
                            "slots_per_rank",
                            "degraded_token_fraction",
                        )
                    },
                }
            )
            console.log(f"ep {n} ranks {system}: {runs[-1]['wall_s_per_step']:.3f} s/step")
    return runs


def untrained_stand_in(model_dir: str, out: Path) -> str:
    """A randomly initialised gated trunk (half an expert's FLOPs per lone assignment): timing only."""
    from moe_understudy.moe.adapters import find_moe_layers
    from moe_understudy.moe.loading import load_model_and_tokenizer
    from moe_understudy.understudy.io import save_understudies
    from moe_understudy.understudy.modules import build_understudy

    model, _ = load_model_and_tokenizer(model_dir)
    modules = {m.index: build_understudy("trunk", m, seed=0, init="random") for m in find_moe_layers(model)}
    return str(save_understudies(out, modules, model))


def simulate_small(
    base: ShiftSimConfig,
    nprocs: tuple[int, ...],
    blocks_per_rank: int,
    cost: ClusterCost,
    model,
    tokenizer,
    stand_in: str | None,
) -> dict:
    """The same three systems at the measured rank counts, prefill-shaped like `understudy ep`'s steps."""
    cfg = base.replace(
        ranks=nprocs,
        scenarios=("natural",),
        systems=("full", "eplb_stale", "eplb_stale_standin"),
        phase="prefill",
        tokens_per_rank=blocks_per_rank * 128,
        stand_in=stand_in,
        steps=16,
        warmup_steps=8,
        window=8,
        fresh_window=8,
        refresh_every=1000,
        memory_budget=1,
        cost=cost,
    )
    return run_study(cfg, console=console, model=model, tokenizer=tokenizer)


def calibrated_cost(ep_dir: Path, base: ClusterCost) -> dict:
    """A cost model fitted to the measured `full` EP run (this machine's gloo on CPU cores).

    throughput = the busiest rank's expert FLOPs per layer step, summed, over the measured compute
    time; bandwidth = the busiest rank's dispatch + combine bytes per layer step, summed, over the
    measured communication time (which also holds the exchange and planning: latency is folded into
    bandwidth, none is charged apart). One node: every byte at that bandwidth. The layer is the
    teacher's own (hidden size, expert width), so FLOPs and bytes are the run's.
    """
    import json

    data = json.loads((ep_dir / "ep.json").read_text())
    (records,) = data["records"].values()
    (summary,) = data["runs"]
    by: dict = {}
    for r in records:
        by.setdefault((r["step"], r["layer"]), []).append(r)
    flops = sum(max(r["work"] for r in rs) for rs in by.values())
    moved = sum(
        max(r["dispatch_send_bytes"] + r["dispatch_recv_bytes"] + r["combine_send_bytes"] for r in rs)
        for rs in by.values()
    )
    tflops = flops / max(summary["compute_s"], 1e-9) / 1e12
    gbps = moved / max(summary["comm_s"], 1e-9) / 1e9
    return {"device_tflops": tflops, "link_gbps": gbps, "nvlink_gbps": gbps, "latency_us": 0.0}


def ratios(rows: list[dict], key: str) -> dict:
    out = {}
    for R in sorted({r["ranks"] for r in rows}):
        mine = {r["system"]: r[key] for r in rows if r["ranks"] == R}
        out[R] = {s: mine["full"] / v for s, v in mine.items() if v}
    return out


# ---- targets -----------------------------------------------------------------------------------------


def targets(payload: dict, ranks: int = 64, scenario: str = "domain_shift") -> dict:
    by = {r["system"]: r for r in payload["rows"] if r["ranks"] == ranks and r["scenario"] == scenario}
    stale, mine = by.get("eplb_stale"), by.get("eplb_stale_standin")
    if not stale or not mine:
        return {"note": f"no eplb_stale / eplb_stale_standin rows at {ranks} ranks, {scenario}"}
    speedup = stale["step_ms_p50"] / mine["step_ms_p50"]
    ppl = mine["ppl_delta_pct"]
    series = next(x for x in payload["series"] if x["ranks"] == ranks and x["scenario"] == scenario)
    refresh_after = [r for r in series["stale_refreshes"] if r > 0]
    window = [
        i
        for i, (step, prose) in enumerate(zip(series["steps"], series["prose_fraction"], strict=True))
        if prose >= 0.999 and (not refresh_after or step < refresh_after[0])
    ]
    shifted = None
    if window:
        p50 = lambda name: float(torch.tensor([series["step_ms"][name][i] for i in window]).median())  # noqa: E731
        shifted = {
            "steps": [series["steps"][i] for i in window],
            "eplb_stale_p50": p50("eplb_stale"),
            "eplb_stale_standin_p50": p50("eplb_stale_standin"),
            "speedup": p50("eplb_stale") / p50("eplb_stale_standin"),
        }
    out = {
        "at": {"ranks": ranks, "scenario": scenario},
        "speedup_p50_vs_eplb_stale": speedup,
        "speedup_met": speedup >= 1.3,
        "speedup_p99_vs_eplb_stale": stale["step_ms_p99"] / mine["step_ms_p99"],
        "shifted_and_stale_steps": shifted,
        "ppl_delta_pct": ppl,
        "ppl_met": None if ppl is None else ppl <= 0.5,
        "memory": {
            "eplb_stale_standin": mine["memory_expert_equiv"],
            "eplb_stale": stale["memory_expert_equiv"],
        },
        "equal_memory_met": mine["memory_expert_equiv"] <= stale["memory_expert_equiv"] + 1e-9,
        "rank_work_imbalance": mine["rank_work_imbalance"],
        "imbalance_met": mine["rank_work_imbalance"] <= 0.05,
    }
    # expanded_drop at the smallest capacity whose quality is at least the stand-in's
    if ppl is not None:
        candidates = [
            r for n, r in by.items() if n.startswith("expanded_drop") and r["ppl_delta_pct"] is not None
        ]
        equal = sorted((r for r in candidates if r["ppl_delta_pct"] <= ppl), key=lambda r: r["step_ms_p50"])
        out["expanded_drop_at_equal_quality"] = (
            {
                "system": equal[0]["system"],
                "step_ms_p50": equal[0]["step_ms_p50"],
                "ppl_delta_pct": equal[0]["ppl_delta_pct"],
                "ahead": mine["step_ms_p50"] < equal[0]["step_ms_p50"],
            }
            if equal
            else {
                "note": "no expanded_drop capacity in the sweep reaches the stand-in's quality",
                "ahead": True,
            }
        )
    else:
        out["expanded_drop_at_equal_quality"] = {
            "note": "stand-in quality not measured (no --stand-in)",
            "ahead": None,
        }
    return out


def table(payload: dict, ranks: int) -> Table:
    t = Table(title=f"{ranks} ranks (simulated; ppl measured)")
    for c in (
        "scenario",
        "system",
        "p50 ms",
        "p99 ms",
        "imbalance",
        "GB/step",
        "memory",
        "stand-in",
        "dropped",
        "ppl",
    ):
        t.add_column(c, justify="left" if c in ("scenario", "system") else "right")
    for r in payload["rows"]:
        if r["ranks"] != ranks:
            continue
        t.add_row(
            r["scenario"],
            r["system"],
            f"{r['step_ms_p50']:.3f}",
            f"{r['step_ms_p99']:.3f}",
            f"{r['rank_work_imbalance']:.3f}",
            f"{r['total_bytes'] / 1e9:.3f}",
            f"{r['memory_expert_equiv']:.2f}",
            f"{r['frac_stand_in']:.1%}",
            f"{r['frac_dropped']:.1%}",
            "—" if r["ppl_delta_pct"] is None else f"{r['ppl_delta_pct']:+.2f}%",
        )
    return t


def simulate(cfg: ShiftSimConfig, model, tokenizer) -> dict:
    """The study, plus expanded_drop at more capacity at 64 ranks (the comparison at equal quality)."""
    payload = run_study(cfg, console=console, model=model, tokenizer=tokenizer)
    if 64 in cfg.ranks:
        more = run_study(
            cfg.replace(ranks=(64,), systems=tuple(f"expanded_drop@{cf:g}" for cf in EQUAL_QUALITY_CFS)),
            console=console,
            model=model,
            tokenizer=tokenizer,
        )
        payload["rows"] += more["rows"]
        for s, extra in zip((x for x in payload["series"] if x["ranks"] == 64), more["series"], strict=True):
            s["step_ms"].update(extra["step_ms"])
    return payload


def reuse(path: Path, cfg: ShiftSimConfig) -> dict:
    """The simulated part of an earlier run of this script (same study config but the stand-in folder)."""
    import json

    old = json.loads(path.read_text())
    mine = {
        k: v for k, v in json.loads(json.dumps(cfg.to_dict())).items() if k != "stand_in"
    }  # tuples as lists
    theirs = {k: v for k, v in old["config"].items() if k != "stand_in"}
    if mine != theirs:
        diff = sorted(k for k in mine if mine[k] != theirs.get(k))
        raise SystemExit(f"{path} was simulated with other settings ({', '.join(diff)}); simulate again.")
    keep = (
        "trace",
        "expansion",
        "expanded_stats",
        "stand_in",
        "systems",
        "config",
        "rows",
        "series",
        "sim_seconds",
    )
    payload = {k: old[k] for k in keep if k in old}
    payload["sim_from"] = {
        "path": str(path),
        "command": old.get("command"),
        "stand_in": old["config"]["stand_in"],
    }
    for row in payload["rows"]:
        if row["system"] not in EXACT:
            row["ppl_delta_pct"], row["quality_source"] = None, None
    return payload


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="runs/teacher-fine")
    ap.add_argument(
        "--stand-in", default=None, help="trained stand-in folder (its memory / FLOPs; its quality)"
    )
    ap.add_argument("--ranks", default="8,16,32,64,128,256")
    ap.add_argument("--scenarios", default="natural,domain_shift,hot_burst")
    defaults = ShiftSimConfig()
    ap.add_argument("--steps", type=int, default=defaults.steps)
    ap.add_argument(
        "--rank-step-budget",
        type=int,
        default=defaults.rank_step_budget,
        help="charge every k-th step so that ranks x charged steps <= this (0: every step)",
    )
    ap.add_argument("--capacity-factor", type=float, default=defaults.capacity_factor)
    ap.add_argument("--memory-budget", type=int, default=2)
    ap.add_argument("--tokens-per-rank", type=int, default=defaults.tokens_per_rank)
    ap.add_argument("--quality", action="store_true")
    ap.add_argument(
        "--quality-devices", default="64", help="simulated devices of the measured runs (<= experts)"
    )
    ap.add_argument(
        "--quality-sources", default="natural,prose", help="natural, prose, burst (biased natural)"
    )
    ap.add_argument("--measure-ep", action="store_true")
    ap.add_argument("--ep-ranks", default="2,4")
    ap.add_argument("--ep-blocks", type=int, default=64)
    ap.add_argument("--ep-blocks-per-rank", type=int, default=4)
    ap.add_argument("--out", default="runs/sim_eplb")
    ap.add_argument("--name", default="sim_eplb")
    ap.add_argument("--sim-from", default=None, help="reuse the simulated rows of an earlier results JSON")
    args = ap.parse_args()
    cfg = ShiftSimConfig(
        model=args.model,
        stand_in=args.stand_in,
        ranks=tuple(int(r) for r in args.ranks.split(",")),
        scenarios=tuple(args.scenarios.split(",")),
        systems=SHIFT_SYSTEMS,
        steps=args.steps,
        rank_step_budget=args.rank_step_budget,
        capacity_factor=args.capacity_factor,
        memory_budget=args.memory_budget,
        tokens_per_rank=args.tokens_per_rank,
        out=args.out,
    )
    from moe_understudy.moe.loading import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(cfg.model)
    t0 = time.time()
    if args.sim_from:
        payload = reuse(Path(args.sim_from), cfg)
    else:
        payload = simulate(cfg, model, tokenizer)
        payload["sim_seconds"] = time.time() - t0
    # expanded_drop at more capacity, for the comparison at equal quality
    if args.quality:
        understudies = None
        if args.stand_in:
            from moe_understudy.understudy.io import load_understudies

            understudies = load_understudies(args.stand_in, model)
        t0 = time.time()
        torch.set_num_threads(2)
        payload["quality_runs"] = measure_quality(
            cfg,
            payload,
            model,
            tokenizer,
            understudies,
            tuple(int(r) for r in args.quality_devices.split(",")),
            tuple(args.quality_sources.split(",")),
        )
        payload["quality_seconds"] = time.time() - t0
        fill_quality(payload, payload["quality_runs"], cfg)
    if args.measure_ep:
        nprocs = tuple(int(n) for n in args.ep_ranks.split(","))
        stand_in = args.stand_in or untrained_stand_in(cfg.model, Path(args.out) / "untrained-trunk")
        ep = measure_ep(
            cfg.model,
            stand_in,
            1,
            cfg.capacity_factor,
            cfg.priority,
            nprocs,
            args.ep_blocks,
            args.ep_blocks_per_rank,
            Path(args.out),
        )
        sim = simulate_small(cfg, nprocs, args.ep_blocks_per_rank, cfg.cost, model, tokenizer, stand_in)
        from moe_understudy.moe.adapters import find_moe_layers

        moe = find_moe_layers(model)[0]
        calibrated = {}
        for n in nprocs:
            fit = calibrated_cost(Path(args.out) / f"ep{n}-full", cfg.cost)
            cpu = cfg.cost.replace(
                hidden_size=moe.hidden_size,
                expert_intermediate=moe.expert_intermediate_size,
                dtype_bytes=4,
                ranks_per_node=n,
                **fit,
            )
            small = simulate_small(
                cfg.replace(ranks=(n,)), (n,), args.ep_blocks_per_rank, cpu, model, tokenizer, stand_in
            )
            calibrated[n] = {"cost": cpu.to_dict(), "rows": small["rows"]}
        payload["measured_ep"] = {
            "note": (
                "gloo on this machine's 2 shared CPU cores, not the H200 cost model: compare ratios "
                "(full / system), not times. Wall time includes attention and the LM head; MoE time "
                "is the EP backend's own comm + compute clocks. EPLB = replicate placement calibrated "
                "on 32 train blocks (another window), memory budget 1 (EPLB +1 slot; EPLB +0 slots + "
                "stand-in, capacity per rank)."
                + ("" if args.stand_in else " The stand-in is an untrained gated trunk: timing only.")
            ),
            "stand_in": stand_in,
            "runs": ep,
            "measured_speedup_vs_full_wall": ratios(ep, "wall_s_per_step"),
            "measured_speedup_vs_full_moe": ratios(ep, "moe_s_per_step"),
            "simulated_speedup_vs_full_p50": ratios(sim["rows"], "step_ms_p50"),
            "simulated_rows": sim["rows"],
            "calibrated_speedup_vs_full_p50": {
                n: ratios(c["rows"], "step_ms_p50")[n] for n, c in calibrated.items()
            },
            "calibrated": calibrated,
        }
    payload["targets"] = targets(payload)
    for R in (64,):
        console.print(table(payload, R))
    console.print(payload["targets"])
    plot_study(payload, RESULTS / f"{args.name}.png", ranks=64 if 64 in cfg.ranks else cfg.ranks[-1])
    payload.pop("series_full", None)
    path = write_result(
        args.name,
        {
            "what": __doc__.splitlines()[0],
            "note": "Step times are simulated from the cost model (ClusterCost, sources in config.py and README); "
            "ppl_delta_pct is measured (see quality_source), None where it was not.",
            **payload,
        },
    )
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
