"""The one place that knows transformers' MoE classes.

Every other module sees an MoE layer through `MoELayer`: a router that returns a `Routing`, routed
experts callable as ``experts(x, indices, weights)``, optional shared experts, and the sizes a
planner needs. Supported families (transformers 5.x): Mixtral, OLMoE, Qwen2-MoE (gated shared
expert), Qwen3-MoE and DeepSeek-V3 (shared experts, grouped top-k with sigmoid scores).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from moe_understudy.errors import UserError

# Family name -> (MoE block class path, routed-expert intermediate-size config attribute).
# Imports are lazy so that importing this module does not import every model family.
_FAMILIES: dict[str, tuple[str, str, str]] = {
    "mixtral": ("transformers.models.mixtral.modeling_mixtral", "MixtralSparseMoeBlock", "intermediate_size"),
    "olmoe": ("transformers.models.olmoe.modeling_olmoe", "OlmoeSparseMoeBlock", "intermediate_size"),
    "qwen2_moe": (
        "transformers.models.qwen2_moe.modeling_qwen2_moe",
        "Qwen2MoeSparseMoeBlock",
        "moe_intermediate_size",
    ),
    "qwen3_moe": (
        "transformers.models.qwen3_moe.modeling_qwen3_moe",
        "Qwen3MoeSparseMoeBlock",
        "moe_intermediate_size",
    ),
    "deepseek_v3": (
        "transformers.models.deepseek_v3.modeling_deepseek_v3",
        "DeepseekV3MoE",
        "moe_intermediate_size",
    ),
}
SUPPORTED_FAMILIES = tuple(_FAMILIES)


class UnsupportedModelError(UserError, ValueError):
    """The model holds no MoE layer this adapter knows."""


@dataclass(frozen=True)
class Routing:
    """One routing decision for a flat batch of T tokens over E experts, top-k each.

    logits:  (T, E) router logits as the router produced them
    weights: (T, k) combine weights of the chosen experts (the family's own normalisation)
    indices: (T, k) chosen expert ids, column 0 the router's first choice where the family sorts
    scores:  how the family turns logits into expert scores, "softmax" or "sigmoid" (DeepSeek-V3)
    scale:   factor the family applies to combine weights (DeepSeek-V3's routed_scaling_factor)
    """

    logits: torch.Tensor
    weights: torch.Tensor
    indices: torch.Tensor
    scores: str = "softmax"
    scale: float = 1.0

    @property
    def num_experts(self) -> int:
        return self.logits.shape[-1]

    @property
    def top_k(self) -> int:
        return self.indices.shape[-1]

    def tokens_per_expert(self) -> torch.Tensor:
        """(E,) number of assignments each expert receives."""
        return torch.bincount(self.indices.reshape(-1), minlength=self.num_experts)

    def probs(self) -> torch.Tensor:
        """(T, E) fp32 router probabilities (softmax, or normalised sigmoid for DeepSeek-V3-style)."""
        if self.scores == "sigmoid":
            s = torch.sigmoid(self.logits.float())
            return s / s.sum(-1, keepdim=True).clamp_min(1e-20)
        return torch.softmax(self.logits.float(), dim=-1)


@dataclass
class MoELayer:
    """A uniform view over one transformers MoE block.

    `index` is the decoder layer number, `path` the block's module path inside the model.
    """

    index: int
    path: str
    family: str
    block: nn.Module
    parent: nn.Module
    attr: str
    num_experts: int
    top_k: int
    hidden_size: int
    expert_intermediate_size: int
    shared_intermediate_size: int

    # --- the three parts of the block ------------------------------------------------------
    def route(self, x: torch.Tensor) -> Routing:
        """x: (T, H) -> Routing over the layer's experts."""
        logits, weights, indices = self.block.gate(x)
        if self.family == "deepseek_v3":
            scale = float(self.block.gate.routed_scaling_factor)
            return Routing(logits, weights, indices, scores="sigmoid", scale=scale)
        return Routing(logits=logits, weights=weights, indices=indices)

    def experts(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Routed part: x (T, H), indices/weights (T, k) -> (T, H); index == num_experts is skipped."""
        skip = indices >= self.num_experts
        if not bool(skip.any()):
            return self.block.experts(x, indices, weights.to(x.dtype))
        # transformers' default `grouped_mm` experts leave skip-index rows uninitialised (only its
        # expert-parallel mode masks them), so compute the kept assignments alone, one per row.
        token, slot = (~skip).nonzero(as_tuple=True)  # (A,), (A,)
        y = torch.zeros_like(x)
        if token.numel() == 0:
            return y
        rows = self.block.experts(
            x[token], indices[token, slot, None], weights[token, slot, None].to(x.dtype)
        )
        return y.index_add(0, token, rows.to(y.dtype))

    @property
    def has_shared(self) -> bool:
        return self.shared_intermediate_size > 0

    def shared(self, x: torch.Tensor) -> torch.Tensor | None:
        """Shared-expert part (always computed locally), x (T, H) -> (T, H), or None."""
        if self.family == "qwen2_moe":
            b = self.block
            return torch.sigmoid(b.shared_expert_gate(x)) * b.shared_expert(x)
        if self.family == "deepseek_v3":
            return self.block.shared_experts(x)
        return None

    def forward_parts(self, x: torch.Tensor) -> torch.Tensor:
        """Block output recomputed from route + experts (+ shared): x (T, H) -> (T, H)."""
        r = self.route(x)
        y = self.experts(x, r.indices, r.weights)
        s = self.shared(x)
        return y if s is None else y + s

    # --- weights, for warm starts and cost accounting ----------------------------------------
    def expert_weights(self, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Expert e as SwiGLU matrices: gate (I, H), up (I, H), down (H, I)."""
        ex = self.block.experts
        gate, up = ex.gate_up_proj[e].chunk(2, dim=0)
        return gate, up, ex.down_proj[e]

    @property
    def act_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return self.block.experts.act_fn

    def expert_params(self) -> int:
        """Parameters of one routed expert (SwiGLU: gate, up, down), the unit of `memory_expert_equiv`."""
        return 3 * self.hidden_size * self.expert_intermediate_size

    def expert_flops_per_token(self) -> int:
        """Multiply-adds x2 of one routed expert for one token (three H x I matmuls)."""
        return 2 * 3 * self.hidden_size * self.expert_intermediate_size

    def active_expert_flops_per_token(self) -> int:
        """FLOPs of the routed part per token: top_k experts."""
        return self.top_k * self.expert_flops_per_token()

    def replace(self, module: nn.Module) -> nn.Module:
        """Install `module` where the block was; return what was there."""
        old = getattr(self.parent, self.attr)
        setattr(self.parent, self.attr, module)
        return old

    def restore(self) -> None:
        setattr(self.parent, self.attr, self.block)


def experts_call_inputs(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x (T, H), indices (T, k), weights (T, k)) from a call of a block's experts module, positional or
    keyword (for forward hooks on `block.experts`)."""
    names = ("hidden_states", "top_k_index", "top_k_weights")
    values = list(args) + [kwargs[n] for n in names[len(args) :] if n in kwargs]
    if len(values) < 3:
        raise UserError("The experts module was called without (hidden_states, top_k_index, top_k_weights).")
    return values[0], values[1], values[2]


def _block_classes() -> dict[type, str]:
    import importlib

    out: dict[type, str] = {}
    for fam, (mod, cls, _) in _FAMILIES.items():
        out[getattr(importlib.import_module(mod), cls)] = fam
    return out


def _config_of(model: nn.Module):
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no `.config`; pass a transformers model of one of: "
            f"{', '.join(SUPPORTED_FAMILIES)}."
        )
    return getattr(cfg, "text_config", None) or cfg


def _layer_number(path: str) -> int:
    for part in path.split("."):
        if part.isdigit():
            return int(part)
    return -1


def find_moe_layers(model: nn.Module) -> list[MoELayer]:
    """Every MoE block of `model`, in depth order.

    Raises UnsupportedModelError with the class found and the supported families when there is none.
    Already-patched blocks (a wrapper holding `.moe` of type MoELayer) are found through the wrapper.
    """
    classes = _block_classes()
    cfg = _config_of(model)
    layers: list[MoELayer] = []
    for path, module in model.named_modules():
        fam = classes.get(type(module))
        if fam is None:
            continue
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        inner_attr = _FAMILIES[fam][2]
        gate = module.gate
        shared = 0
        if fam == "qwen2_moe":
            shared = int(cfg.shared_expert_intermediate_size)
        elif fam == "deepseek_v3":
            shared = int(cfg.moe_intermediate_size * cfg.n_shared_experts)
        layers.append(
            MoELayer(
                index=_layer_number(path),
                path=path,
                family=fam,
                block=module,
                parent=parent,
                attr=attr,
                num_experts=int(gate.num_experts),
                top_k=int(gate.top_k),
                hidden_size=int(gate.hidden_dim),
                expert_intermediate_size=int(getattr(cfg, inner_attr)),
                shared_intermediate_size=shared,
            )
        )
    # A patched model keeps the original blocks inside wrappers, so named_modules still finds them;
    # the parent is then the wrapper, not the decoder layer: re-point at the decoder layer.
    for layer in layers:
        if getattr(layer.parent, "is_moe_wrapper", False):
            wrapper = layer.parent
            outer_path = layer.path.rsplit(".", 2)[0]
            layer.parent = model.get_submodule(outer_path)
            layer.attr = next(n for n, m in layer.parent.named_children() if m is wrapper)
            layer.path = f"{outer_path}.{layer.attr}"
    if not layers:
        found = type(model).__name__
        raise UnsupportedModelError(
            f"No MoE layer found in {found} (model_type {getattr(cfg, 'model_type', '?')!r}); "
            f"supported families are {', '.join(SUPPORTED_FAMILIES)}."
        )
    return layers


def model_family(model: nn.Module) -> str:
    return find_moe_layers(model)[0].family


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder layers (for counting layers and hooking block inputs)."""
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise UnsupportedModelError(f"{type(model).__name__} exposes no `.model.layers` decoder stack.")
    return layers


def load_balancing_aux_coef(model: nn.Module) -> float:
    return float(getattr(_config_of(model), "router_aux_loss_coef", 0.0) or 0.0)
