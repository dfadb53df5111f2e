"""The trunk's width ladder: a row's pass uses as many hidden units as its served pairs pay for.

A trunk pass costs the same whether one of a token's assignments is served or eight. With top-8
routing at cf 1 a row has about three served pairs and a wide trunk costs under half an expert per
served pair; at cf 2 most served rows have one, and the same trunk costs a whole expert per pair.
With `width_per_pair` u > 0, a row with n served pairs runs only the first min(w, n u) hidden units
(G, U rows, scales and D columns are a prefix of the full trunk's), so a served pair never costs
more than u units, whatever the cf. The prefixes are trained together: each layer-wise step fits
one rung of the ladder u, 2u, ..., w drawn at random, and end-to-end steps serve every row at its
own rung. Only the trunk without FiLM shifts and without adapters has a ladder (their per-pair
terms would break the prefix sums).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rungs(width: int, per_pair: int) -> list[int]:
    """The widths a row may use: per_pair, 2 per_pair, ... up to the full width."""
    return sorted({min(width, n * per_pair) for n in range(1, -(-width // per_pair) + 1)})


def row_widths(served: torch.Tensor, width: int, per_pair: int) -> torch.Tensor:
    """(T,) hidden units each row runs for its served pairs `served` (T, k) bool (0: none served)."""
    return (served.sum(-1) * per_pair).clamp(max=width)


def prefix_weights(trunk, w: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(G;U (2w, H), scales (E, w), D (H, w)): the first w hidden units of `trunk`."""
    gate_up, W = trunk.weight("gate_up"), trunk.width
    return (
        torch.cat([gate_up[:w], gate_up[W : W + w]]),
        trunk.weight("scale")[:, :w],
        trunk.weight("down")[:, :w],
    )


def prefix_pair_outputs(trunk, x: torch.Tensor, indices: torch.Tensor, w: int) -> torch.Tensor:
    """x (N, H), indices (N, n) -> (N, n, H): S(x, e) of each pair computed on the first w units."""
    gate_up, scale, down = prefix_weights(trunk, w)
    g, u = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear((F.silu(g) * u)[:, None] * scale[indices], down)


def ladder_forward(trunk, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The trunk's forward (contract of `GatedTrunk.forward`) with each row on its own rung."""
    E = trunk.num_experts
    widths = row_widths(indices < E, trunk.width, trunk.width_per_pair)
    out = torch.zeros_like(x)
    for w in widths.unique().tolist():
        if w == 0:
            continue
        rows = (widths == w).nonzero().squeeze(1)
        gate_up, scale, down = prefix_weights(trunk, w)
        g, u = F.linear(x.index_select(0, rows), gate_up).chunk(2, dim=-1)
        mix = x.new_zeros(rows.shape[0], E + 1).scatter_add_(
            1, indices.index_select(0, rows), weights.index_select(0, rows).to(x.dtype)
        )
        out.index_copy_(0, rows, F.linear(F.silu(g).mul_(u).mul_(mix[:, :E] @ scale), down))
    return out
