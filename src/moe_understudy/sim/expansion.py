"""More experts (ranks) than the captured model has: a sibling split fitted to the captured routing.

Each captured expert splits into siblings with load shares drawn from a Dirichlet; a token's
sibling follows its best other expert (co-activation kept). The split's two parameters are fitted
by regrouping the captured experts at random and splitting them back (`fit_expansion`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from moe_understudy.sim.traces import RoutingTrace

_MIX = (0x1E3779B97F4A7C15, 0x3F58476D1CE4E5B9, 0x14D049BB133111EB, 0x2545F4914F6CDD1D)


def hashed_uniform(*keys: torch.Tensor, salt: int = 0) -> torch.Tensor:
    """A fixed pseudo-random number in [0, 1) for every element of the broadcast integer `keys` (splitmix-style)."""
    x = torch.full((), salt, dtype=torch.int64)
    for key, mult in zip(keys, _MIX, strict=False):
        x = x + key.long() * mult
    x = (x ^ (x >> 30)) * 0x3F58476D1CE4E5B9
    x = (x ^ (x >> 27)) * 0x14D049BB133111EB
    x = x ^ (x >> 31)
    return (x & ((1 << 53) - 1)).double() / float(1 << 53)


@dataclass(frozen=True)
class Expansion:
    """How each of E experts becomes `factor` siblings (ids ``e * factor + j``).

    alpha:   concentration of the Dirichlet(alpha, ..., alpha) shares of e's load among its siblings,
             drawn once per (layer, expert); inf gives equal shares (plain random siblings).
    context: fraction of assignments whose sibling is fixed by the token's context (its best other
             expert, the way fine-grained experts specialise on co-activated contexts) rather than
             drawn per assignment; either way the sibling follows the shares, and a token's sibling
             is the same every time it is replayed.
    """

    factor: int
    alpha: float = math.inf
    context: float = 0.0
    seed: int = 0


class SiblingSplit:
    """The fixed random structure of one `Expansion` over `num_layers` layers of `num_experts` parents."""

    def __init__(self, expansion: Expansion, num_layers: int, num_experts: int):
        f, L, E = expansion.factor, num_layers, num_experts
        self.expansion, self.num_parents = expansion, E
        if math.isinf(expansion.alpha):
            shares = torch.full((L, E, f), 1.0 / f, dtype=torch.float64)
        else:
            rng = np.random.default_rng(expansion.seed)
            shares = torch.from_numpy(rng.dirichlet([expansion.alpha] * f, size=(L, E)))
        self.shares = shares  # [L, E, f]
        self.cdf = shares.cumsum(-1)
        u = torch.rand(L, E, E + 1, generator=torch.Generator().manual_seed(expansion.seed + 1))
        self.by_context = self._pick(u, self.cdf[:, :, None, :])  # [L, E, E + 1] sibling per context

    @staticmethod
    def _pick(u: torch.Tensor, cdf: torch.Tensor) -> torch.Tensor:
        return (u[..., None] >= cdf).sum(-1).clamp(max=cdf.shape[-1] - 1)

    @property
    def num_experts(self) -> int:
        return self.num_parents * self.expansion.factor

    def children(
        self, layer: int, indices: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor
    ) -> torch.Tensor:
        """(T, k) sibling ids for parents `indices` (T, k) of tokens `rows` (T,) (their trace rows)."""
        f, E = self.expansion.factor, self.num_parents
        T, k = indices.shape
        best = torch.argsort(-weights.float(), dim=-1, stable=True)
        top1 = indices.gather(1, best[:, :1])
        top2 = indices.gather(1, best[:, 1:2]) if k > 1 else torch.full_like(top1, E)
        context = torch.where(indices == top1, top2, top1)  # (T, k) the token's best other expert
        r = rows[:, None].expand(T, k)
        drawn = self._pick(
            hashed_uniform(r, indices, torch.tensor(layer), salt=self.expansion.seed),
            self.cdf[layer][indices],
        )
        keyed = self.by_context[layer][indices, context]
        coin = hashed_uniform(r, indices, torch.tensor(layer), salt=self.expansion.seed + 7)
        local = torch.where(coin < self.expansion.context, keyed, drawn)
        # A token picks distinct experts: a parent chosen twice (only when coarsened) takes the next sibling.
        for j in range(1, k):
            for _ in range(f):
                clash = (
                    (indices[:, :j] == indices[:, j : j + 1]) & (local[:, :j] == local[:, j : j + 1])
                ).any(1)
                if not clash.any():
                    break
                local[clash, j] = (local[clash, j] + 1) % f
        return indices * f + local

    def local_candidates(
        self,
        layer: int,
        logits: torch.Tensor,
        indices: torch.Tensor,
        weights: torch.Tensor,
        children: torch.Tensor,
        home: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Expanded policies' one local candidate per token when every rank holds one sibling (rank = id).

        The sibling on the token's own rank `home` (T,) is a candidate unless the token already chose it;
        its router probability is its parent's times its share (the siblings split the parent's
        probability as they split its load), scaled by the token's top-k normaliser as in
        `policies.expanded_candidates`. Missing candidates have index E x f and weight 0.
        """
        f = self.expansion.factor
        probs = torch.softmax(logits.float(), dim=-1)  # (T, E) parents
        parent, j = home // f, home % f
        p = probs.gather(1, parent[:, None]).squeeze(1) * self.shares[layer][parent, j].float()
        normaliser = weights.float().sum(-1) / probs.gather(1, indices).sum(-1).clamp_min(1e-20)
        taken = (children == home[:, None]).any(1)
        idx = torch.where(taken, torch.full_like(home, self.num_experts), home)
        w = torch.where(taken, torch.zeros_like(p), p * normaliser)
        return idx[:, None], w[:, None].to(weights.dtype)


def routing_stats(indices: torch.Tensor, num_experts: int, block_size: int) -> dict[str, float]:
    """What the expansion must keep, for one layer's (T, k) choices over `num_experts` experts.

    max_over_mean / load_cv: expert load skew over all T tokens;
    coactivation_sd: spread of co-activation, the standard deviation over expert pairs (with at least
    20 co-choices expected under independence) of log(observed / expected co-choices);
    block_dispersion: burstiness, the variance / mean of each expert's count per block of `block_size`
    consecutive tokens (1 for independent tokens), averaged over experts.
    """
    T = indices.shape[0]
    load = torch.bincount(indices.reshape(-1), minlength=num_experts).double()
    x = torch.zeros(T, num_experts).scatter_(1, indices, 1.0)
    co = (x.T @ x).double()
    n = torch.diag(co)
    expected = n[:, None] * n[None, :] / T
    pairs = torch.triu(torch.ones_like(co, dtype=torch.bool), diagonal=1) & (expected >= 20)
    lift = torch.log((co[pairs] + 0.5) / (expected[pairs] + 0.5))
    blocks = T // block_size
    per_block = x[: blocks * block_size].view(blocks, block_size, num_experts).sum(1).double()
    mean = per_block.mean(0)
    used = mean > 0
    return {
        "max_over_mean": float(load.max() / load.mean()),
        "load_cv": float(load.std() / load.mean()),
        "coactivation_sd": float(lift.std()) if lift.numel() > 1 else 0.0,
        "block_dispersion": float((per_block.var(0)[used] / mean[used]).mean()) if blocks > 1 else 1.0,
    }


def mean_stats(trace_indices: torch.Tensor, num_experts: int, block_size: int) -> dict[str, float]:
    """`routing_stats` averaged over the layers of [L, T, k] choices."""
    per = [routing_stats(i, num_experts, block_size) for i in trace_indices]
    return {key: sum(p[key] for p in per) / len(per) for key in per[0]}


@dataclass(frozen=True)
class ExpansionFit:
    """The fitted expansion and the evidence: statistics of the real routing, of the coarsen-then-
    expand round trip with the fitted and with plain random siblings, and the grid's losses."""

    expansion: Expansion
    real: dict[str, float]
    fitted: dict[str, float]
    random_siblings: dict[str, float]
    loss: float
    random_loss: float
    grid: list[dict]

    def to_dict(self) -> dict:
        return {
            "expansion": expansion_dict(self.expansion),
            "method": (
                "round trip: the captured E experts are grouped at random into E / f parents, each "
                "parent's assignments are split back into f siblings by the expansion, and the grid "
                "point whose statistics are closest to the captured ones (sum of squared log ratios "
                "over the statistics) is the fit"
            ),
            "real": self.real,
            "fitted_round_trip": self.fitted,
            "random_siblings_round_trip": self.random_siblings,
            "loss": self.loss,
            "random_siblings_loss": self.random_loss,
            "grid": self.grid,
        }


def _finite(x: float) -> float | str:
    return "inf" if math.isinf(x) else x


def expansion_dict(expansion: Expansion) -> dict:
    """The expansion as JSON-safe values (alpha inf as "inf")."""
    return {**asdict(expansion), "alpha": _finite(expansion.alpha)}


ALPHAS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, math.inf)
CONTEXTS = (0.0, 0.25, 0.5, 0.75, 1.0)


def fit_expansion(
    trace: RoutingTrace,
    factor: int,
    block_size: int,
    alphas: tuple[float, ...] = ALPHAS,
    contexts: tuple[float, ...] = CONTEXTS,
    max_tokens: int = 32768,
    seed: int = 0,
) -> ExpansionFit:
    """Fit an `Expansion` by `factor` to the captured skew, co-activation and burstiness of `trace`.

    Round trip: the E captured experts are grouped at random into E / factor parents (a parent's
    assignments are its members'), every grid (alpha, context) splits the parents back into `factor`
    siblings, and the statistics of `routing_stats` of the result are compared with the captured
    ones. The best grid point is then used to split the captured experts themselves (E -> E x factor),
    on the assumption that load divides the same way at the next granularity.
    """
    E = trace.num_experts
    if E % factor:
        raise ValueError(f"{E} experts do not split into groups of {factor}.")
    T = min(trace.num_tokens, max_tokens // block_size * block_size)
    indices, weights = trace.indices[:, :T], trace.weights[:, :T]
    rows = torch.arange(T)
    group = torch.randperm(E, generator=torch.Generator().manual_seed(seed)) // factor  # expert -> parent
    members = torch.argsort(group * E + torch.arange(E))  # parent-major list of experts
    rank_in_parent = torch.empty(E, dtype=torch.long)
    rank_in_parent[members] = torch.arange(E) % factor
    relabel = group * factor + rank_in_parent  # the real experts named like siblings (stats ignore names)
    real = mean_stats(relabel[indices], E, block_size)

    def round_trip(alpha: float, context: float) -> dict[str, float]:
        split = SiblingSplit(Expansion(factor, alpha, context, seed), trace.num_layers, E // factor)
        out = [split.children(ly, group[indices[ly]], weights[ly], rows) for ly in range(trace.num_layers)]
        return mean_stats(torch.stack(out), E, block_size)

    def loss(stats: dict[str, float]) -> float:
        return sum(math.log(max(stats[key], 1e-9) / max(real[key], 1e-9)) ** 2 for key in real)

    grid = []
    for alpha in alphas:
        for context in contexts:
            stats = round_trip(alpha, context)
            grid.append({"alpha": _finite(alpha), "context": context, "loss": loss(stats), **stats})
    best = min(grid, key=lambda g: g["loss"])
    alpha = math.inf if best["alpha"] == "inf" else float(best["alpha"])
    plain = round_trip(math.inf, 0.0)
    return ExpansionFit(
        expansion=Expansion(factor, alpha, best["context"], seed),
        real=real,
        fitted={k: best[k] for k in real},
        random_siblings=plain,
        loss=best["loss"],
        random_loss=loss(plain),
        grid=grid,
    )
