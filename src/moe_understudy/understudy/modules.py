"""Compact stand-ins for the routed part of one MoE layer.

Token-level understudies (`TokenStandIn`, moe/standins.py) map block inputs x (T, H) to an
approximation of the layer's ROUTED output (shared experts excluded: they stay local and are always
computed): dense, lowrank, merged (dense warm-started from the experts) and small_moe.
Assignment-level stand-ins (`AssignmentStandIn`) are called like `MoELayer.experts(x, indices,
weights)` and replace single overflowing assignments: `Shadows`, one small stand-in per expert.

Every module reports `param_count()`, `memory_expert_equiv()` and its FLOPs (multiply-adds x2) so
its cost can be stated next to the layer's active routed-expert FLOPs (`cost_ratio`). `config()`
returns the keyword arguments that rebuild the same shapes; `io.py` stores it next to the weights.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moe_understudy.errors import UserError
from moe_understudy.moe.adapters import MoELayer
from moe_understudy.moe.standins import AssignmentStandIn, TokenStandIn
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


def _swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """x (T, H), gate_up (2I, H), down (H, I) -> (T, H): down(silu(gate x) * up x)."""
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)  # (T, I) each
    return F.linear(F.silu(gate) * up, down)


def _init_linear(weight: torch.Tensor, fan_in: int, scale: float = 1.0) -> None:
    nn.init.normal_(weight, std=scale / math.sqrt(fan_in))


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
        _init_linear(self.gate_up, hidden_size)
        _init_linear(
            self.down, intermediate, scale=0.1
        )  # small output at start: error begins near 1, not above

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _swiglu(x, self.gate_up, self.down)

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
        _init_linear(self.inp, hidden_size)
        _init_linear(self.gate_up, rank)
        _init_linear(self.mid, intermediate)
        _init_linear(self.out, rank, scale=0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.linear(x, self.inp)  # (T, r)
        return F.linear(_swiglu(z, self.gate_up, self.mid), self.out)  # (T, r) -> (T, H)

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
        y = _swiglu(x[token], gate_up[e], down[e]) * weights[token, slot, None].to(x.dtype)
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
        _init_linear(self.router, hidden_size)
        _init_linear(self.gate_up, hidden_size)
        _init_linear(self.down, intermediate, scale=0.1)

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


class Shadows(AssignmentStandIn):
    """One compressed stand-in per expert, S_e(x) ~ E_e(x): narrow SwiGLU ("swiglu") or rank-r linear ("lowrank").

    `forward(x, indices, weights)` has the contract of `MoELayer.experts`.
    """

    arch = "shadows"

    def __init__(
        self, hidden_size: int, num_experts: int, top_k: int, kind: str = "swiglu", width: int = 64
    ) -> None:
        super().__init__(hidden_size)
        if kind not in ("swiglu", "lowrank"):
            raise UserError(f"Unknown shadow kind {kind!r}; use 'swiglu' or 'lowrank'.")
        if width <= 0:
            raise UserError(f"Shadow width (intermediate or rank) must be positive, got {width}.")
        self.num_experts = num_experts
        self.top_k = top_k
        self.kind = kind
        self.width = width
        rows = 2 * width if kind == "swiglu" else width
        self.inp = nn.Parameter(torch.empty(num_experts, rows, hidden_size))  # (E, 2w or w, H)
        self.out = nn.Parameter(torch.empty(num_experts, hidden_size, width))  # (E, H, w)
        _init_linear(self.inp, hidden_size)
        _init_linear(self.out, width, scale=0.1)

    def _expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """Shadow of expert e on x (A, H) -> (A, H)."""
        if self.kind == "swiglu":
            return _swiglu(x, self.inp[e], self.out[e])
        return F.linear(F.linear(x, self.inp[e]), self.out[e])

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """x (T, H), indices/weights (T, k) -> (T, H); an index equal to num_experts is skipped.

        The served pairs are sorted by expert once and each shadow runs on its contiguous slice
        (one host sync for the counts, one scatter at the end), as grouped-GEMM MoE kernels do.
        """
        k = indices.shape[1]
        flat = indices.reshape(-1)
        pairs = (flat < self.num_experts).nonzero().squeeze(1)
        out = torch.zeros_like(x)
        if pairs.numel() == 0:
            return out
        experts, order = flat.index_select(0, pairs).sort(stable=True)
        pairs = pairs.index_select(0, order)
        tokens = pairs // k
        counts = torch.bincount(experts, minlength=self.num_experts).tolist()
        slices = x.index_select(0, tokens).split(counts)
        y = torch.cat([self._expert(rows, e) for e, rows in enumerate(slices) if rows.shape[0]])
        return out.index_add_(0, tokens, y * weights.reshape(-1).index_select(0, pairs).to(x.dtype)[:, None])

    def flops_per_assignment(self) -> int:
        per = 3 if self.kind == "swiglu" else 2
        return 2 * per * self.hidden_size * self.width

    def config(self) -> dict[str, Any]:
        return {
            "hidden_size": self.hidden_size,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "kind": self.kind,
            "width": self.width,
        }


class GatedTrunk(AssignmentStandIn):
    """One SwiGLU trunk per layer for all its experts, conditioned on the expert: S(x, e) ~ E_e(x).

        g, u = G x, U x                                   (w,) each, once per token
        h_e  = silu(g + c_e) * (u + d_e) * s_e            per (token, expert): FiLM on the hidden units
        sum_e w_e S(x, e) = D (sum_e w_e h_e)             one down projection for all of a token's assignments

    G/U (w, H), D (H, w) shared; s_e, c_e, d_e (w,) per expert (`film=False` keeps only the scales s_e).
    All of a token's stand-in-served assignments cost one trunk pass (6 H w FLOPs) plus about 8 w
    elementwise FLOPs each, so the cost per served assignment falls as more of a token overflows. Memory
    is 3 H w + 3 E w parameters: at w = I / 2 about half a routed expert plus the per-expert vectors.

    `adapter_rank` r > 0 adds a per-expert low-rank linear correction, S(x, e) += B_e A_e x with A_e (r, H)
    and B_e (H, r) (B starts at zero, so the trunk is unchanged at the start): 2 H E r more parameters and
    4 H r more FLOPs per served assignment, for expert-specific directions the shared hidden units miss.
    """

    arch = "trunk"

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        width: int,
        film: bool = True,
        adapter_rank: int = 0,
    ) -> None:
        super().__init__(hidden_size)
        if width <= 0 or adapter_rank < 0:
            raise UserError(
                f"The trunk needs a positive width and a non-negative adapter rank, got {width} and {adapter_rank}."
            )
        self.num_experts, self.top_k, self.width, self.film = num_experts, top_k, width, film
        self.adapter_rank = adapter_rank
        self.gate_up = nn.Parameter(torch.empty(2 * width, hidden_size))  # (2w, H): G rows then U rows
        self.down = nn.Parameter(torch.empty(hidden_size, width))  # (H, w)
        self.scale = nn.Parameter(torch.ones(num_experts, width))  # s_e
        self.shift = nn.Parameter(torch.zeros(num_experts, 2, width)) if film else None  # c_e, d_e
        _init_linear(self.gate_up, hidden_size)
        _init_linear(self.down, width, scale=0.1)
        if adapter_rank:
            self.adapter_in = nn.Parameter(torch.empty(num_experts, adapter_rank, hidden_size))  # A_e
            self.adapter_out = nn.Parameter(torch.zeros(num_experts, hidden_size, adapter_rank))  # B_e
            _init_linear(self.adapter_in, hidden_size)

    @property
    def intermediate(self) -> int:  # the name merge_experts_into reads
        return self.width

    def _adapted(self, x: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """x (P, H), experts (P,) -> (P, H): each pair's B_e A_e x, with its expert's matrices gathered."""
        z = torch.bmm(self.adapter_in.index_select(0, experts), x[:, :, None])  # (P, r, 1)
        return torch.bmm(self.adapter_out.index_select(0, experts), z).squeeze(-1)

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """x (T, H), indices/weights (T, k) -> (T, H) weighted sum over assignments; index E is skipped.

        Works on the served (token, expert) pairs only, with one gather of each pair's FiLM vectors:
        the trunk pass is cheap, so on small layers gathers and elementwise passes set the time.
        """
        T, k = indices.shape
        W, E = self.width, self.num_experts
        valid = indices < E  # (T, k)
        pairs = valid.reshape(-1).nonzero().squeeze(1)  # (P,) flat (token, slot) positions
        out = torch.zeros_like(x)
        if pairs.numel() == 0:
            return out
        has = valid.any(-1)
        rows = has.nonzero().squeeze(1)  # (R,) tokens with a served assignment
        row_of_pair = (has.cumsum(0) - 1).index_select(0, pairs // k)  # (P,) into rows
        gu = F.linear(x.index_select(0, rows), self.gate_up).index_select(0, row_of_pair)  # (P, 2w)
        experts = indices.reshape(-1).index_select(0, pairs)
        per_expert = (
            self.scale if self.shift is None else torch.cat([self.shift.reshape(E, 2 * W), self.scale], 1)
        )
        cond = F.embedding(experts, per_expert)  # (P, [2w shifts +] w scales)
        if self.shift is not None:
            gu = gu.add_(cond[:, : 2 * W])
        weight = weights.reshape(-1).index_select(0, pairs).to(x.dtype)[:, None]
        h = F.silu(gu[:, :W]).mul_(gu[:, W:]).mul_(cond[:, -W:]).mul_(weight)  # (P, w)
        hidden = torch.zeros(rows.numel(), W, dtype=x.dtype, device=x.device).index_add_(0, row_of_pair, h)
        served = F.linear(hidden, self.down)
        if self.adapter_rank:
            x_pairs = x.index_select(0, pairs // k)
            served.index_add_(0, row_of_pair, self._adapted(x_pairs, experts).mul_(weight))
        return out.index_copy_(0, rows, served)

    def _hidden(self, g: torch.Tensor, u: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """g, u (R, w), idx (R, n) -> (R, n, w): each expert's conditioned hidden units."""
        if self.shift is not None:
            shift = self.shift[idx]  # (R, n, 2, w)
            h = F.silu(g[:, None] + shift[:, :, 0]) * (u[:, None] + shift[:, :, 1])
        else:
            h = (F.silu(g) * u)[:, None]
        return h * self.scale[idx]

    def pair_outputs(self, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """x (N, H), indices (N, n) -> (N, n, H): one trunk pass per token, one down projection per pair."""
        g, u = F.linear(x, self.gate_up).chunk(2, dim=-1)
        out = F.linear(self._hidden(g, u, indices), self.down)
        if self.adapter_rank:
            N, n = indices.shape
            flat = self._adapted(x[:, None].expand(N, n, -1).reshape(N * n, -1), indices.reshape(-1))
            out = out + flat.view(N, n, -1)
        return out

    def _pair_flops(self) -> int:
        """FLOPs of one served assignment beyond the token's trunk pass: FiLM, and the adapter if any."""
        return 8 * self.width + 4 * self.hidden_size * self.adapter_rank

    def flops_per_assignment(self) -> float:
        return 6 * self.hidden_size * self.width + self._pair_flops()

    def token_flops(self, served: torch.Tensor) -> torch.Tensor:
        """(T,) one trunk pass per token with any served assignment, plus the per-assignment work."""
        n = served.sum(-1).double()
        return (n > 0).double() * (6 * self.hidden_size * self.width) + n * self._pair_flops()

    def config(self) -> dict[str, Any]:
        return {
            "hidden_size": self.hidden_size,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "width": self.width,
            "film": self.film,
            "adapter_rank": self.adapter_rank,
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
               about I // 2), film (default True), adapter_rank (default 0: none),
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
        rank = int(kw.pop("adapter_rank", 0))
        width = int(kw.pop("width", max(1, (3 * H * inter - 4 * H * rank) // (6 * H + 8))))
        module = GatedTrunk(H, E, k, width=width, film=bool(kw.pop("film", True)), adapter_rank=rank)
        if init != "random":
            trunk_from_experts(module, layer, kw.pop("usage", None), init)
        return module
    raise UserError(f"Unknown understudy arch {arch!r}; choose one of: {', '.join(ARCHS)}.")


def cost_ratio(module: nn.Module, layer: MoELayer) -> float:
    """Understudy FLOPs per token over the layer's active routed-expert FLOPs per token."""
    return module.flops_per_token() / layer.active_expert_flops_per_token()
