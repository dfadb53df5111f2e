"""The Python API, as a transformers user calls it: `import moe_understudy as mu`.

    model = AutoModelForCausalLM.from_pretrained(...)            # any supported MoE, any dtype/device
    store = mu.capture(model, blocks, out="store")                  # MoE-layer activity on your text
    understudies = mu.distill(model, store, arch="dense")           # one stand-in per MoE layer
    mu.quantize(understudies)                                       # trunk stand-ins in int8 (optional)
    mu.save_understudies("understudies", understudies, model)       # a self-describing folder
    understudies = mu.load_understudies("understudies", model)      # by path or hub id; checked
    with mu.patch(model, understudies, policy="understudy", capacity_factor=1.0):
        logits = model(input_ids=ids).logits                        # overflow served by understudies
    rows = mu.evaluate(model, understudies, blocks)                 # quality under load, per policy x cf

Text comes as token blocks (a (N, S) LongTensor, or {"train": ..., "val": ...}), as a list of
strings, or as a corpus name or path ("stdlib", a .txt/.jsonl file, a folder, a `datasets` name);
the last two need the model's tokenizer. Every error meant for the user is a `UserError` of one
sentence naming the fix. The CLI (`understudy ...`) runs the same workflows from saved folders.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moe_understudy import __all__  # noqa: F401 - the names `import moe_understudy as mu` gives
from moe_understudy.capture import CaptureStore
from moe_understudy.errors import UserError
from moe_understudy.runtime.layer import PatchedModel, patch, unpatch  # noqa: F401 - re-exported
from moe_understudy.understudy.io import load_understudies, save_understudies

Text = torch.Tensor | dict[str, torch.Tensor] | list[str] | str


def _split_blocks(
    data: Text, tokenizer, block_size: int, max_blocks: dict[str, int], seed: int = 0
) -> dict[str, torch.Tensor]:
    """{split: (N, S) blocks} from any accepted form of text; `max_blocks` caps each split."""
    from moe_understudy.capture import spread_blocks
    from moe_understudy.config import DataConfig
    from moe_understudy.data import load_corpus

    if isinstance(data, torch.Tensor):
        if data.dim() != 2 or data.shape[0] < 2:
            raise UserError(
                f"Token blocks must be (N >= 2, S) ids (the last tenth is held out); got shape {tuple(data.shape)}."
            )
        n_val = max(1, data.shape[0] // 10)
        data = {"train": data[:-n_val], "val": data[-n_val:]}
    if isinstance(data, dict):
        out = {}
        for split, cap in max_blocks.items():
            if split not in data or not isinstance(data[split], torch.Tensor) or data[split].dim() != 2:
                raise UserError(
                    f"Pass {{'train': (N, S), 'val': (M, S)}} token blocks; '{split}' is missing or not 2-D."
                )
            out[split] = data[split][:cap].long()
        return out
    if tokenizer is None:
        raise UserError(
            "Text given as strings or a corpus name needs the model's tokenizer: pass tokenizer=..."
        )
    if isinstance(data, list):
        corpus_val = [t for i, t in enumerate(data) if i % 10 == 9] or data[-1:]
        corpus = {"train": [t for i, t in enumerate(data) if i % 10 != 9] or data, "val": corpus_val}
    else:
        loaded = load_corpus(DataConfig(source=str(data), block_size=block_size))
        corpus = {"train": loaded.train, "val": loaded.val}
    return {
        split: spread_blocks(corpus[split], tokenizer, block_size, cap, seed=seed + i)
        for i, (split, cap) in enumerate(max_blocks.items())
    }


def capture(
    model: nn.Module,
    data: Text,
    out: str | Path,
    *,
    tokenizer=None,
    tokens: int = 65_536,
    val_tokens: int = 8_192,
    block_size: int = 128,
    batch_size: int = 8,
    shard_tokens: int = 16_384,
    dtype: str | None = None,
) -> CaptureStore:
    """Record each MoE layer's input, routed output, router logits and top-k on `data` into a store at `out`.

    data: (N, S) token ids (the last tenth held out), {"train": (N, S), "val": (M, S)}, a list of
    strings or a corpus name/path (both with `tokenizer`), capped at `tokens` / `val_tokens`.
    dtype: the stored dtype (default: the model's). The model runs where it is, in its dtype.
    Returns the store's reader; `distill` takes it (or its folder).
    """
    from moe_understudy.capture import capture_activity
    from moe_understudy.moe.loading import dtype_name, model_dtype_device, resolve_dtype

    S = data.shape[1] if isinstance(data, torch.Tensor) else block_size
    blocks = _split_blocks(data, tokenizer, S, {"train": max(1, tokens // S), "val": max(1, val_tokens // S)})
    stored = dtype_name(resolve_dtype(dtype)) if dtype else dtype_name(model_dtype_device(model)[0])
    was_training = model.training
    model.eval()
    try:
        return capture_activity(
            model, blocks, out, batch_size=batch_size, shard_tokens=shard_tokens, dtype=stored
        )
    finally:
        model.train(was_training)


def distill(
    model: nn.Module,
    store: CaptureStore | str | Path,
    *,
    arch: str = "dense",
    steps: int = 1500,
    out: str | Path | None = None,
    progress: bool = False,
    **options: Any,
) -> dict[int, nn.Module]:
    """Layer-wise distillation: one understudy per MoE layer of `model`, fitted on the captured `store`.

    arch: dense | lowrank | merged | small_moe | shadows | trunk; `options` are the other fields of
    `config.DistillConfig` (intermediate, rank, width, kind, loss, batch_tokens, lr, eval_every,
    patience, seed, ...). Understudies are fp32 (master weights) on the model's device; `patch`
    gives them the model's dtype. With `out`, the set is also saved there (and finished layers of
    an interrupted call are reused). End-to-end distillation: `understudy distill --e2e-steps N`.
    """
    from rich.console import Console

    from moe_understudy.config import DistillConfig
    from moe_understudy.moe.adapters import find_moe_layers
    from moe_understudy.understudy.distill import fit_layers

    store = store if isinstance(store, CaptureStore) else CaptureStore(store)
    store.check_model(find_moe_layers(model))
    try:
        cfg = DistillConfig(arch=arch, steps=steps, store=str(store.path), **options)
    except (TypeError, ValueError) as err:
        raise UserError(f"{err} See config.DistillConfig for the distillation options.") from err
    device = next(model.parameters()).device
    console = Console(stderr=True, quiet=not progress)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(out) if out is not None else Path(scratch)
        understudies, _ = fit_layers(cfg, model, store, folder, console)
        for module in understudies.values():
            module.to(device=device, dtype=torch.float32)
        if out is not None:
            save_understudies(folder, understudies, model)
    return understudies


def evaluate(
    model: nn.Module,
    understudies: dict[int, nn.Module] | str | Path | None,
    data: Text,
    *,
    tokenizer=None,
    policies=("full", "drop", "understudy"),
    capacities=(0.5, 1.0),
    priority: str = "score",
    batch_size: int = 8,
    block_size: int = 128,
    max_blocks: int = 64,
    num_devices: int = 4,
    **runtime_options: Any,
) -> list[dict[str, Any]]:
    """Quality under load: one row per (policy, capacity factor) on the same batches of `data`.

    Each row holds perplexity and its change vs `full`, KL to full, top-1 agreement, the fraction
    of assignments served by experts / stand-ins / dropped, bytes moved over `num_devices`, and
    max/mean load. data: (N, S) held-out token ids (all used), or strings / a corpus name with
    `tokenizer` (its validation split). understudies: modules or a saved folder / hub id.
    `runtime_options`: RuntimeConfig fields (readmit, threshold, latency, expanded_m, ...).
    """
    from moe_understudy.config import RuntimeConfig
    from moe_understudy.eval.quality import evaluate_policies

    if isinstance(understudies, (str, Path)):
        understudies = load_understudies(understudies, model)
    if isinstance(data, torch.Tensor):
        blocks = data
    else:
        blocks = _split_blocks(data, tokenizer, block_size, {"val": max_blocks})["val"]
    if blocks.dim() != 2 or blocks.shape[0] == 0 or blocks.shape[1] < 2:
        raise UserError(
            f"Nothing to evaluate: pass (N >= 1, S >= 2) token ids, got shape {tuple(blocks.shape)}."
        )
    try:
        RuntimeConfig(priority=priority, **runtime_options)
        for p in policies:
            RuntimeConfig(policy=p)
    except (TypeError, ValueError) as err:
        raise UserError(f"{err} See config.RuntimeConfig for the runtime options.") from err
    was_training = model.training
    model.eval()
    try:
        return evaluate_policies(
            model,
            understudies,
            blocks[:max_blocks],
            tuple(policies),
            tuple(float(c) for c in capacities),
            priority=priority,
            batch_size=min(batch_size, len(blocks[:max_blocks])),
            num_devices=num_devices,
            runtime_options=runtime_options,
            progress=False,
        )
    finally:
        model.train(was_training)


def quantize(understudies: dict[int, nn.Module]) -> dict[int, nn.Module]:
    """Store each stand-in of the set in int8, one scale per output row (in place), and return the set:
    half the memory against experts held at 16 bits, the same FLOPs. Only `arch="trunk"` stand-ins
    have int8 storage; any other is a UserError. See understudy/quantize.py."""
    from moe_understudy.understudy.quantize import quantize_

    for module in understudies.values():
        quantize_(module)
    return understudies
