"""Routing traces: what every MoE layer chose for every token, captured from a model or synthetic.

A trace is the input of the cluster simulator and of the speculative-dispatch estimator. It keeps
router logits too, so that capacity policies that need more than the top-k (reroute, score
priority) replay exactly as the runtime would run them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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
