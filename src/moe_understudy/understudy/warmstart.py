"""Warm starts of stand-ins from the teacher's own experts (merged, copied, or pruned to their most important units)."""

from __future__ import annotations

import torch

from moe_understudy.errors import UserError
from moe_understudy.moe.adapters import MoELayer


def _unit_importance(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """(I,) a rough size of each SwiGLU unit's contribution: |gate row| |up row| |down column|."""
    return gate.norm(dim=1) * up.norm(dim=1) * down.norm(dim=0)


@torch.no_grad()
def merge_experts_into(module, layer: MoELayer, usage: torch.Tensor) -> None:
    """Initialise a dense SwiGLU from the usage-weighted merge of the layer's experts.

    The routed output is about sum_e pi_e E_e(x) with pi_e the expert's share of router weight.
    Experts are split into m = I_u // I groups (most used first, dealt round-robin); each group is
    averaged with weights pi_e / Pi_g into one SwiGLU of I units whose down projection is scaled by
    the group's share Pi_g; the m groups sit side by side. When I_u < I the merged expert keeps its
    I_u most important units; leftover units (I_u mod I) keep their small random init.
    """
    E, inter = layer.num_experts, layer.expert_intermediate_size
    if usage.shape != (E,):
        raise UserError(f"usage must hold one value per expert ({E}), got shape {tuple(usage.shape)}.")
    share = usage.clamp_min(0) / usage.clamp_min(0).sum().clamp_min(1e-12)  # pi_e, sums to 1
    order = torch.argsort(share, descending=True)
    groups = max(1, min(E, module.intermediate // inter))
    for g in range(groups):
        members = order[g::groups]
        w = share[members] / share[members].sum().clamp_min(1e-12)
        gate = sum(w[j] * layer.expert_weights(int(e))[0] for j, e in enumerate(members))
        up = sum(w[j] * layer.expert_weights(int(e))[1] for j, e in enumerate(members))
        down = (
            sum(w[j] * layer.expert_weights(int(e))[2] for j, e in enumerate(members)) * share[members].sum()
        )
        width = min(inter, module.intermediate)
        keep = _unit_importance(gate, up, down).topk(width).indices if width < inter else torch.arange(inter)
        lo = g * width
        module.gate_up[lo : lo + width] = gate[keep].float()
        module.gate_up[module.intermediate + lo : module.intermediate + lo + width] = up[keep].float()
        module.down[:, lo : lo + width] = down[:, keep].float()


@torch.no_grad()
def copy_teacher_experts(module, layer: MoELayer, usage: torch.Tensor | None = None) -> None:
    """Warm start: router rows and the most important units of the most-used teacher experts.

    With the teacher's own sizes (same E, I, top_k) on a softmax-top-k family this is an exact copy.
    """
    gate_w = layer.block.gate.weight  # (E, H)
    E = layer.num_experts
    order = torch.arange(E) if usage is None else torch.argsort(torch.as_tensor(usage), descending=True)
    for j, e in enumerate(order[: module.num_experts].tolist()):
        gate, up, down = layer.expert_weights(e)
        width = module.intermediate
        keep = (
            torch.arange(gate.shape[0])
            if width >= gate.shape[0]
            else _unit_importance(gate, up, down).topk(width).indices
        )
        n = keep.numel()
        module.router[j] = gate_w[e].float()
        module.gate_up[j, :n] = gate[keep].float()
        module.gate_up[j, width : width + n] = up[keep].float()
        module.down[j, :, :n] = down[:, keep].float()


@torch.no_grad()
def shadows_from_experts(module, layer: MoELayer) -> None:
    """Warm start each "swiglu" shadow from its own expert's most important units."""
    for e in range(module.num_experts):
        gate, up, down = (w.float() for w in layer.expert_weights(e))
        w = module.width
        if module.kind == "swiglu":
            keep = _unit_importance(gate, up, down).topk(min(w, gate.shape[0])).indices
            n = keep.numel()
            module.inp[e, :n] = gate[keep]
            module.inp[e, w : w + n] = up[keep]
            module.out[e, :, :n] = down[:, keep]
        # "lowrank" shadows keep their random init: SwiGLU has no linear part at 0 to start from.


@torch.no_grad()
def trunk_from_experts(module, layer: MoELayer, usage: torch.Tensor | None, init: str = "merged") -> None:
    """Warm start of a gated trunk (gate_up (2w, H), down (H, w), scale (E, w)).

    merged: the trunk is the usage-weighted merge of the experts (`merge_experts_into`), every expert's
            scale 1: at the start each expert is served by the average expert.
    union:  the trunk holds each expert's w // E most important units side by side and expert e's
            scale is 1 on its own units and 0 elsewhere: at the start each expert is served by its
            own pruned copy (narrow per-expert shadows), and training lets experts share units.
    """
    E, w = layer.num_experts, module.width
    if init == "merged":
        if usage is None:
            raise UserError(
                "The trunk's merged warm start needs expert usage; build it from a capture store."
            )
        merge_experts_into(module, layer, torch.as_tensor(usage, dtype=torch.float32))
        module.scale.fill_(1.0)
        return
    if init != "union":
        raise UserError(f"Unknown trunk init {init!r}; use merged or union.")
    per = w // E
    if per == 0:
        raise UserError(
            f"A union warm start needs width >= num_experts ({E}); got width {w}: use init merged."
        )
    module.scale.zero_()
    for e in range(E):
        gate, up, down = (t.float() for t in layer.expert_weights(e))
        keep = _unit_importance(gate, up, down).topk(min(per, gate.shape[0])).indices
        lo, n = e * per, keep.numel()
        module.gate_up[lo : lo + n] = gate[keep]
        module.gate_up[w + lo : w + lo + n] = up[keep]
        module.down[:, lo : lo + n] = down[:, keep]
        module.scale[e, lo : lo + n] = 1.0
