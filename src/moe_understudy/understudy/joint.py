"""Joint training: understudies learn alongside the MoE from a detached auxiliary loss.

`JointUnderstudies` hooks every MoE layer's experts module. Each forward (with grad enabled)
records the layer's input x and routed output y, both detached, into this object's own record
list (never a module global); `loss()` turns what was recorded since the last call into
sum over layers of loss(U(x), y) and clears it. Because x and y are detached the auxiliary loss
moves only the understudies, so adding it to the model's loss leaves the MoE's gradients as they were.

Use in any loop:
    joint = JointUnderstudies(model, arch="dense").attach()
    optimizer = AdamW([*model.parameters(), *joint.parameters()])
    loss = model(input_ids=ids, labels=ids).loss + joint.loss()
    ...
    joint.detach(); joint.save("runs/teacher/understudies")
or with a transformers Trainer: `trainer.add_callback(JointUnderstudyCallback(joint))` (own optimiser).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from moe_understudy.moe.adapters import experts_call_inputs, find_moe_layers
from moe_understudy.moe.standins import ASSIGNMENT, level_of
from moe_understudy.understudy.losses import layer_loss
from moe_understudy.understudy.modules import build_understudy


def _sized(arch: str, layer, kw: dict) -> dict:
    """build_understudy keywords for `layer`: a trunk without measured usage merges experts equally."""
    if arch == "trunk" and kw.get("usage") is None:
        return {**kw, "usage": torch.ones(layer.num_experts)}
    return kw


class JointUnderstudies(nn.Module):
    """One understudy per MoE layer of `model`, trained from detached (x, routed y) of its forwards."""

    def __init__(
        self, model: nn.Module, arch: str = "dense", loss: str = "mse", seed: int = 0, **kw: Any
    ) -> None:
        super().__init__()
        if arch == "merged":  # the merged warm start needs usage from a capture; from scratch it is `dense`
            arch = "dense"
        if arch == "trunk":  # no capture to count usage from: merge the experts with equal weights
            kw.setdefault("usage", None)
        layers = find_moe_layers(model)
        self._model = [
            model
        ]  # a list so the model is not registered as a submodule (its params are not ours)
        self._layers = layers
        self.loss_name = loss
        self.modules_by_layer = nn.ModuleDict(
            {
                str(ly.index): build_understudy(arch, ly, seed=seed + ly.index, **_sized(arch, ly, kw))
                for ly in layers
            }
        )
        self._records: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._handles: list = []

    @property
    def understudies(self) -> dict[int, nn.Module]:
        return {int(k): m for k, m in self.modules_by_layer.items()}

    def _hook(self, index: int):
        def record(module: nn.Module, args, kwargs, output) -> None:
            if not torch.is_grad_enabled():
                return  # evaluation forwards are not training data
            x, indices, weights = experts_call_inputs(args, kwargs)
            self._records.append(
                (index, x.detach(), output.detach().reshape(x.shape), indices.detach(), weights.detach())
            )

        return record

    def attach(self) -> JointUnderstudies:
        """Start recording every forward of the model; returns self."""
        self.detach()
        self._handles = [
            ly.block.experts.register_forward_hook(self._hook(ly.index), with_kwargs=True)
            for ly in self._layers
        ]
        return self

    def detach(self) -> None:
        """Stop recording and drop anything recorded."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._records = []

    def layer_losses(self) -> dict[int, torch.Tensor]:
        """{layer: loss} from the forwards recorded since the last call (averaged over them); clears the records."""
        records, self._records = self._records, []
        sums: dict[int, list[torch.Tensor]] = {}
        for index, x, y, indices, weights in records:
            module = self.modules_by_layer[str(index)]
            pred = module(x, indices, weights) if level_of(module) == ASSIGNMENT else module(x)
            sums.setdefault(index, []).append(layer_loss(self.loss_name, pred, y))
        return {i: torch.stack(v).mean() for i, v in sums.items()}

    def loss(self) -> torch.Tensor:
        """Sum over layers of the auxiliary loss of the recorded forwards (a zero tensor when nothing was recorded)."""
        losses = self.layer_losses()
        if not losses:
            return torch.zeros((), device=next(self.parameters()).device)
        return torch.stack(list(losses.values())).sum()

    def save(self, out_dir: str | Path) -> Path:
        from moe_understudy.understudy.io import save_understudies

        return save_understudies(out_dir, self.understudies, self._model[0])


class JointUnderstudyCallback(TrainerCallback):
    """A transformers `TrainerCallback` that trains `joint`'s understudies with their own AdamW.

    The Trainer's loss is untouched; after each optimiser step of the model the callback takes the
    records of that step's forwards, steps the understudies once, and keeps the aux loss in
    `last_loss` (logged as `understudy_loss`).
    """

    def __init__(self, joint: JointUnderstudies, lr: float = 1e-3, weight_decay: float = 0.0) -> None:
        self.joint = joint
        self.optimizer = torch.optim.AdamW(joint.parameters(), lr=lr, weight_decay=weight_decay)
        self.last_loss = float("nan")

    def on_train_begin(self, args, state, control, **kwargs):
        self.joint.attach()

    def on_step_end(self, args, state, control, **kwargs):
        with torch.enable_grad():
            loss = self.joint.loss()
        if loss.requires_grad:
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        self.last_loss = float(loss.item())

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None:
            logs["understudy_loss"] = self.last_loss

    def on_train_end(self, args, state, control, **kwargs):
        self.joint.detach()
