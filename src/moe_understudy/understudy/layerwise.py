"""Layer-wise distillation: fit one stand-in to one layer from captured rows {x, y, logits, indices, weights}.

Two objectives:
- `CombinedObjective` (token-level understudies, and the old way for shadows): the stand-in's output
  for a token's routed assignments against the captured routed output y.
- `AssignmentObjective` (assignment-level stand-ins): per (token, expert) targets computed from the
  layer's experts themselves, S(x, e) ~ E_e(x), on the token's routed experts (weighted by their
  combine weights) and on `extra` more experts drawn from its router distribution outside the top-k,
  so rarely used experts get data and the stand-in holds up when the routing shifts.

AdamW with linear warm-up and cosine decay; every `eval_every` steps the objective's held-out check
runs and the best weights are kept; training stops early after `patience` checks without gain.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from moe_understudy.moe.adapters import MoELayer
from moe_understudy.moe.standins import ASSIGNMENT, level_of
from moe_understudy.schedule import warmup_cosine
from moe_understudy.understudy.losses import cosine_loss, layer_loss


@dataclass(frozen=True)
class LayerFit:
    """How one layer's fit went."""

    val_error_start: float  # held-out relative error before training
    val_error: float  # held-out relative error of the weights kept
    steps: int  # steps actually taken (early stop may end sooner)
    history: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out check value)


def predict(module: nn.Module, rows: dict[str, torch.Tensor]) -> torch.Tensor:
    """Stand-in output for captured rows: x (N, H) (+ indices/weights (N, k) for assignment level) -> (N, H)."""
    x = rows["x"].float()
    if level_of(module) == ASSIGNMENT:
        return module(x, rows["indices"], rows["weights"].float())
    return module(x)


def _chunks(rows: dict[str, torch.Tensor], chunk: int):
    n = rows["x"].shape[0]
    for s in range(0, n, chunk):
        yield {k: v[s : s + chunk] for k, v in rows.items()}


@torch.no_grad()
def held_out_cosine(module: nn.Module, rows: dict[str, torch.Tensor], chunk: int = 8192) -> float:
    """Mean 1 - cos(U(x), y) over all held-out rows."""
    total = sum(
        cosine_loss(predict(module, p), p["y"]).item() * p["x"].shape[0] for p in _chunks(rows, chunk)
    )
    return total / max(1, rows["x"].shape[0])


@torch.no_grad()
def held_out_error(module: nn.Module, rows: dict[str, torch.Tensor], chunk: int = 8192) -> float:
    """Relative error sum|U(x) - y|^2 / sum|y|^2 over all held-out rows."""
    err, ref = 0.0, 0.0
    for part in _chunks(rows, chunk):
        y = part["y"].float()
        err += (predict(module, part) - y).pow(2).sum().item()
        ref += y.pow(2).sum().item()
    return err / max(ref, 1e-12)


class CombinedObjective:
    """The stand-in's output for the routed assignments against the captured routed output y."""

    def __init__(self, loss: str = "mse") -> None:
        self.name = loss

    def prepare(
        self, rows: dict[str, torch.Tensor], generator: torch.Generator | None
    ) -> dict[str, torch.Tensor]:
        return rows

    def loss(self, module: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return layer_loss(self.name, predict(module, batch), batch["y"])

    def check(self, module: nn.Module, rows: dict[str, torch.Tensor]) -> float:
        return held_out_cosine(module, rows) if self.name == "cosine" else held_out_error(module, rows)

    def error(self, module: nn.Module, rows: dict[str, torch.Tensor]) -> float:
        return held_out_error(module, rows)


class AssignmentObjective:
    """Per (token, expert) targets from the layer's own experts: relative weighted MSE of S(x, e) vs E_e(x).

    Pairs per token: its k routed experts, weighted by their combine weights (times, with `serving`
    capacity factors, `floor` + (1 - floor) x how often the assignment overflows under score priority
    at those factors, so the fit goes where serving hands the stand-in work), and `extra` experts
    drawn once (seeded) without replacement from its router probabilities outside the top-k,
    weighted by their probability in the family's normalisation times `extra_weight`. `weight_power`
    raises every pair's combine weight (or probability) to that power before the focus multiplies in:
    1 weighs a pair's error by its weight, 2 by its weight squared, which is how much the pair's error
    adds to the layer's output error when it is served. The experts' outputs for every pair are
    computed once (`prepare`), so a step costs only the stand-in. Held-out rows get the routed pairs
    only, weighed with the same power.
    """

    def __init__(
        self,
        layer: MoELayer,
        extra: int = 2,
        extra_weight: float = 0.5,
        serving: tuple[float, ...] = (),
        batch_rows: int = 1024,
        floor: float = 0.1,
        weight_power: float = 1.0,
    ) -> None:
        self.layer, self.extra, self.extra_weight = layer, extra, extra_weight
        self.serving, self.batch_rows, self.floor = serving, batch_rows, floor
        self.weight_power = weight_power

    def overflow_frequency(self, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        """(N, k) how often each routed assignment overflows at serving: score-priority capacity over
        consecutive batches of `batch_rows` captured rows (the capture's forward batches), averaged
        over the capacity factors `serving`."""
        from moe_understudy.runtime.admission import expert_capacity
        from moe_understudy.runtime.plan import RoutedAssignments
        from moe_understudy.runtime.policies import plan_routing

        idx, w = rows["indices"].long(), rows["weights"].float()
        E, k = self.layer.num_experts, idx.shape[1]
        freq = torch.zeros(idx.shape)
        for s in range(0, idx.shape[0], self.batch_rows):
            view = RoutedAssignments(idx[s : s + self.batch_rows], w[s : s + self.batch_rows], E)
            T = view.indices.shape[0]
            for cf in self.serving:
                plan = plan_routing(view, "drop", expert_capacity(T, k, E, cf), "score")
                freq[s : s + T] += plan.dropped.float() / len(self.serving)
        return freq

    def _pairs(self, rows, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices (N, n), weights (N, n)) of the pairs to fit."""
        idx, w = rows["indices"], rows["weights"].float()
        power = self.weight_power
        w_fit = w.pow(power)
        if self.serving and generator is not None:  # focus the fit where serving hands the stand-in work
            w_fit = w_fit * (self.floor + (1.0 - self.floor) * self.overflow_frequency(rows))
        extra = min(self.extra, self.layer.num_experts - idx.shape[1])
        if generator is None or extra <= 0:
            return idx, w_fit
        logits = rows["logits"].float()
        probs = torch.sigmoid(logits) if self.layer.family == "deepseek_v3" else torch.softmax(logits, -1)
        probs = probs / probs.sum(-1, keepdim=True)
        norm = w.sum(-1, keepdim=True) / probs.gather(1, idx).sum(-1, keepdim=True).clamp_min(1e-20)
        outside = probs.scatter(1, idx, 0.0).clamp_min(1e-12)
        more = torch.multinomial(outside, extra, replacement=False, generator=generator)  # (N, extra)
        more_w = (probs.gather(1, more) * norm).pow(power) * self.extra_weight
        return torch.cat([idx, more], 1), torch.cat([w_fit, more_w], 1)

    @torch.no_grad()
    def prepare(self, rows: dict[str, torch.Tensor], generator: torch.Generator | None, chunk: int = 4096):
        """`rows` plus pair_indices / pair_weights (N, n) and the experts' own outputs pair_targets (N, n, H)."""
        idx, w = self._pairs(rows, generator)
        N, n = idx.shape
        targets = torch.empty(N, n, rows["x"].shape[1])
        p = self.layer.block.gate.weight  # the experts run where the model is, in its dtype
        for s in range(0, N, chunk):
            x = rows["x"][s : s + chunk].to(p.device, p.dtype)
            flat = idx[s : s + chunk].reshape(-1, 1).to(p.device)
            ones = torch.ones(flat.shape[0], 1, device=p.device)
            out = self.layer.experts(x.repeat_interleave(n, 0), flat, ones)
            targets[s : s + chunk] = out.view(x.shape[0], n, -1).float().cpu()
        return {**rows, "pair_indices": idx, "pair_weights": w, "pair_targets": targets}

    @staticmethod
    def _terms(module, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(weighted squared error, weighted squared target) summed over the batch's pairs."""
        target, omega = batch["pair_targets"], batch["pair_weights"]
        pred = module.pair_outputs(batch["x"].float(), batch["pair_indices"]).float()  # (B, n, H)
        return (omega * (pred - target).pow(2).sum(-1)).sum(), (omega * target.pow(2).sum(-1)).sum()

    def loss(self, module: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        err, ref = self._terms(module, batch)
        return err / ref.clamp_min(1e-12)

    @torch.no_grad()
    def check(self, module: nn.Module, rows: dict[str, torch.Tensor], chunk: int = 4096) -> float:
        err, ref = 0.0, 0.0
        for part in _chunks(rows, chunk):
            e, r = self._terms(module, part)
            err, ref = err + e.item(), ref + r.item()
        return err / max(ref, 1e-12)

    error = check


def fit_layer(
    module: nn.Module,
    train: dict[str, torch.Tensor],
    val: dict[str, torch.Tensor],
    *,
    loss: str = "mse",
    objective: CombinedObjective | AssignmentObjective | None = None,
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
    """Train `module` in place on captured rows {x, y, logits, indices, weights}; keep the best held-out weights.

    `objective` defaults to `CombinedObjective(loss)`. `on_check(step, value)` is called after each
    held-out check (progress display).
    """
    objective = objective or CombinedObjective(loss)
    gen = torch.Generator().manual_seed(seed)
    train, val = objective.prepare(train, gen), objective.prepare(val, None)
    opt = torch.optim.AdamW(module.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=weight_decay)
    module.train()
    start = objective.error(module, val)
    best, best_state, since = objective.check(module, val), _copy_state(module), 0
    history = [(0, best)]
    n = train["x"].shape[0]
    step = 0
    for step in range(1, steps + 1):
        for group in opt.param_groups:
            group["lr"] = warmup_cosine(step - 1, steps, lr, warmup)
        rows = torch.randint(0, n, (min(batch_tokens, n),), generator=gen)
        value = objective.loss(module, {k: v[rows] for k, v in train.items()})
        opt.zero_grad(set_to_none=True)
        value.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        opt.step()
        if step % eval_every == 0 or step == steps:
            err = objective.check(module, val)
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
    return LayerFit(
        val_error_start=start, val_error=objective.error(module, val), steps=step, history=history
    )


def _copy_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}
