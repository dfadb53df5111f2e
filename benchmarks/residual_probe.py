"""Is there information left for a residual stand-in? A probe on captured rows, no serving.

The issue names "a residual form that predicts the missing assignments' weighted contribution given
the kept ones". Before building one, this measures whether the kept assignment's expert output
carries information about the missing one that the trunk has not already captured.

Per MoE layer, on the capture store's rows (top-k routing; every token's routed pairs):
  - f_miss: the output of one routed expert of the token (the one the trunk would serve: the
    lowest-weight pair, which overflows first under score priority), from the experts themselves;
  - s_miss: the stand-in's prediction of it (`pair_outputs`);
  - f_kept: the token's other routed experts' outputs, combined with their weights (what the
    layer still computes when only the missing pair overflows).
Ridge regressions of the trunk's residual f_miss - s_miss, fitted on the first half of the store's
validation split and scored on the second (the trunk was fitted on the train split, so its residual
there is smaller than on unseen rows and would mislead the fit), on features
  - x (a linear map of the input: the control, something the trunk could learn itself),
  - f_kept,
  - [x, f_kept],
  - [x, f_kept] with one map per missing expert (an upper bound: far over the memory cap).
Reported: held-out relative error ||f_miss - prediction||^2 / ||f_miss||^2 of the trunk alone and
of the trunk plus each correction. A correction that beats the x control by a wide margin is
information a residual stand-in could use; one that does not says the direction is empty.

    .venv/bin/python benchmarks/residual_probe.py --model runs/bench-demo/teacher \\
        --store runs/bench-demo/store --standins runs/probe/a24f+e2e
"""

from __future__ import annotations

import argparse
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
from moe_understudy.understudy.io import load_understudies  # noqa: E402
from moe_understudy.understudy.layerwise import AssignmentObjective  # noqa: E402

NAME = "residual_probe"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="runs/bench-demo/teacher")
    p.add_argument("--store", default="runs/bench-demo/store")
    p.add_argument("--standins", default="runs/probe/a24f+e2e", help="an assignment-level stand-in folder")
    p.add_argument(
        "--fit-fraction", type=float, default=0.5, help="share of the validation rows the regressions fit on"
    )
    p.add_argument(
        "--ridge", type=float, default=1e-3, help="ridge strength, relative to the mean feature power"
    )
    p.add_argument("--name", default=NAME)
    return p.parse_args()


@torch.no_grad()
def pair_terms(layer, standin, rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """x, f_miss, s_miss, f_kept (N, H) and the missing expert (N,) of each row: the lowest-weight
    routed pair is the missing one, the rest are kept and combined with their routing weights."""
    # the distiller's own per-pair targets: every routed expert's output for its token, unweighted
    per_pair = AssignmentObjective(layer, extra=0).prepare(rows, None)["pair_targets"]  # (N, k, H)
    x, idx, w = rows["x"].float(), rows["indices"], rows["weights"].float()
    miss = w.argmin(dim=1)  # (N,)
    kept = torch.ones_like(w, dtype=torch.bool).scatter_(1, miss[:, None], False)
    missing_expert = idx.gather(1, miss[:, None])  # (N, 1)
    return {
        "x": x,
        "f_miss": per_pair[torch.arange(x.shape[0]), miss],
        "s_miss": standin.pair_outputs(x, missing_expert)[:, 0].float(),
        "f_kept": (per_pair * (w * kept)[..., None]).sum(1),
        "expert": missing_expert[:, 0],
    }


def with_bias(features: torch.Tensor) -> torch.Tensor:
    return torch.cat([features, torch.ones(features.shape[0], 1, dtype=features.dtype)], 1).double()


def ridge(features: torch.Tensor, target: torch.Tensor, strength: float) -> torch.Tensor:
    """(F+1, H) least-squares map with a bias column, ridge scaled by the mean feature power."""
    a = with_bias(features)
    gram = a.T @ a
    lam = strength * gram.diagonal().mean()
    return torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), a.T @ target.double())


def apply(weights: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    return with_bias(features) @ weights


def relative_error(pred: torch.Tensor, target: torch.Tensor) -> float:
    return float((pred.double() - target.double()).pow(2).sum() / target.double().pow(2).sum())


def probe_layer(train: dict, val: dict, strength: float) -> tuple[dict[str, float], float]:
    """Held-out relative error of the trunk alone and with each residual correction, and the share
    of scored rows whose missing expert had enough fit rows for its own map."""
    target, resid = val["f_miss"], train["f_miss"] - train["s_miss"]
    feats = {
        "x": lambda d: d["x"],
        "kept": lambda d: d["f_kept"],
        "x+kept": lambda d: torch.cat([d["x"], d["f_kept"]], 1),
    }
    out = {"trunk": relative_error(val["s_miss"], target)}
    for name, f in feats.items():
        w = ridge(f(train), resid, strength)
        out[f"trunk + {name}"] = relative_error(val["s_miss"] + apply(w, f(val)), target)
    # one [x, kept] map per missing expert: the information bound, far over the memory cap
    pred, covered = val["s_miss"].double().clone(), 0
    both_train, both_val = feats["x+kept"](train), feats["x+kept"](val)
    for e in val["expert"].unique():
        t, v = train["expert"] == e, val["expert"] == e
        if int(t.sum()) < 4 * (both_train.shape[1] + 1):
            continue  # too few rows to fit a 2H-feature map: leave the trunk's prediction
        w = ridge(both_train[t], resid[t], strength)
        pred[v] += apply(w, both_val[v])
        covered += int(v.sum())
    out["trunk + x+kept per expert"] = relative_error(pred, target)
    return out, covered / val["x"].shape[0]


def main() -> None:
    args = parse_args()
    console = Console()
    start = time.time()
    model, _ = load_model_and_tokenizer(args.model)
    layers = find_moe_layers(model)
    standins = load_understudies(args.standins, model)
    store = CaptureStore(args.store)
    results, coverage = {}, {}
    for layer in track(layers, description="probing layers", console=console):
        standin = standins[layer.index]
        rows = pair_terms(layer, standin, store.load(layer.index, "val"))
        cut = int(args.fit_fraction * rows["x"].shape[0])
        fit, score = ({k: v[:cut] for k, v in rows.items()}, {k: v[cut:] for k, v in rows.items()})
        results[layer.index], coverage[layer.index] = probe_layer(fit, score, args.ridge)
    systems = list(next(iter(results.values())))
    table = Table(title=f"held-out relative error of the missing pair's output ({args.standins})")
    table.add_column("predictor")
    for i in results:
        table.add_column(f"layer {i}", justify="right")
    table.add_column("mean", justify="right")
    for s in systems:
        values = [results[i][s] for i in results]
        table.add_row(s, *(f"{v:.4f}" for v in values), f"{sum(values) / len(values):.4f}")
    console.print(table)
    console.print(
        "rows whose missing expert had its own map (the rest keep the trunk's prediction): "
        + ", ".join(f"layer {i} {c:.0%}" for i, c in coverage.items())
    )
    path = write_result(
        args.name,
        {
            "model": args.model,
            "store": args.store,
            "standins": args.standins,
            "fit_fraction": args.fit_fraction,
            "ridge": args.ridge,
            "missing_pair": "the lowest-weight routed pair of each token; kept = the others, weighted",
            "relative_error": {str(i): r for i, r in results.items()},
            "per_expert_coverage": {str(i): c for i, c in coverage.items()},
            "mean": {s: sum(results[i][s] for i in results) / len(results) for s in systems},
            "seconds": round(time.time() - start, 1),
        },
    )
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
