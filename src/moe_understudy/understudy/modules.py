"""Compact stand-ins for the routed part of one MoE layer.

Token-level understudies (`TokenStandIn`, moe/standins.py) map block inputs x (T, H) to an
approximation of the layer's ROUTED output (shared experts excluded: they stay local and are always
computed): dense, lowrank, merged (dense warm-started from the experts) and small_moe.
Assignment-level stand-ins (`AssignmentStandIn`) are called like `MoELayer.experts(x, indices,
weights)` and replace single overflowing assignments: `Shadows`, one small stand-in per expert, and
`GatedTrunk`, one trunk for all experts (assignment.py).

Every module reports `param_count()`, `memory_expert_equiv()` and its FLOPs (multiply-adds x2) so
its cost can be stated next to the layer's active routed-expert FLOPs (`cost_ratio`). `config()`
returns the keyword arguments that rebuild the same shapes; `io.py` stores it next to the weights.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moe_understudy.errors import UserError
from moe_understudy.moe.adapters import MoELayer
from moe_understudy.moe.standins import TokenStandIn
from moe_understudy.understudy.assignment import GatedTrunk, Shadows
from moe_understudy.understudy.functional import init_linear, swiglu
from moe_understudy.understudy.warmstart import (
    copy_teacher_experts,
    merge_experts_into,
    shadows_from_experts,
    trunk_from_experts,
)

ARCHS = ("dense", "lowrank", "merged", "small_moe", "shadows", "trunk")
# Archs serving single overflowing assignments (AssignmentStandIn); the others serve whole tokens.
ASSIGNMENT_ARCHS = ("shadows", "trunk")


class Understudy(TokenStandIn):
    """Base class of token-level understudies: x (T, H) -> (T, H) approximating one MoE layer's routed output."""


class DenseUnderstudy(Understudy):
    """SwiGLU MLP H -> I -> H. Arch "merged" is the same module warm-started from the experts."""

    def __init__(self, hidden_size: int, intermediate: int, arch: str = "dense") -> None:
        super().__init__(hidden_size)
        if intermediate <= 0:
            raise UserError(f"The dense understudy needs a positive intermediate size, got {intermediate}.")
        self.arch = arch
        self.intermediate = intermediate
        self.gate_up = nn.Parameter(torch.empty(2 * intermediate, hidden_size))  # (2I, H) gate rows then up
        self.down = nn.Parameter(torch.empty(hidden_size, intermediate))  # (H, I)
        init_linear(self.gate_up, hidden_size)
        init_linear(
            self.down, intermediate, scale=0.1
        )  # small output at start: error begins near 1, not above

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x, self.gate_up, self.down)

    def flops_per_token(self) -> int:
        return 2 * 3 * self.hidden_size * self.intermediate

    def config(self) -> dict[str, Any]:
        return {"hidden_size": self.hidden_size, "intermediate": self.intermediate, "arch": self.arch}


class LowRankUnderstudy(Understudy):
    """SwiGLU whose projections pass through a rank-r bottleneck; the intermediate stays wide.

    z = A x (r); h = silu(G z) * (U z) (I); y = B (D h)  with A (r, H), G/U (I, r), D (r, I), B (H, r).
    Costs 2 (2 H r + 3 r I) FLOPs per token: the tightest budgets keep a wide nonlinearity.
    """

    arch = "lowrank"

    def __init__(self, hidden_size: int, rank: int, intermediate: int) -> None:
        super().__init__(hidden_size)
        if rank <= 0 or intermediate <= 0:
            raise UserError(
                f"The lowrank understudy needs positive rank and intermediate, got {rank}, {intermediate}."
            )
        self.rank = rank
        self.intermediate = intermediate
        self.inp = nn.Parameter(torch.empty(rank, hidden_size))  # A (r, H)
        self.gate_up = nn.Parameter(torch.empty(2 * intermediate, rank))  # G;U (2I, r)
        self.mid = nn.Parameter(torch.empty(rank, intermediate))  # D (r, I)
        self.out = nn.Parameter(torch.empty(hidden_size, rank))  # B (H, r)
        init_linear(self.inp, hidden_size)
        init_linear(self.gate_up, rank)
        init_linear(self.mid, intermediate)
        init_linear(self.out, rank, scale=0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.linear(x, self.inp)  # (T, r)
        return F.linear(swiglu(z, self.gate_up, self.mid), self.out)  # (T, r) -> (T, H)

    def flops_per_token(self) -> int:
        return 2 * (2 * self.hidden_size * self.rank + 3 * self.rank * self.intermediate)

    def config(self) -> dict[str, Any]:
        return {"hidden_size": self.hidden_size, "rank": self.rank, "intermediate": self.intermediate}


def _batched_experts(
    x: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
) -> torch.Tensor:
    """Weighted sum of SwiGLU experts: x (T, H), indices/weights (T, k), gate_up (E, 2I, H), down (E, H, I).

    An index equal to E (or any out-of-range id) is skipped, as in `MoELayer.experts`.
    """
    out = torch.zeros_like(x)
    num_experts = gate_up.shape[0]
    for e in range(num_experts):
        token, slot = torch.where(indices == e)  # assignments of expert e
        if token.numel() == 0:
            continue
        y = swiglu(x[token], gate_up[e], down[e]) * weights[token, slot, None].to(x.dtype)
        out = out.index_add(0, token, y)
    return out


class SmallMoEUnderstudy(Understudy):
    """Fewer, smaller SwiGLU experts with their own softmax top-k router (MoE-to-MoE)."""

    arch = "small_moe"

    def __init__(self, hidden_size: int, num_experts: int, intermediate: int, top_k: int) -> None:
        super().__init__(hidden_size)
        if not 0 < top_k <= num_experts or intermediate <= 0:
            raise UserError(
                f"small_moe needs 0 < top_k <= num_experts and a positive intermediate, got top_k={top_k}, "
                f"num_experts={num_experts}, intermediate={intermediate}."
            )
        self.num_experts = num_experts
        self.intermediate = intermediate
        self.top_k = top_k
        self.router = nn.Parameter(torch.empty(num_experts, hidden_size))  # (E', H)
        self.gate_up = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden_size))  # (E', 2I', H)
        self.down = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate))  # (E', H, I')
        init_linear(self.router, hidden_size)
        init_linear(self.gate_up, hidden_size)
        init_linear(self.down, intermediate, scale=0.1)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (T, H) -> (weights (T, k) renormalised softmax top-k, indices (T, k))."""
        probs = torch.softmax(F.linear(x, self.router).float(), dim=-1)  # (T, E')
        top, idx = probs.topk(self.top_k, dim=-1)
        return top / top.sum(dim=-1, keepdim=True), idx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, indices = self.route(x)
        return _batched_experts(x, indices, weights, self.gate_up, self.down)

    def flops_per_token(self) -> int:
        return (
            2 * self.hidden_size * self.num_experts
            + self.top_k * 2 * 3 * self.hidden_size * self.intermediate
        )

    def config(self) -> dict[str, Any]:
        return {
            "hidden_size": self.hidden_size,
            "num_experts": self.num_experts,
            "intermediate": self.intermediate,
            "top_k": self.top_k,
        }


_CLASSES: dict[str, type[nn.Module]] = {
    "dense": DenseUnderstudy,
    "merged": DenseUnderstudy,
    "lowrank": LowRankUnderstudy,
    "small_moe": SmallMoEUnderstudy,
    "shadows": Shadows,
    "trunk": GatedTrunk,
}


def from_config(arch: str, config: dict[str, Any]) -> nn.Module:
    """Rebuild an (untrained) module of `arch` from its `config()`; used when loading saved weights."""
    if arch not in _CLASSES:
        raise UserError(f"Unknown understudy arch {arch!r}; choose one of: {', '.join(ARCHS)}.")
    return _CLASSES[arch](**config)


def build_understudy(arch: str, layer: MoELayer, seed: int | None = None, **kw: Any) -> nn.Module:
    """A fresh understudy of `arch` sized for `layer`.

    dense:     intermediate (default: one expert's)
    lowrank:   rank (default H // 8), intermediate (default: one expert's)
    merged:    intermediate (default: one expert's), usage (E,) router weight mass per expert (required)
    small_moe: num_experts (default E // 2), intermediate (default I // 2), top_k (default the layer's),
               init "random" | "teacher" (copy the router rows and expert units of the most-used experts)
    shadows:   kind "swiglu" | "lowrank", width (default I // 4), init "teacher" | "random"
    trunk:     width (default the widest with at most half an expert's FLOPs for a lone served assignment,
               about I // 2), film (default True), adapter_rank (default 0: none; or one per expert),
               width_per_pair (default 0; > 0: a row runs min(width, n x this) units for n served pairs),
               init "merged" (needs usage) | "union" | "random"
    """
    if seed is not None:
        torch.manual_seed(seed)
    H, inter, E, k = layer.hidden_size, layer.expert_intermediate_size, layer.num_experts, layer.top_k
    kw = {key: v for key, v in kw.items() if v is not None}
    if arch == "dense":
        return DenseUnderstudy(H, int(kw.pop("intermediate", inter)))
    if arch == "lowrank":
        return LowRankUnderstudy(H, int(kw.pop("rank", max(1, H // 8))), int(kw.pop("intermediate", inter)))
    if arch == "merged":
        usage = kw.pop("usage", None)
        if usage is None:
            raise UserError(
                "The merged understudy needs expert usage frequencies; build it from a capture store."
            )
        module = DenseUnderstudy(H, int(kw.pop("intermediate", inter)), arch="merged")
        merge_experts_into(module, layer, torch.as_tensor(usage, dtype=torch.float32))
        return module
    if arch == "small_moe":
        init = kw.pop("init", "random")
        module = SmallMoEUnderstudy(
            H,
            int(kw.pop("num_experts", max(1, E // 2))),
            int(kw.pop("intermediate", max(1, inter // 2))),
            int(kw.pop("top_k", min(k, max(1, E // 2)))),
        )
        if init == "teacher":
            copy_teacher_experts(module, layer, kw.pop("usage", None))
        return module
    if arch == "shadows":
        init = kw.pop("init", "teacher")
        module = Shadows(
            H, E, k, kind=str(kw.pop("kind", "swiglu")), width=int(kw.pop("width", max(1, inter // 4)))
        )
        if init == "teacher":
            shadows_from_experts(module, layer)
        return module
    if arch == "trunk":
        init = kw.pop("init", "merged")
        # default: the widest trunk whose lone served assignment costs at most half an expert's FLOPs
        # (an expert of its own rank each: the width is set by the largest)
        rank = kw.pop("adapter_rank", 0)  # GatedTrunk reads an int or one rank per expert
        top_rank = rank if isinstance(rank, int) else max(rank, default=0)
        film = bool(kw.pop("film", True))
        width = int(
            kw.pop("width", GatedTrunk.widest(H, E, layer.expert_flops_per_token() // 2, top_rank, film))
        )
        per_pair = int(kw.pop("width_per_pair", 0))
        module = GatedTrunk(H, E, k, width=width, film=film, adapter_rank=rank, width_per_pair=per_pair)
        if init != "random":
            trunk_from_experts(module, layer, kw.pop("usage", None), init)
        return module
    raise UserError(f"Unknown understudy arch {arch!r}; choose one of: {', '.join(ARCHS)}.")


def cost_ratio(module: nn.Module, layer: MoELayer) -> float:
    """Understudy FLOPs per token over the layer's active routed-expert FLOPs per token."""
    return module.flops_per_token() / layer.active_expert_flops_per_token()
