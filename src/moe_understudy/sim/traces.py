"""Routing traces: what every MoE layer chose for every token, captured from a model or synthetic.

A trace is the input of the cluster simulator and of the speculative-dispatch estimator. It keeps
router logits too, so that capacity policies that need more than the top-k (reroute, score
priority) replay exactly as the runtime would run them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from moe_understudy.errors import UserError
from moe_understudy.moe.adapters import Routing, find_moe_layers


@dataclass(frozen=True)
class RoutingTrace:
    """Routing of T tokens through L MoE layers of E experts, top-k.

    logits:    [L, T, E] router logits
    weights:   [L, T, k] combine weights
    indices:   [L, T, k] chosen experts
    token_ids: (T,) input token ids, or None (synthetic traces)
    source:    where the trace came from (model path, "synthetic zipf=1.2", ...)
    """

    logits: torch.Tensor
    weights: torch.Tensor
    indices: torch.Tensor
    token_ids: torch.Tensor | None
    source: str = ""

    @property
    def num_layers(self) -> int:
        return self.indices.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.indices.shape[1]

    @property
    def top_k(self) -> int:
        return self.indices.shape[2]

    @property
    def num_experts(self) -> int:
        return self.logits.shape[2]

    def routing(self, layer: int, rows: torch.Tensor | slice = slice(None)) -> Routing:
        """The `Routing` of `layer` for the selected token rows."""
        return Routing(
            logits=self.logits[layer, rows],
            weights=self.weights[layer, rows],
            indices=self.indices[layer, rows],
        )

    def expert_load(self) -> torch.Tensor:
        """[L, E] assignments per expert over the whole trace."""
        E = self.num_experts
        return torch.stack([torch.bincount(i.reshape(-1), minlength=E) for i in self.indices]).float()

    def split(self, fraction: float, seed: int = 0) -> tuple[RoutingTrace, RoutingTrace]:
        """(calibration, replay): a seeded random `fraction` of the tokens, and the rest.

        Random rather than by position, so both parts see the same mix of documents (stationary
        traffic: the case where planning from past load, as replication does, works best).
        """
        n = int(self.num_tokens * fraction)
        perm = torch.randperm(self.num_tokens, generator=torch.Generator().manual_seed(seed))
        return self.select(perm[:n].sort().values), self.select(perm[n:].sort().values)

    def select(self, rows: torch.Tensor | slice) -> RoutingTrace:
        tok = None if self.token_ids is None else self.token_ids[rows]
        return RoutingTrace(
            self.logits[:, rows], self.weights[:, rows], self.indices[:, rows], tok, self.source
        )

    def save(self, path: str | Path) -> None:
        tensors = {"logits": self.logits, "weights": self.weights, "indices": self.indices}
        if self.token_ids is not None:
            tensors["token_ids"] = self.token_ids
        save_file(
            {k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"source": self.source}
        )

    @classmethod
    def load(cls, path: str | Path) -> RoutingTrace:
        p = Path(path)
        if not p.is_file():
            raise UserError(
                f"Routing trace {p} does not exist; capture one with `understudy simulate --model DIR`."
            )
        t = load_file(str(p))
        from safetensors import safe_open

        with safe_open(str(p), "pt") as f:
            source = (f.metadata() or {}).get("source", str(p))
        return cls(t["logits"], t["weights"], t["indices"], t.get("token_ids"), source)


@torch.no_grad()
def capture_trace(
    model: nn.Module, blocks: torch.Tensor, batch_size: int = 8, source: str = ""
) -> RoutingTrace:
    """Run `blocks` (N, S) token ids through `model` and record every MoE layer's routing.

    A forward pre-hook on each MoE block re-routes the block input through the adapter's router
    (the router is deterministic, so this is the routing the block itself uses). Tokens are flat in
    (block, position) order.
    """
    layers = find_moe_layers(model)
    seen: dict[int, list[Routing]] = {layer.index: [] for layer in layers}

    def hook_for(layer):
        def hook(module, args):
            x = args[0]
            seen[layer.index].append(layer.route(x.reshape(-1, x.shape[-1])))

        return hook

    handles = [layer.block.register_forward_pre_hook(hook_for(layer)) for layer in layers]
    try:
        device = next(model.parameters()).device
        for start in range(0, blocks.shape[0], batch_size):
            model(input_ids=blocks[start : start + batch_size].to(device))
    finally:
        for h in handles:
            h.remove()
    per_layer = [seen[layer.index] for layer in layers]
    return RoutingTrace(
        logits=torch.stack([torch.cat([r.logits.float().cpu() for r in rs]) for rs in per_layer]),
        weights=torch.stack([torch.cat([r.weights.float().cpu() for r in rs]) for rs in per_layer]),
        indices=torch.stack([torch.cat([r.indices.cpu() for r in rs]) for rs in per_layer]),
        token_ids=blocks.reshape(-1).cpu(),
        source=source,
    )


def synthetic_trace(
    num_layers: int, num_tokens: int, num_experts: int, top_k: int, zipf: float, seed: int = 0
) -> RoutingTrace:
    """Routing with Zipf-skewed expert popularity: logits = log p_zipf (permuted per layer) + Gumbel noise.

    Top-k of Gumbel-perturbed log-probabilities samples k distinct experts without replacement in
    proportion to p, so `zipf` = 0 is uniform and larger values concentrate load on a few experts.
    """
    g = torch.Generator().manual_seed(seed)
    ranks = torch.arange(1, num_experts + 1, dtype=torch.float64)
    log_p = (-zipf * torch.log(ranks) - torch.logsumexp(-zipf * torch.log(ranks), 0)).float()
    logits, weights, indices = [], [], []
    for _ in range(num_layers):
        perm = torch.randperm(num_experts, generator=g)
        u = torch.rand(num_tokens, num_experts, generator=g).clamp(1e-9, 1 - 1e-9)
        lg = log_p[perm] - torch.log(-torch.log(u))  # (T, E)
        w, i = torch.topk(torch.softmax(lg, -1), top_k, dim=-1)
        logits.append(lg)
        weights.append(w / w.sum(-1, keepdim=True))
        indices.append(i)
    return RoutingTrace(
        torch.stack(logits), torch.stack(weights), torch.stack(indices), None, f"synthetic zipf={zipf}"
    )


EXPANSIONS = ("random", "token")


def expand_trace(
    trace: RoutingTrace, expert_factor: int, num_tokens: int, seed: int = 0, sibling: str = "random"
) -> RoutingTrace:
    """Scale a trace to `expert_factor` x more experts and `num_tokens` tokens.

    Used when the cluster has more ranks than the model has experts. Each expert e becomes
    `expert_factor` sibling experts ``e * f + j``; which sibling serves an assignment of e is
      - ``random``: drawn per assignment (seeded by `seed`). Siblings split e's load evenly, so each
        expert's share of the load and the max/mean expert load stay as captured; which sibling a
        token visits is unpredictable (pessimistic for speculative dispatch).
      - ``token``: a fixed random function of (layer, token id, e) -- of the original row when the
        trace has no token ids -- the same in every call. Routing stays as predictable from the
        token as captured, but frequent tokens now load one sibling, so expert skew grows with f.
    Tokens are sampled with replacement from the trace (seeded by `seed`), whole tokens at a time,
    so the per-token correlation across layers is kept.
    """
    if expert_factor < 1:
        raise ValueError(f"expert_factor must be >= 1, got {expert_factor}.")
    if sibling not in EXPANSIONS:
        raise ValueError(f"sibling must be one of {', '.join(EXPANSIONS)}, got {sibling!r}.")
    g = torch.Generator().manual_seed(seed)
    rows = (
        torch.randint(trace.num_tokens, (num_tokens,), generator=g)
        if num_tokens != trace.num_tokens
        else None
    )
    t = trace if rows is None else trace.select(rows)
    if expert_factor == 1:
        return RoutingTrace(t.logits, t.weights, t.indices, t.token_ids, t.source)
    f = expert_factor
    L, T, E = t.logits.shape
    if sibling == "random":
        choice = torch.randint(f, (L, T, E), generator=g)  # (L, T, E) sibling of every expert, per token
    else:
        if trace.token_ids is not None:
            key, num_keys = t.token_ids, int(trace.token_ids.max()) + 1
        else:
            key, num_keys = (torch.arange(T) if rows is None else rows), trace.num_tokens
        table = torch.randint(f, (L, num_keys, E), generator=torch.Generator().manual_seed(7919))
        choice = table[:, key]
    indices = t.indices * f + choice.gather(2, t.indices)
    # logits: the drawn sibling of e keeps e's logit; the other siblings are pushed below every
    # drawn sibling (shifted by the token's logit range + 1), so top-k and the reroute order over
    # the drawn siblings are exactly the captured ones.
    span = (t.logits.amax(-1, keepdim=True) - t.logits.amin(-1, keepdim=True) + 1.0).unsqueeze(
        -1
    )  # (L, T, 1, 1)
    logits = (t.logits.unsqueeze(-1) - span).expand(L, T, E, f).clone()
    logits.scatter_(3, choice.unsqueeze(-1), t.logits.unsqueeze(-1))
    source = f"{t.source} x{f} experts ({sibling} siblings)"
    return RoutingTrace(logits.reshape(L, T, E * f), t.weights, indices, t.token_ids, source)


# ---- routing under a router bias (hot-expert bursts) --------------------------------------------------


def renormalises(trace: RoutingTrace) -> bool:
    """Whether the family rescales its top-k probabilities to sum to one (read off the captured weights)."""
    return bool(torch.allclose(trace.weights.sum(-1), torch.ones(()), atol=1e-3))


def biased_routing(
    logits: torch.Tensor, bias: torch.Tensor, top_k: int, renormalise: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, indices) (T, k) of a softmax top-k router whose logits (T, E) get `bias` (E,) added.

    The routing-only form of the runtime's hot-expert scenario (a logit bias inside the router):
    the hidden states stay the captured ones, so later layers do not see the change.
    """
    probs = torch.softmax(logits.float() + bias, dim=-1)
    weights, indices = torch.topk(probs, top_k, dim=-1)
    if renormalise:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, indices


# ---- more experts than the model has: a fitted sibling split ------------------------------------------

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
