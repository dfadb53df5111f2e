"""Should the stand-in's error decide what overflows? A probe on captured rows, no serving.

Under score priority an expert admits its highest-weight assignments and the stand-in serves the
rest. With a stand-in that is good on some assignments and poor on others, the order that loses
least admits the assignments the stand-in would serve worst: priority weight x the stand-in's
error on the pair, not the weight alone. This measures how much such an order could buy before
anything is built.

Per MoE layer, on the capture store's validation rows cut into steps of `--batch-tokens` rows,
capacity ceil(cf * T * k / E) per expert as `quality_under_load` holds it. Each step's overflow is
served by the stand-in; the layer's output error of a token is ||sum over its overflowing pairs of
w_p (S_p - y_p)||^2 with y_p the expert's output and S_p the stand-in's. Reported: that error summed
over the scored rows, relative to the error of score priority, for the admission orders
  - ``score``: w_p (today's);
  - ``oracle``: w_p * ||S_p - y_p|| (needs the expert's output, so not servable: the bound);
  - ``predicted``: w_p * exp(a linear map of x per expert), the log error fitted by ridge on the
    first half of the rows and scored on the second (E * (H + 1) parameters per layer, 2 H FLOPs
    per assignment: what a servable order would cost);
and, for scale, token drop's error under score priority (||sum over overflow of w_p y_p||^2).

With `--ppl-blocks N` it also serves N held-out blocks (batches of 8, score priority, `shadow`) with
the predicted order put in place of the score order for the measurement only (the runtime's
`admission_order` is swapped inside a context manager and restored; no product code knows the
order), the predictor fitted on the store's training rows, and reports the paired perplexity gap
against score priority at each cf. A probe, so that the order is built only if it pays.

    .venv/bin/python benchmarks/admission_probe.py --model runs/bench-demo/teacher \\
        --store runs/bench-demo/store --standins runs/probe/a24f6k+e2e2400-cf125-s0
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import track
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result  # noqa: E402

from moe_understudy.capture import CaptureStore  # noqa: E402
from moe_understudy.moe.adapters import find_moe_layers  # noqa: E402
from moe_understudy.moe.loading import load_model_and_tokenizer  # noqa: E402
from moe_understudy.runtime.admission import expert_capacity, queue_places  # noqa: E402
from moe_understudy.understudy.io import load_understudies  # noqa: E402
from moe_understudy.understudy.layerwise import AssignmentObjective  # noqa: E402

NAME = "admission_probe"
ORDERS = ("score", "predicted", "oracle")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="runs/bench-demo/teacher")
    p.add_argument("--store", default="runs/bench-demo/store")
    p.add_argument("--standins", default="runs/probe/a24f6k+e2e2400-cf125-s0")
    p.add_argument("--capacities", default="1.0,1.25,1.5,2.0", help="capacity factors, comma-separated")
    p.add_argument(
        "--batch-tokens",
        type=int,
        default=1024,
        help="rows per step (8 x 128 as quality_under_load; 64 for decode)",
    )
    p.add_argument("--ridge", type=float, default=1e-2, help="ridge strength of the log-error predictor")
    p.add_argument(
        "--ppl-blocks",
        type=int,
        default=0,
        help="also serve this many held-out blocks under the predicted order",
    )
    p.add_argument("--devices", type=int, default=4, help="--ppl-blocks: devices of the byte ledger")
    p.add_argument("--name", default=NAME)
    return p.parse_args()


@torch.no_grad()
def pair_errors(layer, standin, rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per row: x (N, H), weights and experts (N, k), the weighted stand-in residual w (S - y) and the
    weighted expert output w y of every routed pair (N, k, H), and the residual's norm (N, k)."""
    y = AssignmentObjective(layer, extra=0).prepare(rows, None)["pair_targets"].float()  # (N, k, H)
    x, idx, w = rows["x"].float(), rows["indices"], rows["weights"].float()
    s = standin.pair_outputs(x, idx).float()
    return {
        "x": x,
        "indices": idx,
        "weights": w,
        "residual": (s - y) * w[..., None],
        "output": y * w[..., None],
        "error": (s - y).norm(dim=-1),
    }


def fit_log_error(x: torch.Tensor, idx: torch.Tensor, error: torch.Tensor, E: int, strength: float):
    """(E, H + 1) ridge maps from [x, 1] to log ||S - y|| per expert."""
    a = torch.cat([x, torch.ones(x.shape[0], 1)], 1).double()
    maps = torch.zeros(E, a.shape[1], dtype=torch.float64)
    for e in range(E):
        rows, slot = (idx == e).nonzero(as_tuple=True)
        if rows.numel() < 2 * a.shape[1]:
            maps[e, -1] = error[rows, slot].clamp_min(1e-12).log().mean() if rows.numel() else 0.0
            continue
        f, t = a[rows], error[rows, slot].clamp_min(1e-12).log().double()
        gram = f.T @ f
        lam = strength * gram.diagonal().mean()
        maps[e] = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), f.T @ t)
    return maps


def predicted_error(maps: torch.Tensor, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    a = torch.cat([x, torch.ones(x.shape[0], 1)], 1).double()
    return (a[:, None, :] * maps[idx]).sum(-1).exp().float()  # (N, k)


def overflow_mask(priority: torch.Tensor, idx: torch.Tensor, E: int, cf: float) -> torch.Tensor:
    """(T, k) True where the assignment overflows its expert when experts admit highest priority first."""
    T, k = idx.shape
    order = torch.argsort(-priority.reshape(-1), stable=True)
    return queue_places(idx, order, E) >= expert_capacity(T, k, E, cf)


def step_errors(
    terms: dict, priorities: dict[str, torch.Tensor], E: int, cf: float, T: int
) -> dict[str, float]:
    """Summed layer-output error over steps of T rows for each order, and drop's under score priority."""
    out = dict.fromkeys([*priorities, "drop (score)", "overflow share (score)"], 0.0)
    N = terms["x"].shape[0] // T * T
    for s in range(0, N, T):
        sl = slice(s, s + T)
        idx = terms["indices"][sl]
        for name, p in priorities.items():
            over = overflow_mask(p[sl], idx, E, cf)
            out[name] += float((terms["residual"][sl] * over[..., None]).sum(1).pow(2).sum())
            if name == "score":
                out["drop (score)"] += float((terms["output"][sl] * over[..., None]).sum(1).pow(2).sum())
                out["overflow share (score)"] += float(over.float().mean()) * T / N
    return out


@contextlib.contextmanager
def predicted_admission(maps: dict[int, torch.Tensor]):
    """Inside: score priority admits by w * predicted stand-in error, each layer's map by its index."""
    import moe_understudy.runtime.layer as layer_mod
    import moe_understudy.runtime.policies as policies

    key: dict[str, torch.Tensor | None] = {"now": None}
    by_score, route = policies.admission_order, layer_mod.LoadAwareMoE.route

    def order(weights, priority):
        k = key["now"]
        if priority == "score" and k is not None and k.shape == weights.shape:
            return torch.argsort(-k.reshape(-1), stable=True)
        return by_score(weights, priority)

    def keyed_route(self, x):
        routing = route(self, x)
        key["now"] = routing.weights.float() * predicted_error(
            maps[self.moe.index], x.float(), routing.indices
        )
        return routing

    policies.admission_order, layer_mod.LoadAwareMoE.route = order, keyed_route
    try:
        yield
    finally:
        policies.admission_order, layer_mod.LoadAwareMoE.route = by_score, route


def served_perplexity(args, model, tokenizer, standins, store, cfs: list[float]) -> dict:
    """Paired Δppl of the predicted order against score priority, per cf, on held-out blocks."""
    from moe_understudy.eval.metrics import paired_ppl_delta, paired_ppl_delta_interval
    from moe_understudy.eval.quality import evaluate_policies
    from moe_understudy.runtime.scenarios import model_data_config, natural_blocks

    maps = {}
    for layer in find_moe_layers(model):
        rows = {k: v[: 16 * args.batch_tokens] for k, v in store.load(layer.index, "train").items()}
        t = pair_errors(layer, standins[layer.index], rows)
        maps[layer.index] = fit_log_error(t["x"], t["indices"], t["error"], layer.num_experts, args.ridge)
    blocks = natural_blocks(args.model, model_data_config(args.model, None), tokenizer, args.ppl_blocks)
    common = dict(priority="score", batch_size=8, num_devices=args.devices)
    score = evaluate_policies(model, standins, blocks, ["shadow"], cfs, **common)
    with predicted_admission(maps):
        predicted = evaluate_policies(model, standins, blocks, ["shadow"], cfs, **common)
    out = {}
    for a, b in zip(score[1:], predicted[1:], strict=True):
        nll_a, nll_b = torch.tensor(a["batch_nll"]), torch.tensor(b["batch_nll"])
        counts = torch.tensor(a["batch_positions"])
        out[f"{a['capacity_factor']:g}"] = {
            "score_pct": a["ppl_delta_pct"],
            "predicted_pct": b["ppl_delta_pct"],
            "paired_pct": paired_ppl_delta(nll_b, nll_a, counts),
            "paired_ci95": list(paired_ppl_delta_interval(nll_b, nll_a, counts)),
        }
    return out


def main() -> None:
    args = parse_args()
    console = Console()
    start = time.time()
    cfs = [float(c) for c in args.capacities.split(",")]
    model, tokenizer = load_model_and_tokenizer(args.model)
    layers = find_moe_layers(model)
    standins = load_understudies(args.standins, model)
    store = CaptureStore(args.store)
    results = {}
    for layer in track(layers, description="probing layers", console=console):
        terms = pair_errors(layer, standins[layer.index], store.load(layer.index, "val"))
        E = layer.num_experts
        cut = terms["x"].shape[0] // 2
        maps = fit_log_error(terms["x"][:cut], terms["indices"][:cut], terms["error"][:cut], E, args.ridge)
        scored = {k: v[cut:] for k, v in terms.items()}
        w = scored["weights"]
        priorities = {
            "score": w,
            "predicted": w * predicted_error(maps, scored["x"], scored["indices"]),
            "oracle": w * scored["error"],
        }
        log_e = scored["error"].clamp_min(1e-12).log().reshape(-1)
        log_p = predicted_error(maps, scored["x"], scored["indices"]).log().reshape(-1)
        results[layer.index] = {
            "log_error_correlation": float(torch.corrcoef(torch.stack([log_e, log_p]))[0, 1]),
            "by_cf": {str(cf): step_errors(scored, priorities, E, cf, args.batch_tokens) for cf in cfs},
        }
    table = Table(
        title=f"layer-output error of the served overflow, relative to score priority ({args.standins})"
    )
    table.add_column("cf")
    table.add_column("overflow share", justify="right")
    for name in ORDERS:
        table.add_column(name, justify="right")
    table.add_column("drop / score", justify="right")
    summary = {}
    for cf in cfs:
        per = [results[i]["by_cf"][str(cf)] for i in results]
        ratio = {n: sum(r[n] for r in per) / sum(r["score"] for r in per) for n in [*ORDERS, "drop (score)"]}
        share = sum(r["overflow share (score)"] for r in per) / len(per)
        summary[str(cf)] = {"overflow_share": share, "relative_to_score": ratio}
        table.add_row(
            f"{cf:g}", f"{share:.1%}", *(f"{ratio[n]:.3f}" for n in ORDERS), f"{ratio['drop (score)']:.1f}"
        )
    console.print(table)
    corr = {i: round(r["log_error_correlation"], 3) for i, r in results.items()}
    console.print(f"correlation of predicted and true log error per layer: {corr}")
    ppl = None
    if args.ppl_blocks:
        ppl = served_perplexity(args, model, tokenizer, standins, store, cfs)
        for cf, r in ppl.items():
            lo, hi = r["paired_ci95"]
            console.print(
                f"served, cf {cf}: score priority {r['score_pct']:+.2f}%, predicted order {r['predicted_pct']:+.2f}%, "
                f"paired {r['paired_pct']:+.2f}% ({lo:+.2f}, {hi:+.2f})"
            )
    path = write_result(
        args.name,
        {
            "model": args.model,
            "store": args.store,
            "standins": args.standins,
            "batch_tokens": args.batch_tokens,
            "ridge": args.ridge,
            "scored_rows": "second half of the store's validation split; the predictor fits on the first",
            "per_layer": {str(i): r for i, r in results.items()},
            "summary": summary,
            "served_perplexity": ppl,
            "ppl_blocks": args.ppl_blocks,
            "seconds": round(time.time() - start, 1),
        },
    )
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
