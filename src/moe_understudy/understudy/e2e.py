"""End-to-end distillation: train understudies through the frozen model on next-token KL.

Each step substitutes the understudy for a random fraction of tokens in every MoE layer (drawn per
step from [fraction_min, fraction_max]) and minimises KL between the substituted model's and the
full model's next-token distributions. Only understudy parameters change. With a `checkpoint`
path the stage saves its whole state (understudies, optimiser, every RNG, step) every
`checkpoint_every` steps and continues from it when started again, ending with the same weights
as an unbroken run.

Why this beats the layer-wise fit when done right: layer-wise training sees only the teacher's
own layer inputs, but with understudies upstream a layer's inputs drift and errors compound;
training through the model at high substitution fractions exposes each understudy to the inputs
it will actually get and weights its errors by what they do to the prediction. The teacher's
log-probs are computed once and cached (fp16), so a step costs one substituted forward+backward.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from torch import nn

from moe_understudy.config import EndToEndConfig
from moe_understudy.errors import UserError
from moe_understudy.files import atomic_torch_save
from moe_understudy.progress import stage_bar
from moe_understudy.schedule import warmup_cosine
from moe_understudy.understudy.losses import kl_loss, relative_loss
from moe_understudy.understudy.replace import substituted


@dataclass(frozen=True)
class EndToEndResult:
    """What the end-to-end stage did."""

    kl_before: float  # held-out KL at full replacement, before the stage
    kl_after: float  # the same after the stage
    steps: int
    history: list[tuple[int, float]] = field(
        default_factory=list
    )  # (step, mean training loss since last entry)


@torch.no_grad()
def teacher_targets(
    model: nn.Module, blocks: torch.Tensor, batch_size: int = 8, hidden: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cached teacher outputs for `blocks` (N, S): log-probs (N, S, V) fp16 and, with `hidden`, last hidden states (N, S, H) fp16."""
    device = next(model.parameters()).device
    logps, states = [], []
    for s in range(0, len(blocks), batch_size):
        out = model(input_ids=blocks[s : s + batch_size].to(device), output_hidden_states=hidden)
        logps.append(torch.log_softmax(out.logits.float(), dim=-1).half().cpu())
        if hidden:
            states.append(out.hidden_states[-1].half().cpu())
    return torch.cat(logps), (torch.cat(states) if hidden else None)


@torch.no_grad()
def replacement_kl(
    model: nn.Module,
    understudies: dict[int, nn.Module],
    blocks: torch.Tensor,
    fraction: float = 1.0,
    direction: str = "forward",
    batch_size: int = 8,
    seed: int = 0,
) -> float:
    """Mean per-position KL between the full model and the model with understudies substituted at `fraction`."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with substituted(model, understudies, fraction=1.0, seed=seed) as wrappers:
        for s in range(0, len(blocks), batch_size):
            ids = blocks[s : s + batch_size].to(device)
            for w in wrappers:
                w.fraction = 0.0
            teacher = model(input_ids=ids).logits
            for w in wrappers:
                w.fraction = fraction
            student = model(input_ids=ids).logits
            total += kl_loss(student, teacher, direction=direction).item() * ids.numel()
            count += ids.numel()
    return total / max(1, count)


class _RandomSubstitution:
    """Substitute the stand-in for a random fraction of tokens (or assignments), drawn per step."""

    def __init__(self, wrappers: list, cfg: EndToEndConfig) -> None:
        self.wrappers, self.cfg = wrappers, cfg

    def teacher(self) -> None:
        for w in self.wrappers:
            w.fraction = 0.0

    def student(self, gen: torch.Generator) -> None:
        c = self.cfg
        fraction = c.fraction_min + (c.fraction_max - c.fraction_min) * torch.rand((), generator=gen).item()
        for w in self.wrappers:
            w.fraction = fraction

    def rng_states(self) -> list:
        return [w.rng_state() for w in self.wrappers]

    def set_rng_states(self, states: list, device: torch.device) -> None:
        for w, state in zip(self.wrappers, states, strict=True):
            w.set_rng_state(state, device)


class _ServingOverflow:
    """The runtime's policy decides what the stand-in serves, at a capacity factor drawn per step."""

    def __init__(self, handle, cfg: EndToEndConfig) -> None:
        self.handle, self.cfg = handle, cfg

    def teacher(self) -> None:
        self.handle.configure(policy="full")

    def student(self, gen: torch.Generator) -> None:
        c = self.cfg
        cf = c.cf_min + (c.cf_max - c.cf_min) * torch.rand((), generator=gen).item()
        self.handle.configure(policy=c.policy, capacity_factor=cf)

    def rng_states(self) -> list:
        return []  # the plan is a function of the routing and the drawn capacity factor

    def set_rng_states(self, states: list, device: torch.device) -> None:
        pass


@contextmanager
def _overflow(model: nn.Module, understudies: dict[int, nn.Module], cfg: EndToEndConfig):
    """What decides, each step, which tokens or assignments the stand-ins serve (`cfg.overflow`)."""
    if cfg.overflow == "serving":
        from moe_understudy.runtime.layer import patch

        handle = patch(model, understudies, policy="full", priority=cfg.priority)
        try:
            yield _ServingOverflow(handle, cfg)
        finally:
            handle.unpatch()
        return
    with substituted(model, understudies, seed=cfg.seed) as wrappers:
        yield _RandomSubstitution(wrappers, cfg)


@torch.no_grad()
def _fresh_targets(
    model: nn.Module, overflow, ids: torch.Tensor, hidden: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The full model's log-probs (B, S, V) (and last hidden states) for `ids`, stand-ins switched off."""
    overflow.teacher()
    out = model(input_ids=ids, output_hidden_states=hidden)
    return torch.log_softmax(out.logits.float(), dim=-1), (out.hidden_states[-1] if hidden else None)


def _step_loss(
    model: nn.Module,
    ids: torch.Tensor,
    target_logp: torch.Tensor,
    target_hidden: torch.Tensor | None,
    cfg: EndToEndConfig,
) -> torch.Tensor:
    out = model(input_ids=ids, output_hidden_states=target_hidden is not None)
    loss = kl_loss(out.logits, target_logp.float(), direction=cfg.direction)
    if target_hidden is not None:
        h = out.hidden_states[-1]
        loss = loss + cfg.hidden_weight * relative_loss(
            h.reshape(-1, h.shape[-1]), target_hidden.reshape(-1, h.shape[-1]).float()
        )
    return loss


def train_end_to_end(
    model: nn.Module,
    understudies: dict[int, nn.Module],
    train_blocks: torch.Tensor,
    cfg: EndToEndConfig,
    val_blocks: torch.Tensor | None = None,
    console: Console | None = None,
    checkpoint: Path | None = None,
) -> EndToEndResult:
    """Train `understudies` in place through the frozen `model` on `train_blocks` (N, S).

    The model's parameters are frozen for the duration and restored to their previous
    `requires_grad` afterwards. `val_blocks` (default: the first training blocks) measure the
    full-replacement KL before and after. A `checkpoint` file, when it exists, is resumed from
    (it must come from the same understudies and settings); it is deleted once the stage ends.
    """
    device = next(model.parameters()).device
    blocks = train_blocks[: cfg.blocks]
    check = (val_blocks if val_blocks is not None else blocks)[: cfg.eval_blocks]
    frozen = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    was_training = model.training
    model.eval()
    params = [p for m in understudies.values() for p in m.parameters()]
    try:
        saved = _load_checkpoint(checkpoint, cfg)
        kl_before = (
            saved["kl_before"]
            if saved
            else replacement_kl(model, understudies, check, direction=cfg.direction, seed=cfg.seed)
        )
        want_hidden = cfg.hidden_weight > 0
        cached = (
            teacher_targets(model, blocks, cfg.batch_size, hidden=want_hidden) if cfg.cache_teacher else None
        )
        opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
        gen = torch.Generator().manual_seed(cfg.seed)
        history: list[tuple[int, float]] = []
        running, seen, start = 0.0, 0, 0
        if saved:
            for k, m in understudies.items():
                m.load_state_dict(saved["understudies"][k])
            opt.load_state_dict(saved["optimizer"])
            _check_optimizer_shapes(opt, checkpoint)
            gen.set_state(saved["generator"])
            history, (running, seen), start = saved["history"], saved["running"], saved["step"]
        for m in understudies.values():
            m.train()
        progress = stage_bar(
            "[bold]end-to-end[/]", "loss {task.fields[loss]:.4f}", console=console, disable=console is None
        )
        with progress, _overflow(model, understudies, cfg) as overflow:
            task = progress.add_task("", total=cfg.steps, completed=start, loss=math.nan)
            if saved:
                overflow.set_rng_states(saved["substitution_rng"], device)
            log_every = max(1, cfg.steps // 20)
            for step in range(start, cfg.steps):
                rows = torch.randint(0, len(blocks), (min(cfg.batch_size, len(blocks)),), generator=gen)
                for group in opt.param_groups:
                    group["lr"] = warmup_cosine(step, cfg.steps, cfg.lr, cfg.warmup)
                ids = blocks[rows].to(device)
                if cached is not None:
                    target_logp = cached[0][rows].to(device)
                    target_hidden = None if cached[1] is None else cached[1][rows].to(device)
                else:
                    target_logp, target_hidden = _fresh_targets(model, overflow, ids, want_hidden)
                overflow.student(gen)
                loss = _step_loss(model, ids, target_logp, target_hidden, cfg)
                if not torch.isfinite(loss):
                    raise UserError(
                        f"End-to-end loss became {loss.item()} at step {step + 1}; lower --e2e-lr and "
                        + (f"rerun: {checkpoint} keeps the last good state." if checkpoint else "rerun.")
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                running, seen = running + loss.item(), seen + 1
                if (step + 1) % log_every == 0 or step + 1 == cfg.steps:
                    history.append((step + 1, running / seen))
                    progress.update(task, loss=running / seen)
                    running, seen = 0.0, 0
                progress.advance(task)
                done = step + 1
                if (
                    checkpoint
                    and cfg.checkpoint_every
                    and done % cfg.checkpoint_every == 0
                    and done < cfg.steps
                ):
                    atomic_torch_save(
                        {
                            "config": cfg.to_dict(),
                            "step": done,
                            "kl_before": kl_before,
                            "understudies": {k: m.state_dict() for k, m in understudies.items()},
                            "optimizer": opt.state_dict(),
                            "generator": gen.get_state(),
                            "substitution_rng": overflow.rng_states(),
                            "history": history,
                            "running": (running, seen),
                        },
                        checkpoint,
                    )
        for m in understudies.values():
            m.eval()
        kl_after = replacement_kl(model, understudies, check, direction=cfg.direction, seed=cfg.seed)
    finally:
        for p, flag in frozen.items():
            p.requires_grad_(flag)
        model.train(was_training)
    if checkpoint:
        Path(checkpoint).unlink(missing_ok=True)
    return EndToEndResult(kl_before=kl_before, kl_after=kl_after, steps=cfg.steps, history=history)


def _check_optimizer_shapes(opt: torch.optim.Optimizer, path: Path | None) -> None:
    """Refuse, in one sentence, a checkpoint whose optimizer moments do not fit the parameters (one
    written before a stand-in's parameters changed layout): AdamW would fail only at its first step."""
    for group in opt.param_groups:
        for p in group["params"]:
            moments = [v for v in opt.state.get(p, {}).values() if torch.is_tensor(v) and v.dim() > 0]
            if any(v.shape != p.shape for v in moments):
                raise UserError(
                    f"{path} holds optimizer state for parameters of another shape (an older layout); "
                    "delete it and rerun with --resume: finished layers are kept, the end-to-end stage starts again."
                )


def _load_checkpoint(path: Path | None, cfg: EndToEndConfig) -> dict | None:
    """The saved end-to-end state at `path`, or None; refuses one written under other settings."""
    if path is None or not Path(path).exists():
        return None
    saved = torch.load(path, weights_only=False)
    if saved["config"] != cfg.to_dict():
        raise UserError(
            f"{path} was written by an end-to-end stage with other settings; "
            "rerun with the same options or delete it to start that stage again."
        )
    return saved
