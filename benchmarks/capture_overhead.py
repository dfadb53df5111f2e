"""Capture cost versus a plain forward of the same tokens (target: at most 1.3x).

Three systems over the same token blocks, interleaved round by round so CPU contention from other
jobs hits them alike; the median round time of each is compared:
  plain      model forward under no_grad (what capture must run anyway)
  hooks      forward with the capture hooks recording into memory (no disk)
  capture    the full `capture_activity`: hooks + sharded safetensors writes + manifest

Usage: .venv/bin/python benchmarks/capture_overhead.py [--model runs/teacher] [--blocks 64] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result  # noqa: E402

from moe_understudy.capture import LayerRecorder, capture_activity  # noqa: E402
from moe_understudy.moe.adapters import find_moe_layers  # noqa: E402
from moe_understudy.moe.loading import load_model_and_tokenizer  # noqa: E402


def blocks_of(model_dir: Path, n: int) -> torch.Tensor:
    """(n, S) training blocks the teacher saved (same tokens for every system)."""
    saved = model_dir / "blocks.pt"
    if not saved.exists():
        raise SystemExit(f"{saved} is missing; train the teacher with `understudy teacher` first.")
    return torch.load(saved)["train"][:n]


@torch.no_grad()
def plain(model, ids: torch.Tensor, batch: int) -> float:
    t0 = time.perf_counter()
    for s in range(0, len(ids), batch):
        model(input_ids=ids[s : s + batch])
    return time.perf_counter() - t0


@torch.no_grad()
def hooks_only(model, ids: torch.Tensor, batch: int) -> float:
    recorders = [LayerRecorder(ly).attach() for ly in find_moe_layers(model)]
    t0 = time.perf_counter()
    for s in range(0, len(ids), batch):
        model(input_ids=ids[s : s + batch])
    rows = [r.take() for r in recorders]
    elapsed = time.perf_counter() - t0
    for r in recorders:
        r.detach()
    assert rows[0]["x"].shape[0] == ids.numel()
    return elapsed


def full_capture(model, ids: torch.Tensor, batch: int, shard_tokens: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        capture_activity(
            model, {"train": ids}, Path(tmp) / "store", batch_size=batch, shard_tokens=shard_tokens
        )
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="runs/teacher")
    ap.add_argument("--blocks", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--shard-tokens", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_model_and_tokenizer(args.model)
    ids = blocks_of(Path(args.model), args.blocks)
    plain(model, ids[: args.batch_size], args.batch_size)  # warm-up
    times: dict[str, list[float]] = {"plain": [], "hooks": [], "capture": []}
    for _ in range(args.rounds):
        times["plain"].append(plain(model, ids, args.batch_size))
        times["hooks"].append(hooks_only(model, ids, args.batch_size))
        times["capture"].append(full_capture(model, ids, args.batch_size, args.shard_tokens))
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = ids.numel()
    table = Table(title=f"capture overhead ({tokens:,} tokens, {args.rounds} interleaved rounds, median)")
    for col in ("system", "seconds", "tokens/s", "x plain"):
        table.add_column(col, justify="right")
    for k, v in med.items():
        table.add_row(k, f"{v:.3f}", f"{tokens / v:,.0f}", f"{v / med['plain']:.3f}")
    Console().print(table)
    write_result(
        "capture_overhead",
        {
            "model": args.model,
            "tokens": tokens,
            "batch_size": args.batch_size,
            "shard_tokens": args.shard_tokens,
            "rounds": args.rounds,
            "seconds_median": {k: round(v, 4) for k, v in med.items()},
            "seconds_all": {k: [round(t, 4) for t in v] for k, v in times.items()},
            "ratio_hooks_over_plain": round(med["hooks"] / med["plain"], 4),
            "ratio_capture_over_plain": round(med["capture"] / med["plain"], 4),
            "target_ratio": 1.3,
            "note": "CPU shared with other jobs during the run; systems interleaved per round so ratios stay fair.",
        },
    )


if __name__ == "__main__":
    main()
