"""Record what each MoE layer sees and does, into a sharded safetensors store (`understudy capture`).

Per MoE layer and token: the block input x (H), the ROUTED output y (H; shared experts excluded,
they stay local), the router logits (E) and the top-k indices/weights (k). Hooks sit on the
block's router (`gate`, for the logits) and on its experts module (for x, the top-k actually used
and y), so y comes for free from the forward itself instead of being recomputed.

Store layout:
  manifest.json                       written LAST; a reader trusts only the shards it lists
  train/layer{L}-{shard:05d}.safetensors   x (N,H), y (N,H), logits (N,E), indices (N,k), weights (N,k)
  val/layer{L}-{shard:05d}.safetensors
Every file is written under a temporary name and moved into place with os.replace (files.py).
A capture starts by removing an old manifest, its shards and any temporary files, so a killed
capture leaves nothing trusted and rerunning it restarts cleanly. A reader refuses, in one sentence
naming the file, a truncated shard, a shard holding NaN or inf, and a model the store was not
captured from.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from torch import nn

from moe_understudy.config import CaptureConfig
from moe_understudy.errors import UserError
from moe_understudy.files import atomic_save_tensors, atomic_write_text, load_tensors
from moe_understudy.moe.adapters import MoELayer, experts_call_inputs, find_moe_layers
from moe_understudy.progress import stage_bar

MANIFEST = "manifest.json"
FORMAT = "moe-understudy-capture/1"
FIELDS = ("x", "y", "logits", "indices", "weights")
SPLITS = ("train", "val")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def shard_name(layer: int, shard: int) -> str:
    return f"layer{layer}-{shard:05d}.safetensors"


def clear_store(out: Path) -> None:
    """Remove what an earlier (maybe killed) capture left in `out`: manifest first, then shards and temporaries."""
    (out / MANIFEST).unlink(missing_ok=True)  # an older manifest must not vouch for shards we overwrite
    for split in SPLITS:
        for stale in (*(out / split).glob("layer*-*.safetensors"), *(out / split).glob("*.tmp")):
            stale.unlink()
    for stale in out.glob("*.tmp"):
        stale.unlink()


class LayerRecorder:
    """Forward hooks that collect one MoE layer's activity of every forward into explicit lists.

    `take()` returns and clears what was collected: {field: (N, ...)} concatenated over forwards.
    """

    def __init__(self, layer: MoELayer, dtype: torch.dtype = torch.float32) -> None:
        self.layer = layer
        self.dtype = dtype
        self._rows: dict[str, list[torch.Tensor]] = {f: [] for f in FIELDS}
        self._handles: list = []

    def _on_gate(self, module: nn.Module, args, output) -> None:
        self._rows["logits"].append(
            output[0].detach().reshape(-1, output[0].shape[-1]).to("cpu", self.dtype, copy=True)
        )

    def _on_experts(self, module: nn.Module, args, kwargs, output) -> None:
        x, indices, weights = experts_call_inputs(args, kwargs)
        self._rows["x"].append(x.detach().to("cpu", self.dtype, copy=True))
        self._rows["y"].append(output.detach().reshape(x.shape).to("cpu", self.dtype, copy=True))
        self._rows["indices"].append(indices.detach().to("cpu", torch.int32, copy=True))
        self._rows["weights"].append(weights.detach().to("cpu", self.dtype, copy=True))

    def attach(self) -> LayerRecorder:
        block = self.layer.block
        self._handles = [
            block.gate.register_forward_hook(self._on_gate),
            block.experts.register_forward_hook(self._on_experts, with_kwargs=True),
        ]
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def pending(self) -> int:
        return sum(t.shape[0] for t in self._rows["x"])

    def take(self) -> dict[str, torch.Tensor]:
        out = {f: torch.cat(rows) for f, rows in self._rows.items() if rows}
        self._rows = {f: [] for f in FIELDS}
        return out


@dataclass
class _ShardLog:
    """Shards written so far for one split: {layer: [{"file", "rows"}, ...]}, plus usage sums."""

    shards: dict[int, list[dict]]
    counts: dict[int, torch.Tensor]
    mass: dict[int, torch.Tensor]


@torch.no_grad()
def capture_activity(
    model: nn.Module,
    blocks: dict[str, torch.Tensor],
    out: str | Path,
    batch_size: int = 8,
    shard_tokens: int = 16_384,
    dtype: str = "float32",
    model_id: str = "",
    console: Console | None = None,
) -> CaptureStore:
    """Run `model` over token `blocks` {split: (N, S)} and write the store at `out`; returns its reader."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    clear_store(out)
    layers = find_moe_layers(model)
    recorders = [LayerRecorder(layer, _DTYPES[dtype]).attach() for layer in layers]
    device = next(model.parameters()).device
    logs: dict[str, _ShardLog] = {}
    t0 = time.perf_counter()
    total_batches = sum(math.ceil(len(b) / batch_size) for b in blocks.values())
    progress = stage_bar("[bold]capture[/] {task.description}", console=console, disable=console is None)
    try:
        with progress:
            task = progress.add_task("", total=total_batches)
            for split, ids in blocks.items():
                (out / split).mkdir(exist_ok=True)
                log = logs[split] = _ShardLog(shards={ly.index: [] for ly in layers}, counts={}, mass={})
                progress.update(task, description=split)
                for start in range(0, len(ids), batch_size):
                    model(input_ids=ids[start : start + batch_size].to(device))
                    if recorders[0].pending() >= shard_tokens:
                        _flush(recorders, log, out / split, split)
                    progress.advance(task)
                _flush(recorders, log, out / split, split)
    finally:
        for r in recorders:
            r.detach()
    first = layers[0]
    manifest = {
        "format": FORMAT,
        "model_id": model_id or str(getattr(getattr(model, "config", None), "_name_or_path", "")),
        "family": first.family,
        "layers": [ly.index for ly in layers],
        "num_layers": len(getattr(getattr(model, "model", model), "layers", layers)),
        "hidden_size": first.hidden_size,
        "num_experts": first.num_experts,
        "top_k": first.top_k,
        "dtype": dtype,
        "block_size": int(next(iter(blocks.values())).shape[1]),
        "tokens": {s: int(b.numel()) for s, b in blocks.items()},
        "seconds": round(time.perf_counter() - t0, 3),
        "shards": {s: {str(k): v for k, v in log.shards.items()} for s, log in logs.items()},
        "usage": {
            str(ly.index): {
                "counts": logs["train" if "train" in logs else next(iter(logs))].counts[ly.index].tolist(),
                "weight_mass": logs["train" if "train" in logs else next(iter(logs))].mass[ly.index].tolist(),
            }
            for ly in layers
        },
    }
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1))
    return CaptureStore(out)


def _flush(recorders: list[LayerRecorder], log: _ShardLog, folder: Path, split: str) -> None:
    """Write each layer's pending rows as its next shard (atomically) and add them to the usage sums."""
    for rec in recorders:
        if not rec.pending():
            continue
        rows = rec.take()
        L, E = rec.layer.index, rec.layer.num_experts
        name = shard_name(L, len(log.shards[L]))
        atomic_save_tensors(rows, folder / name)
        log.shards[L].append({"file": f"{split}/{name}", "rows": int(rows["x"].shape[0])})
        idx = rows["indices"].long().reshape(-1)
        w = rows["weights"].float().reshape(-1)
        valid = idx < E
        log.counts[L] = log.counts.get(L, torch.zeros(E)) + torch.bincount(idx[valid], minlength=E).float()
        log.mass[L] = log.mass.get(L, torch.zeros(E)) + torch.zeros(E).index_add(0, idx[valid], w[valid])


class CaptureStore:
    """Reader of a capture store; trusts only the shards listed in manifest.json."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        manifest = self.path / MANIFEST
        if not manifest.is_file():
            hint = (
                " (shards exist but no manifest: the capture did not finish; rerun it)"
                if self.path.is_dir()
                else ""
            )
            raise UserError(
                f"{self.path} is not a capture store{hint}; create one with `understudy capture`."
            )
        try:
            self.manifest = json.loads(manifest.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UserError(f"{manifest} is not valid JSON (truncated?); capture the store again.") from err
        if not isinstance(self.manifest, dict) or self.manifest.get("format") != FORMAT:
            raise UserError(
                f"{manifest} is not a {FORMAT} manifest; recapture with this version of understudy."
            )

    @property
    def layers(self) -> list[int]:
        return list(self.manifest["layers"])

    @property
    def hidden_size(self) -> int:
        return int(self.manifest["hidden_size"])

    def tokens(self, split: str = "train") -> int:
        return sum(s["rows"] for s in self._shards(split, self.layers[0]))

    def _shards(self, split: str, layer: int) -> list[dict]:
        if split not in self.manifest["shards"]:
            raise UserError(
                f"The store {self.path} has no {split!r} split; it has {', '.join(self.manifest['shards'])}."
            )
        shards = self.manifest["shards"][split].get(str(layer))
        if shards is None:
            raise UserError(f"The store {self.path} has no layer {layer}; it has layers {self.layers}.")
        return shards

    def load(self, layer: int, split: str = "train") -> dict[str, torch.Tensor]:
        """{x (N,H), y (N,H), logits (N,E), indices (N,k) int64, weights (N,k)} of one layer and split."""
        fix = f"capture the store again (understudy capture ... --out {self.path})"
        parts = []
        for shard in self._shards(split, layer):
            path = self.path / shard["file"]
            part = load_tensors(path, fix)
            missing = [f for f in FIELDS if f not in part]
            if missing or part["x"].shape[0] != shard["rows"]:
                raise UserError(f"{path} does not hold the {shard['rows']} rows {MANIFEST} lists; {fix}.")
            bad = [f for f in ("x", "y", "logits", "weights") if not bool(torch.isfinite(part[f]).all())]
            if bad:
                raise UserError(
                    f"{path} holds NaN or inf values in {', '.join(bad)} (the model overflowed while captured); "
                    f"capture again with --dtype float32 (or bfloat16, which does not overflow like float16)."
                )
            parts.append(part)
        out = {f: torch.cat([p[f] for p in parts]) for f in FIELDS}
        out["indices"] = out["indices"].long()
        return out

    def usage(self, layer: int) -> torch.Tensor:
        """(E,) router weight mass per expert over the train split (for the merged warm start)."""
        return torch.tensor(self.manifest["usage"][str(layer)]["weight_mass"])

    def check_model(self, layers: list[MoELayer]) -> None:
        """UserError naming the mismatch when `layers` (of a model) are not the ones this store recorded."""
        have = [ly.index for ly in layers]
        for key, words, value in (
            ("num_experts", "experts per MoE layer", layers[0].num_experts),
            ("top_k", "experts per token (top-k)", layers[0].top_k),
        ):
            if key in self.manifest and int(self.manifest[key]) != value:
                raise UserError(
                    f"The store {self.path} was captured from a model with {self.manifest[key]} {words} but this "
                    f"model has {value}; capture this model first."
                )
        if layers[0].hidden_size != self.hidden_size:
            raise UserError(
                f"The store {self.path} holds hidden size {self.hidden_size} but the model has "
                f"{layers[0].hidden_size}; capture this model first."
            )
        if have != self.layers:
            raise UserError(
                f"The store {self.path} holds MoE layers {self.layers} but the model has {have}; capture this model first."
            )


def spread_blocks(
    texts: list[str], tokenizer, block_size: int, n: int, seed: int = 0, oversample: int = 16
) -> torch.Tensor:
    """(n, S) blocks drawn at random (seeded) from the first `oversample * n` packed blocks of `texts`.

    Packing keeps documents contiguous, so the first n blocks cover only a handful of documents;
    activity captured from them misses whole kinds of text (in the stdlib: codec tables, data
    files) and understudies fitted on it fail there. Drawing from a wider span keeps the variety.
    """
    from moe_understudy.data import pack_blocks

    pool = pack_blocks(texts, tokenizer, block_size, max_blocks=oversample * n)
    if len(pool) <= n:
        return pool
    pick = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:n]
    return pool[pick.sort().values]


def capture_blocks(cfg: CaptureConfig, tokenizer) -> dict[str, torch.Tensor]:
    """{train: (N, S), val: (M, S)} token blocks from `cfg.data` sized by cfg.tokens / cfg.val_tokens."""
    from moe_understudy.data import load_corpus

    corpus = load_corpus(cfg.data)
    S = cfg.data.block_size
    return {
        "train": spread_blocks(corpus.train, tokenizer, S, cfg.tokens // S, seed=cfg.data.seed),
        "val": spread_blocks(corpus.val, tokenizer, S, cfg.val_tokens // S, seed=cfg.data.seed + 1),
    }


def run_capture(cfg: CaptureConfig, console: Console | None = None) -> CaptureStore:
    """Workflow of `understudy capture`: load the model and text, record, write the store."""
    from moe_understudy.moe.loading import load_model_and_tokenizer

    console = console or Console(stderr=True)
    model, tokenizer = load_model_and_tokenizer(cfg.model, cfg.device, cfg.model_dtype)
    blocks = capture_blocks(cfg, tokenizer)
    store = capture_activity(
        model,
        blocks,
        cfg.out,
        batch_size=cfg.batch_size,
        shard_tokens=cfg.shard_tokens,
        dtype=cfg.dtype,
        model_id=str(cfg.model),
        console=console,
    )
    cfg.to_yaml(Path(cfg.out) / "capture.yaml")
    return store


def default_data_config(model_path: str | Path):
    """The DataConfig the model was trained with (its teacher.yaml), else the default one."""
    from moe_understudy.config import DataConfig, TeacherConfig

    saved = Path(model_path) / "teacher.yaml"
    return TeacherConfig.from_yaml(saved).data if saved.is_file() else DataConfig()
