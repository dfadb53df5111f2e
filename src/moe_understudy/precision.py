"""How a training run (`teacher`, `sft`, `kd`) computes: fp32 master weights on `--device`, forwards
and backwards under `torch.autocast` to `--dtype`.

The parameters (and AdamW's state) stay float32 whatever `--dtype` says; bfloat16 / float16 only
change the precision the autocast-eligible ops (matmuls, attention) run in, on the CPU as on CUDA.
float16 adds dynamic loss scaling (`torch.amp.GradScaler`: a step whose gradients overflow is
skipped and the scale lowered), bfloat16 needs none. float32 is no autocast and no scaling at all,
so an fp32 run is the same computation it always was.

The dtype / device words go through moe/loading.py's resolvers, so an unknown one is one sentence.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from moe_understudy.moe.loading import dtype_name, resolve_device, resolve_dtype


@dataclass(frozen=True)
class MixedPrecision:
    """Where a run trains (`device`) and the dtype its forwards compute in (`dtype`); weights stay fp32."""

    device: torch.device
    dtype: torch.dtype

    @classmethod
    def of(cls, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32") -> MixedPrecision:
        """From the `--device` / `--dtype` words (a UserError in one sentence for unknown ones)."""
        return cls(resolve_device(device), resolve_dtype(dtype))

    @property
    def name(self) -> str:
        return dtype_name(self.dtype)

    @property
    def mixed(self) -> bool:
        """Whether forwards run under autocast (bfloat16 or float16)."""
        return self.dtype != torch.float32

    def autocast(self):
        """The context the forwards (and losses) of a step run in: autocast to `dtype`, or nothing for fp32."""
        if not self.mixed:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def scaler(self) -> torch.amp.GradScaler:
        """Dynamic loss scaling for float16; a pass-through (scale, unscale_, step, update do nothing more) otherwise."""
        return torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)

    def rng_state(self) -> dict:
        """The random state a checkpoint keeps beyond the CPU's: the CUDA generator of `device`."""
        if self.device.type != "cuda":
            return {}
        return {"cuda_rng": torch.cuda.get_rng_state(self.device)}

    def set_rng_state(self, state: dict) -> None:
        """Restore what `rng_state` kept (a checkpoint made on another device restores only the CPU's)."""
        if self.device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)


def on_cpu(tree):
    """`tree` (a state dict: nested dicts, lists and tuples of tensors) with every tensor on the CPU,
    the CPU's own tensors as they are; so a checkpoint written on a GPU loads on any device."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu()
    if isinstance(tree, dict):
        return {k: on_cpu(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(on_cpu(v) for v in tree)
    return tree


def step_with_scaler(
    scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer, grad_clip: float, *groups
) -> None:
    """Unscale the gradients (float16), clip each parameter group of `groups` apart to `grad_clip`, step
    (skipped by the scaler on an overflow), update the scale. Without scaling: clip and step."""
    scaler.unscale_(optimizer)
    for params in groups:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(optimizer)
    scaler.update()
