"""Layer-wise distillation: fit one understudy to one layer's captured (x -> routed y) pairs.

AdamW with linear warm-up and cosine decay; every `eval_every` steps the held-out relative error
is measured and the best weights kept; training stops early after `patience` checks without gain.
The cosine loss ignores scale, so for it the held-out check uses the cosine loss instead (the
relative error of a scale-free fit says nothing about progress).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from moe_understudy.schedule import warmup_cosine
from moe_understudy.understudy.losses import cosine_loss, layer_loss
from moe_understudy.understudy.modules import Shadows


@dataclass(frozen=True)
class LayerFit:
    """How one layer's fit went."""

    val_error_start: float  # held-out relative error before training
    val_error: float  # held-out relative error of the weights kept
    steps: int  # steps actually taken (early stop may end sooner)
    history: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out check value)


def predict(module: nn.Module, rows: dict[str, torch.Tensor]) -> torch.Tensor:
    """Understudy output for captured rows: x (N, H) (+ indices/weights (N, k) for shadows) -> (N, H)."""
    x = rows["x"].float()
    if isinstance(module, Shadows):
        return module(x, rows["indices"], rows["weights"].float())
    return module(x)


@torch.no_grad()
def held_out_cosine(module: nn.Module, rows: dict[str, torch.Tensor], chunk: int = 8192) -> float:
    """Mean 1 - cos(U(x), y) over all held-out rows."""
    n = rows["x"].shape[0]
    total = 0.0
    for s in range(0, n, chunk):
        part = {k: v[s : s + chunk] for k, v in rows.items()}
        total += cosine_loss(predict(module, part), part["y"]).item() * part["x"].shape[0]
    return total / max(1, n)


@torch.no_grad()
def held_out_error(module: nn.Module, rows: dict[str, torch.Tensor], chunk: int = 8192) -> float:
    """Relative error sum|U(x) - y|^2 / sum|y|^2 over all held-out rows."""
    err, ref = 0.0, 0.0
    n = rows["x"].shape[0]
    for s in range(0, n, chunk):
        part = {k: v[s : s + chunk] for k, v in rows.items()}
        y = part["y"].float()
        pred = predict(module, part)
        err += (pred - y).pow(2).sum().item()
        ref += y.pow(2).sum().item()
    return err / max(ref, 1e-12)


def fit_layer(
    module: nn.Module,
    train: dict[str, torch.Tensor],
    val: dict[str, torch.Tensor],
    *,
    loss: str = "mse",
    steps: int = 1500,
    batch_tokens: int = 1024,
    lr: float = 3e-3,
    weight_decay: float = 0.0,
    warmup: int = 50,
    eval_every: int = 100,
    patience: int = 5,
    seed: int = 0,
    on_check=None,
) -> LayerFit:
    """Train `module` in place on captured rows {x, y, indices, weights}; keep the best held-out weights.

    `on_check(step, val_error)` is called after each held-out check (progress display).
    """
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(module.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=weight_decay)
    module.train()
    check = held_out_cosine if loss == "cosine" else held_out_error
    start = held_out_error(module, val)
    best, best_state, since = check(module, val), _copy_state(module), 0
    history = [(0, best)]
    n = train["x"].shape[0]
    step = 0
    for step in range(1, steps + 1):
        for group in opt.param_groups:
            group["lr"] = warmup_cosine(step - 1, steps, lr, warmup)
        rows = torch.randint(0, n, (min(batch_tokens, n),), generator=gen)
        batch = {k: v[rows] for k, v in train.items()}
        value = layer_loss(loss, predict(module, batch), batch["y"])
        opt.zero_grad(set_to_none=True)
        value.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        opt.step()
        if step % eval_every == 0 or step == steps:
            err = check(module, val)
            history.append((step, err))
            if on_check is not None:
                on_check(step, err)
            if err < best - 1e-6:
                best, best_state, since = err, _copy_state(module), 0
            else:
                since += 1
                if since >= patience:
                    break
    module.load_state_dict(best_state)
    module.eval()
    return LayerFit(val_error_start=start, val_error=held_out_error(module, val), steps=step, history=history)


def _copy_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}
