"""`understudy simulate`: get a routing trace, replay it over every cluster size, report.

Writes into `SimConfig.out`: sim.json (every policy x cluster size, the trace source and the cost
model), sim.png (step time and bytes on the wire against R), sim.yaml (the config), and
trace.safetensors (the trace replayed, so a run can be repeated with `--trace`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from moe_understudy.config import SimConfig
from moe_understudy.errors import UserError
from moe_understudy.sim.simulator import PLAN_OF, SimResult, simulate_cluster
from moe_understudy.sim.traces import RoutingTrace, capture_trace, synthetic_trace

# Policies whose outputs equal the full model's (they only move work or data).
EXACT = ("full", "replication", "speculative")


def load_trace(cfg: SimConfig, console: Console) -> RoutingTrace:
    """The trace to replay: a saved one, one captured from `cfg.model`, or a synthetic Zipf trace."""
    if cfg.trace:
        return RoutingTrace.load(cfg.trace)
    if cfg.model:
        from moe_understudy.moe.loading import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(cfg.model, cfg.device, cfg.dtype)
        blocks = eval_blocks(cfg.model, tokenizer, cfg)
        with console.status(f"capturing routing of {len(blocks)} blocks"):
            return capture_trace(model, blocks, batch_size=8, source=str(cfg.model))
    return synthetic_trace(cfg.synthetic_layers, 16384, cfg.synthetic_experts, cfg.top_k, cfg.zipf, cfg.seed)


def eval_blocks(model_dir: str | Path, tokenizer, cfg: Any) -> torch.Tensor:
    """(N, S) held-out blocks: `cfg.data` when given, else the model's own (data/heldout.py)."""
    from moe_understudy.data.heldout import model_blocks

    return model_blocks(model_dir, cfg.data, tokenizer, cfg.max_blocks)


def quality_lookup(path: str | Path, policy: str, capacity_factor: float) -> str:
    """Measured quality of `policy` at `capacity_factor` from the quality-under-load JSON, or "n/a".

    Exact policies (full, replication, speculative) change no output, so they read "exact".
    Otherwise any record in the file with `policy`, a capacity factor and a relative perplexity
    change is accepted (the file is written by the runtime benchmark).
    """
    if policy in EXACT:
        return "exact"
    p = Path(path)
    if not p.is_file():
        return "n/a"
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError:
        return "n/a"
    want = PLAN_OF[policy]
    for rec in _records(data):
        cf = rec.get("capacity_factor", rec.get("cf", rec.get("capacity")))
        if (
            rec.get("policy") != want
            or not isinstance(cf, (int, float))
            or not math.isclose(cf, capacity_factor)
        ):
            continue
        for key, value in rec.items():
            k = key.lower()
            if ("ppl" in k or "perplexity" in k) and any(w in k for w in ("delta", "increase", "rel", "pct")):
                if isinstance(value, (int, float)):
                    pct = value if "pct" in k or abs(value) > 5 else 100 * value
                    return f"{pct:+.1f}% ppl"
    return "n/a"


def _records(node: Any):
    if isinstance(node, dict):
        if "policy" in node:
            yield node
        for v in node.values():
            yield from _records(v)
    elif isinstance(node, list):
        for v in node:
            yield from _records(v)


def run_simulation(cfg: SimConfig, console: Console | None = None) -> dict:
    """Simulate every policy over every cluster size; write sim.json / sim.png / sim.yaml; return the payload."""
    console = console or Console(stderr=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the simulator is many small ops; threads only contend
    try:
        return _simulate(cfg, console)
    finally:
        torch.set_num_threads(threads)


def _simulate(cfg: SimConfig, console: Console) -> dict:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    trace = load_trace(cfg, console)
    if trace.num_tokens < 64:
        raise UserError(
            f"The routing trace holds only {trace.num_tokens} tokens (64 needed); give --data more text, "
            "raise max_blocks in a --config YAML, or replay a longer --trace."
        )
    trace.save(out / "trace.safetensors")
    results: list[SimResult] = []
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("simulating", total=len(cfg.ranks))
        for R in cfg.ranks:
            results += simulate_cluster(
                trace,
                R,
                cfg.policies,
                cfg.cost,
                capacity_factor=cfg.capacity_factor,
                priority=cfg.priority,
                tokens_per_rank=cfg.tokens_per_rank,
                steps=cfg.steps,
                calibration_fraction=cfg.calibration_fraction,
                seed=cfg.seed,
                sibling=cfg.expansion,
            )
            bar.advance(task)
    rows = [
        {**r.to_dict(), "quality": quality_lookup(cfg.quality, r.policy, cfg.capacity_factor)}
        for r in results
    ]
    load = trace.expert_load()
    payload = {
        "trace": {
            "source": trace.source,
            "layers": trace.num_layers,
            "tokens": trace.num_tokens,
            "experts": trace.num_experts,
            "top_k": trace.top_k,
            "expert_max_over_mean": float((load.max(1).values / load.mean(1)).mean()),
        },
        "config": cfg.to_dict(),
        "results": rows,
    }
    (out / "sim.json").write_text(json.dumps(payload, indent=2))
    cfg.to_yaml(out / "sim.yaml")
    plot_scaling(rows, out / "sim.png", title=f"trace: {trace.source}, cf {cfg.capacity_factor}")
    console.print(results_table(rows))
    console.print(f"wrote {out / 'sim.json'} and {out / 'sim.png'}")
    return payload


def results_table(rows: list[dict]) -> Table:
    t = Table(title="Simulated MoE step per policy and cluster size")
    for col in (
        "ranks",
        "policy",
        "step ms",
        "comm ms",
        "compute ms",
        "wire GB",
        "work imbalance",
        "degraded",
        "quality",
    ):
        t.add_column(col, justify="right" if col not in ("policy", "quality") else "left")
    for r in rows:
        t.add_row(
            str(r["ranks"]),
            r["policy"],
            f"{r['step_ms']:.3f}",
            f"{r['dispatch_ms'] + r['combine_ms']:.3f}",
            f"{r['compute_ms']:.3f}",
            f"{r['wire_bytes'] / 1e9:.2f}",
            f"{r['work_imbalance']:.2f}",
            f"{r['degraded_fraction']:.1%}",
            r["quality"],
        )
    return t


def plot_scaling(rows: list[dict], path: Path, title: str = "") -> None:
    """Two panels against R (log2 axis): step time and bytes on the wire, one line per policy."""
    from moe_understudy.report import pyplot, save_figure

    plt = pyplot()

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for policy in dict.fromkeys(r["policy"] for r in rows):
        mine = [r for r in rows if r["policy"] == policy]
        ranks = [r["ranks"] for r in mine]
        a.plot(ranks, [r["step_ms"] for r in mine], marker="o", label=policy)
        b.plot(ranks, [r["wire_bytes"] / 1e9 for r in mine], marker="o", label=policy)
    for ax, label in ((a, "MoE step time (ms)"), (b, "bytes on the wire per step (GB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("ranks")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    a.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
