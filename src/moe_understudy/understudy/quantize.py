"""Weight-only int8 storage of a distilled stand-in: the same network in half the memory of 16 bits.

A stand-in approximates its layer to a few to tens of percent (held-out relative error 0.04-0.6);
rounding its weights to 8 bits per output row adds far less than that, while the memory it is
charged (every device holds it) halves against experts served at 16 bits. So at a fixed memory
budget an int8 stand-in may be twice as wide. This is post-training quantization: symmetric, one
scale per output row (per leading index of a stacked weight), round to nearest, no calibration
data. The weights are dequantized when the forward reads them, so FLOPs are those of the float
network (plus one multiply per stored weight per call, which no per-token ledger counts).

Against experts that are themselves served in 8 bits (DeepSeek-V3's FP8) an int8 stand-in is no
smaller per weight than an expert; the charge (`memory_expert_equiv`) is stated against 16 bits.

    understudy quantize runs/teacher --understudies runs/bench/trunk --out runs/bench/trunk-int8
"""

from __future__ import annotations

import torch
from rich.console import Console

from moe_understudy.config import QuantizeConfig
from moe_understudy.errors import UserError
from moe_understudy.moe.standins import StandIn

QMAX = 127  # symmetric int8: -127..127, so that -q is representable for every q


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, float scale) with weight ~ q * scale, one scale per leading index (output row)."""
    w = weight.detach().float()
    reduce = tuple(range(1, w.dim()))
    scale = (w.abs().amax(dim=reduce, keepdim=True) / QMAX).clamp_min(torch.finfo(torch.float32).tiny)
    return torch.round(w / scale).clamp_(-QMAX, QMAX).to(torch.int8), scale


def quantize_(module: StandIn) -> StandIn:
    """Store `module`'s quantizable weights (`QUANTIZABLE`, those present) in int8, in place; returns it.

    The parameters become int8 buffers of the same name beside `NAME_scale` buffers, so the
    state dict saves and reloads them (io.py re-applies the layout before loading). A quantized
    stand-in is for serving: its int8 weights take no gradients.
    """
    if not isinstance(module, StandIn) or not module.QUANTIZABLE:
        raise UserError(
            f"{type(module).__name__} has no int8 storage; quantize a stand-in of --arch trunk "
            "(the gated trunk reads every weight through its dequantizing accessor)."
        )
    if module.quantized:
        return module  # already int8: quantizing again would change nothing
    done = []
    for name in module.QUANTIZABLE:
        param = getattr(module, name, None)
        if param is None or param.dim() < 2:
            continue
        q, scale = quantize_rows(param)
        delattr(module, name)  # drops the Parameter, so the buffer may take its name
        module.register_buffer(name, q)
        module.register_buffer(f"{name}_scale", scale.to(param.dtype))
        done.append(name)
    module.quantized = tuple(done)
    return module


def run_quantize(cfg: QuantizeConfig, console: Console | None = None) -> dict:
    """Load `cfg.understudies` for `cfg.model`, store them in int8, save them to `cfg.out`; returns the
    memory per layer before and after, in routed experts held at 16 bits."""
    from pathlib import Path

    from moe_understudy.moe.adapters import find_moe_layers
    from moe_understudy.moe.loading import load_model_and_tokenizer
    from moe_understudy.understudy.io import load_understudies, save_understudies

    console = console or Console(stderr=True)
    out = Path(cfg.out)
    if Path(cfg.understudies).resolve() == out.resolve():
        raise UserError(
            f"--out {out} is the folder being quantized; choose a new folder, so the float weights are kept."
        )
    model, _ = load_model_and_tokenizer(cfg.model)
    expert_params = {ly.index: ly.expert_params() for ly in find_moe_layers(model)}
    understudies = load_understudies(cfg.understudies, model, dtype=torch.float32)
    before = {i: m.memory_expert_equiv(expert_params[i]) for i, m in understudies.items()}
    for module in understudies.values():
        quantize_(module)
    after = {i: m.memory_expert_equiv(expert_params[i]) for i, m in understudies.items()}
    save_understudies(out, understudies, model)
    return {"out": str(out), "memory_before": before, "memory_after": after}
