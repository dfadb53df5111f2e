"""Assignment-level stand-ins: called like `MoELayer.experts(x, indices, weights)`, they serve single
overflowing (token, expert) assignments. `Shadows` holds one small stand-in per expert; `GatedTrunk`
one SwiGLU trunk for all experts of a layer, conditioned on the expert (bounded memory).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moe_understudy.errors import UserError
from moe_understudy.moe.standins import AssignmentStandIn
from moe_understudy.understudy.functional import init_linear
from moe_understudy.understudy.ladder import ladder_forward, prefix_pair_outputs, row_widths, rungs


def _grouped_mm_runs(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether torch's grouped GEMM takes these operands: fp32/bf16/fp16 on CPU from torch 2.11, both
    feature sizes and every stride in whole 16-byte units and both addresses 16-byte aligned (the
    kernel refuses anything else: shadows of width 1, say). Elsewhere the loop serves: the CUDA
    kernel (bf16 from SM 8.0) has layout rules of its own that no test here has run."""
    if not hasattr(F, "grouped_mm") or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if x.device.type != "cpu" or tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 11):
        return False
    unit = 16 // x.element_size()  # elements per 16 bytes
    out_features, in_features = weight.shape[1], weight.shape[2]
    strides = [s for s in (*x.stride(), *weight.stride()) if s != 1]
    return (
        out_features % unit == 0
        and in_features % unit == 0
        and all(s % unit == 0 for s in strides)
        and x.data_ptr() % 16 == 0
        and weight.data_ptr() % 16 == 0
    )


def expert_order(experts: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, ends): the pairs sorted by expert (stable), and each expert's cumulative pair count
    (E,) int32, the group boundaries `grouped_linear` takes."""
    sorted_experts, order = experts.sort(stable=True)
    ends = torch.bincount(sorted_experts, minlength=num_experts).cumsum(0).to(torch.int32)
    return order, ends


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """x (P, in) sorted by group, weight (G, out, in), ends (G,) -> (P, out): F.linear(x[rows of group g],
    weight[g]) for every group g.

    One grouped GEMM where torch has one (the kernel transformers runs the routed experts with by
    default, so stand-in and experts are timed on the same kind of kernel), else a loop over the
    groups (one host sync for the counts).
    """
    if _grouped_mm_runs(x, weight):
        return F.grouped_mm(x, weight.transpose(1, 2), offs=ends)
    return torch.cat([F.linear(part, weight[g]) for g, part in enumerate(x.split(_group_sizes(ends)))])


def _group_sizes(ends: torch.Tensor) -> list[int]:
    """Each group's row count from the cumulative `ends` (one host sync)."""
    return torch.diff(ends, prepend=ends.new_zeros(1)).tolist()


def by_expert(
    x: torch.Tensor, rows: torch.Tensor, experts: torch.Tensor, num_experts: int, fn
) -> tuple[torch.Tensor, torch.Tensor]:
    """fn(x[rows of expert e's pairs], e) for each expert, on one contiguous slice per expert.

    rows, experts (P,): each pair's row of x and its expert. Returns (y, order): y (P, H) holds the
    outputs sorted by expert, y[i] belonging to pair order[i]. The pairs are sorted once and x is
    gathered once (one host sync for the counts), as grouped-GEMM MoE kernels do.
    """
    order, ends = expert_order(experts, num_experts)
    slices = x.index_select(0, rows.index_select(0, order)).split(_group_sizes(ends))
    return torch.cat([fn(part, e) for e, part in enumerate(slices) if len(part)]), order


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
        init_linear(self.inp, hidden_size)
        init_linear(self.out, width, scale=0.1)

    def _grouped(self, x: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        """x (A, H), its rows sorted by expert with boundaries `ends` -> (A, H): each row's shadow."""
        h = grouped_linear(x, self.inp, ends)
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        return grouped_linear(h, self.out, ends)

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """x (T, H), indices/weights (T, k) -> (T, H); an index equal to num_experts is skipped.

        The served pairs are sorted by expert once and every shadow's products are one grouped GEMM
        (`grouped_linear`); one scatter at the end sums them per token.
        """
        k = indices.shape[1]
        flat = indices.reshape(-1)
        pairs = (flat < self.num_experts).nonzero().squeeze(1)
        out = torch.zeros_like(x)
        if pairs.numel() == 0:
            return out
        order, ends = expert_order(flat.index_select(0, pairs), self.num_experts)
        pairs = pairs.index_select(0, order)
        tokens = pairs // k
        y = self._grouped(x.index_select(0, tokens), ends)
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


# Served rows from this fraction of a batch up: the trunk runs on every row (see GatedTrunk.forward).
_EVERY_ROW_FROM = 0.8


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
    A sequence of E ranks gives each expert its own r_e (`overflow_ranks` spends a budget where the
    overflow goes): 2 H sum(r_e) parameters, 4 H r_e FLOPs per pair served for expert e. The A_e are
    stored stacked, (sum r_e, H), and so are the B_e transposed.
    """

    arch = "trunk"
    QUANTIZABLE = ("gate_up", "down", "scale", "shift", "adapter_in", "adapter_out")

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        width: int,
        film: bool = True,
        adapter_rank: int | Sequence[int] = 0,
        width_per_pair: int = 0,
    ) -> None:
        super().__init__(hidden_size)
        ranks = (
            (adapter_rank,) * num_experts if isinstance(adapter_rank, int) else tuple(map(int, adapter_rank))
        )
        if width <= 0 or len(ranks) != num_experts or min(ranks) < 0:
            raise UserError(
                f"The trunk needs a positive width and a non-negative adapter rank (or one per expert, "
                f"{num_experts} of them), got {width} and {adapter_rank}."
            )
        if width_per_pair < 0 or (width_per_pair and (film or max(ranks) > 0)):
            raise UserError(
                f"A width ladder (width_per_pair {width_per_pair}) needs a non-negative value and the trunk "
                "without FiLM shifts or adapters; pass --no-film and --adapter-rank 0, or --width-per-pair 0."
            )
        self.num_experts, self.top_k, self.width, self.film = num_experts, top_k, width, film
        self.width_per_pair = min(width_per_pair, width)  # 0: every row runs the whole width (ladder.py)
        self.adapter_ranks = ranks
        self.adapter_rank = max(ranks)  # what a lone served assignment costs at the most
        self._adapter_start = [0, *itertools.accumulate(ranks)]
        self._rank_of = torch.tensor([*ranks, 0], dtype=torch.float64)  # by expert; index E: unserved
        self.gate_up = nn.Parameter(torch.empty(2 * width, hidden_size))  # (2w, H): G rows then U rows
        self.down = nn.Parameter(torch.empty(hidden_size, width))  # (H, w)
        self.scale = nn.Parameter(torch.ones(num_experts, width))  # s_e
        self.shift = nn.Parameter(torch.zeros(num_experts, 2, width)) if film else None  # c_e, d_e
        init_linear(self.gate_up, hidden_size)
        init_linear(self.down, width, scale=0.1)
        if self.adapter_rank:
            self.adapter_in = nn.Parameter(torch.empty(sum(ranks), hidden_size))  # A_e stacked
            self.adapter_out = nn.Parameter(torch.zeros(sum(ranks), hidden_size))  # B_e^T stacked
            init_linear(self.adapter_in, hidden_size)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # folders saved before per-expert ranks hold A as (E, r, H) and B as (E, H, r): stack them
        a, b = state_dict.get(prefix + "adapter_in"), state_dict.get(prefix + "adapter_out")
        if a is not None and a.dim() == 3:
            state_dict[prefix + "adapter_in"] = a.reshape(-1, a.shape[-1])
        if b is not None and b.dim() == 3:
            state_dict[prefix + "adapter_out"] = b.transpose(1, 2).reshape(-1, b.shape[1])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def intermediate(self) -> int:  # the name merge_experts_into reads
        return self.width

    def _adapted(self, x: torch.Tensor, rows: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """x (N, H), rows/experts (P,) -> (P, H): B_e A_e x[row] for each pair, in pair order."""
        y, order = self._adapted_by_expert(x, rows, experts)
        return torch.empty_like(y).index_copy_(0, order, y)

    def _adapted_by_expert(
        self, x: torch.Tensor, rows: torch.Tensor, experts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(y, order): y[i] = B_e A_e x[row] of pair order[i], the pairs sorted by expert.

        With one rank for every expert the A_e and B_e are (E, r, H) and (E, H, r) views of the
        stacks and both products are one grouped GEMM each (`grouped_linear`); with ranks per expert,
        one pair of products per expert on its slice (`by_expert`). Gathering an (r, H) matrix per pair
        for a batched product instead moved 14x more bytes and cost 5x the time of the grouped form.
        """
        if len(set(self.adapter_ranks)) > 1:
            return by_expert(x, rows, experts, self.num_experts, self._expert_adapter)
        order, ends = expert_order(experts, self.num_experts)
        E, r, H = self.num_experts, self.adapter_rank, self.hidden_size
        low = grouped_linear(
            x.index_select(0, rows.index_select(0, order)), self.weight("adapter_in").view(E, r, H), ends
        )
        return grouped_linear(low, self.weight("adapter_out").view(E, r, H).transpose(1, 2), ends), order

    def _expert_adapter(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """x (n, H) -> (n, H): B_e A_e x (zeros for an expert of rank 0)."""
        a, b = self._adapter_start[e], self._adapter_start[e + 1]
        if a == b:
            return torch.zeros_like(x)
        return F.linear(x, self.weight("adapter_in")[a:b]) @ self.weight("adapter_out")[a:b]

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """x (T, H), indices/weights (T, k) -> (T, H) weighted sum over assignments; index E is skipped.

        Works on the served (token, expert) pairs only. The trunk pass is cheap, so gathers and
        elementwise passes set much of the time, the more so on the serving path, right after the
        experts, where every op and pass over a (P, w) tensor costs 2-3x what it does hot. So G x
        and U x are one (R, 2w) product (two products of w rows cost ~15% more), gathered to pairs
        in one op; each pair's weight is folded into its scale s_e; when no token has two served
        pairs the gather to pairs and the sum over them are skipped; the adapters' outputs are
        summed in by_expert's order (no scatter back to pair order). When most rows have a served
        pair (with top-8 routing at cf 1, 99% of them), the trunk runs on every row instead: the
        rows without one come out exactly zero, and the gather of the served rows and the scatter
        back (a third of the time there) are gone. Measured and not kept: a dense (R, k, w) form
        over the served rows with unserved slots masked (10% slower at top-2, 1.85 slots per
        served pair), and serving each row's first pair in place while gathering only the others
        (more small ops than it saved).
        """
        if self.width_per_pair:
            return ladder_forward(self, x, indices, weights)
        k, E = indices.shape[1], self.num_experts
        valid = indices < E
        served_row = valid.any(1)
        num_rows = int(served_row.sum())
        if num_rows == 0:
            return torch.zeros_like(x)
        rows = None if num_rows >= _EVERY_ROW_FROM * x.shape[0] else served_row.nonzero().squeeze(1)
        gu = F.linear(x if rows is None else x.index_select(0, rows), self.weight("gate_up"))  # (R, 2w): g, u
        if self.shift is None:
            # Nothing depends on the pair but its weight and expert: no pair list for the trunk.
            on_rows = (
                (indices, weights)
                if rows is None
                else (indices.index_select(0, rows), weights.index_select(0, rows))
            )
            served = F.linear(self._unshifted_hidden(gu, *on_rows), self.weight("down"))
        if self.shift is not None or self.adapter_rank:
            tokens, slots = valid.nonzero().unbind(1)  # (P,) each, tokens ascending
            # each pair's row of gu: its token, or the token's place among the served rows
            row_of_pair = tokens if rows is None else (served_row.cumsum(0) - 1).index_select(0, tokens)
            flat = tokens * k + slots
            experts = indices.reshape(-1).index_select(0, flat)
            weight = weights.reshape(-1).index_select(0, flat).to(x.dtype)[:, None]
            if self.shift is not None:
                one_per_row = rows is not None and rows.shape[0] == tokens.shape[0]
                hidden = self._shifted_hidden(gu, row_of_pair, experts, weight, one_per_row)
                served = F.linear(hidden, self.weight("down"))
            if self.adapter_rank:
                y, order = self._adapted_by_expert(x, tokens, experts)  # y in expert order
                served.index_add_(
                    0, row_of_pair.index_select(0, order), y.mul_(weight.index_select(0, order))
                )
        return served if rows is None else torch.zeros_like(x).index_copy_(0, rows, served)

    def _unshifted_hidden(
        self, gu: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """(R, w) sum over each row's served pairs (indices (R, k), E = not served) of w_e s_e * silu(g) * u.

        Without FiLM shifts the hidden units do not depend on the expert, so the sum is
        silu(g) * u * (sum_e w_e s_e) and the per-row mix of scales is one (R, E) x (E, w) product:
        no (P, w) tensor is made, which with top-8 routing (several served pairs per row) is most
        of the pair form's passes. The mix is one scatter of the (R, k) weights, the unserved slots
        into a spare column E.
        """
        W, E = self.width, self.num_experts
        mix = gu.new_zeros(gu.shape[0], E + 1).scatter_add_(1, indices, weights.to(gu.dtype))
        return F.silu(gu[:, :W].contiguous()).mul_(gu[:, W:]).mul_(mix[:, :E] @ self.weight("scale"))

    def _shifted_hidden(
        self,
        gu: torch.Tensor,
        row_of_pair: torch.Tensor,
        experts: torch.Tensor,
        weight: torch.Tensor,
        one_per_row: bool,
    ) -> torch.Tensor:
        """(R, w) sum over each row's pairs of w_e s_e * silu(g + c_e) * (u + d_e)."""
        W, E, rows = self.width, self.num_experts, gu.shape[0]
        if not one_per_row:
            gu = gu.index_select(0, row_of_pair)  # (P, 2w)
        g, u = gu[:, :W], gu[:, W:]  # (P, w) each, rows 2w apart
        shift = F.embedding(experts, self.weight("shift").view(E, 2 * W))  # (P, 2w): c_e, d_e
        # g + c_e out of place, so that silu reads a contiguous g: on the strided half of gu it
        # loops row by row (each row's tail outside the vector loop) and took 2x the time
        g, u = torch.add(g, shift[:, :W]), u.add_(shift[:, W:])
        scaled = F.embedding(experts, self.weight("scale")).mul_(weight)  # (P, w): w s_e
        h = F.silu(g).mul_(u).mul_(scaled)  # (P, w)
        if one_per_row:
            return h
        return torch.zeros(rows, W, dtype=h.dtype, device=h.device).index_add_(0, row_of_pair, h)

    def _hidden(self, g: torch.Tensor, u: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """g, u (R, w), idx (R, n) -> (R, n, w): each expert's conditioned hidden units."""
        if self.shift is not None:
            shift = self.weight("shift")[idx]  # (R, n, 2, w)
            h = F.silu(g[:, None] + shift[:, :, 0]) * (u[:, None] + shift[:, :, 1])
        else:
            h = (F.silu(g) * u)[:, None]
        return h * self.weight("scale")[idx]

    def pair_outputs(self, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """x (N, H), indices (N, n) -> (N, n, H): one trunk pass per token, one down projection per pair.
        With a width ladder, a training step fits one rung drawn at random; otherwise the whole width."""
        if self.width_per_pair:
            ladder = rungs(self.width, self.width_per_pair)
            fit_one = self.training and torch.is_grad_enabled()
            w = ladder[int(torch.randint(len(ladder), ()))] if fit_one else self.width
            return prefix_pair_outputs(self, x, indices, w)
        g, u = F.linear(x, self.weight("gate_up")).chunk(2, dim=-1)
        out = F.linear(self._hidden(g, u, indices), self.weight("down"))
        if self.adapter_rank:
            N, n = indices.shape
            rows = torch.arange(N, device=x.device).repeat_interleave(n)
            out = out + self._adapted(x, rows, indices.reshape(-1)).view(N, n, -1)
        return out

    @staticmethod
    def _unit_flops(hidden_size: int, num_experts: int, film: bool) -> tuple[int, int]:
        """(per token, per served pair) FLOPs of one unit of width: the trunk pass (G/U and D), and
        FiLM per pair or, without shifts, the per-token (1, E) x (E, w) mix of the scales and the
        elementwise product."""
        return 6 * hidden_size + (0 if film else 2 * num_experts + 3), (8 if film else 0)

    @classmethod
    def widest(cls, hidden_size: int, num_experts: int, budget: float, adapter_rank: int, film: bool) -> int:
        """The widest trunk whose lone served assignment (of the expert of rank `adapter_rank`) costs
        at most `budget` FLOPs."""
        row, pair = cls._unit_flops(hidden_size, num_experts, film)
        return max(1, int(budget - 4 * hidden_size * adapter_rank) // (row + pair))

    def _row_flops(self) -> int:
        """FLOPs of the trunk pass of one token with served assignments."""
        return self._unit_flops(self.hidden_size, self.num_experts, self.film)[0] * self.width

    def _pair_flops(self, rank: int | torch.Tensor) -> int | torch.Tensor:
        """FLOPs of one served assignment beyond its token's trunk pass: FiLM, and its expert's adapter."""
        pair = self._unit_flops(self.hidden_size, self.num_experts, self.film)[1]
        return pair * self.width + 4 * self.hidden_size * rank

    def flops_per_assignment(self) -> float:
        """A lone served assignment of the expert with the largest adapter (on the ladder's first rung)."""
        if self.width_per_pair:
            return float(self.token_flops(torch.tensor([[True]]))[0])
        return self._row_flops() + self._pair_flops(self.adapter_rank)

    def token_flops(self, served: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        """(T,) one trunk pass per token with any served assignment, plus the per-assignment work
        (each pair at its expert's adapter rank given `indices` (T, k), else at the largest). When the
        forward runs the trunk on every row (most rows served), every row's pass is charged."""
        if self.width_per_pair:  # no per-pair terms: each row's pass at its rung
            unit = self._unit_flops(self.hidden_size, self.num_experts, self.film)[0]
            return row_widths(served, self.width, self.width_per_pair).double() * unit
        if indices is None:
            pair = torch.full(served.shape, float(self._pair_flops(self.adapter_rank)), dtype=torch.float64)
        else:
            pair = self._pair_flops(self._rank_of[indices.clamp(0, self.num_experts)])
        rows = served.any(-1)
        if int(rows.sum()) >= _EVERY_ROW_FROM * rows.shape[0]:
            rows = torch.ones_like(rows)  # the rows without a served pair ran the trunk too
        trunk = rows.double() * self._row_flops()
        return trunk + (pair * served).sum(-1)

    def config(self) -> dict[str, Any]:
        return {
            "hidden_size": self.hidden_size,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "width": self.width,
            "film": self.film,
            "adapter_rank": self.adapter_rank
            if len(set(self.adapter_ranks)) == 1
            else list(self.adapter_ranks),
            "width_per_pair": self.width_per_pair,
        }


def overflow_ranks(mass: torch.Tensor, total: int, cap: int) -> tuple[int, ...]:
    """Per-expert adapter ranks: `total` (at most E x cap) shared out in proportion to `mass` (E,), none
    above `cap`; what a capped expert cannot take goes to the others in proportion (water filling),
    and the largest remainders round the shares to whole ranks that sum to the total."""
    E = mass.numel()
    mass = mass.double().clamp(min=0)
    left = float(min(total, E * cap))
    share = torch.zeros(E, dtype=torch.float64)
    free = torch.ones(E, dtype=torch.bool)
    while left > 1e-9 and bool(free.any()):
        m = torch.where(free, mass, 0.0)
        part = m / m.sum() if float(m.sum()) > 0 else free.double() / free.sum()
        over = free & (part * left > cap)
        if not bool(over.any()):
            share += part * left
            break
        share[over] = cap
        free &= ~over
        left -= cap * int(over.sum())
    ranks = share.floor()
    missing = int(round(min(total, E * cap) - float(ranks.sum())))
    room = torch.where(ranks < cap, share - ranks, -1.0)
    ranks[room.argsort(descending=True)[:missing]] += 1
    return tuple(int(r) for r in ranks)
