"""Speculative dispatch baseline (after Speculative MoE): predict next-layer experts, ship tokens early.

From routing traces we estimate
  - within-layer token-expert affinity  P(expert at layer l | token id), and
  - inter-layer expert-expert affinity  P(expert at layer l+1 | expert at layer l),
then, while layer l computes, each token is pre-dispatched to the ranks holding the experts predicted
for layer l+1 (layer 0 is predicted from the token id alone). When layer l+1 routes for real,
assignments whose rank already holds the token need no dispatch on the critical path ("avoided");
the others are sent as usual ("corrected"). Pre-dispatches to ranks that turn out unused are
wasted bytes. Outputs are exact: speculation only moves data early.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Affinity:
    """Routing statistics estimated from a trace.

    expert_expert: [L-1, E, E] P(expert e' at layer l+1 | expert e at layer l), rows sum to 1
    token_expert:  [L, V, E] P(expert at layer l | token id), rows sum to 1, or None without token ids
    prior:         [L, E] marginal expert frequency per layer
    """

    expert_expert: torch.Tensor
    token_expert: torch.Tensor | None
    prior: torch.Tensor


def estimate_affinity(
    indices: torch.Tensor,
    num_experts: int,
    token_ids: torch.Tensor | None = None,
    vocab_size: int | None = None,
    smoothing: float = 0.1,
) -> Affinity:
    """indices: [L, T, k] chosen experts; token_ids: (T,) -> Affinity (add-`smoothing` counts)."""
    L, T, k = indices.shape
    E = num_experts
    prior = torch.stack([torch.bincount(i.reshape(-1), minlength=E) for i in indices]).float() + smoothing
    prior = prior / prior.sum(-1, keepdim=True)
    ee = torch.full((max(L - 1, 0), E, E), smoothing)
    for layer in range(L - 1):
        a = indices[layer].unsqueeze(2).expand(T, k, k)  # (T, k, k) expert at l
        b = indices[layer + 1].unsqueeze(1).expand(T, k, k)  # (T, k, k) expert at l+1
        ee[layer].view(-1).index_add_(0, (a * E + b).reshape(-1), torch.ones(T * k * k))
    ee = ee / ee.sum(-1, keepdim=True)
    te = None
    if token_ids is not None:
        V = int(vocab_size or int(token_ids.max()) + 1)
        te = torch.full((L, V, E), smoothing)
        for layer in range(L):
            rows = token_ids.unsqueeze(1).expand(T, k)
            te[layer].view(-1).index_add_(0, (rows * E + indices[layer]).reshape(-1), torch.ones(T * k))
        te = te / te.sum(-1, keepdim=True)
    return Affinity(expert_expert=ee, token_expert=te, prior=prior)


def predict_experts(
    affinity: Affinity, indices: torch.Tensor, token_ids: torch.Tensor | None, num_predicted: int
) -> torch.Tensor:
    """[L, T, k] actual routing -> [L, T, num_predicted] experts predicted before each layer routes.

    Layer 0: from the token id (or the prior). Layer l+1: the mean of P(. | e) over the token's
    layer-l experts, mixed equally with P(. | token id) when token ids are known.
    """
    L, T, _ = indices.shape
    V = None if affinity.token_expert is None else affinity.token_expert.shape[1]
    known = token_ids is not None and V is not None
    tok = token_ids.clamp(max=V - 1) if known else None
    out = []
    for layer in range(L):
        by_token = affinity.token_expert[layer, tok] if known else affinity.prior[layer].expand(T, -1)
        if layer == 0:
            score = by_token
        else:
            by_prev = affinity.expert_expert[layer - 1][indices[layer - 1]].mean(1)  # (T, E)
            score = 0.5 * by_prev + 0.5 * by_token if known else by_prev
        out.append(torch.topk(score, num_predicted, dim=-1).indices)
    return torch.stack(out)


@dataclass(frozen=True)
class SpeculationReport:
    """Per-layer outcome of speculative dispatch, in rows (one row = one token's hidden state).

    expert_accuracy:    (L,) fraction of real assignments whose expert was predicted
    rank_accuracy:      (L,) fraction of off-rank real assignments whose rank got the token early
    baseline_rows:      (L,) off-rank dispatch rows without speculation (all on the critical path)
    predispatched_rows: (L,) off-rank rows sent early (overlapped with the previous layer)
    corrected_rows:     (L,) off-rank rows still sent after routing (mispredictions)
    wasted_rows:        (L,) early rows to ranks that serve none of the token's experts
    corrected_send:     [L, R] corrected rows each rank sends (critical path, per source rank)
    corrected_recv:     [L, R] corrected rows each rank receives
    """

    expert_accuracy: torch.Tensor
    rank_accuracy: torch.Tensor
    baseline_rows: torch.Tensor
    predispatched_rows: torch.Tensor
    corrected_rows: torch.Tensor
    wasted_rows: torch.Tensor
    corrected_send: torch.Tensor
    corrected_recv: torch.Tensor

    @property
    def avoided_rows(self) -> torch.Tensor:
        """(L,) critical-path rows saved."""
        return self.baseline_rows - self.corrected_rows

    def totals(self) -> dict[str, float]:
        base = float(self.baseline_rows.sum())
        return {
            "expert_accuracy": float(self.expert_accuracy.mean()),
            "rank_accuracy": float(self.rank_accuracy.mean()),
            "baseline_rows": base,
            "critical_rows": float(self.corrected_rows.sum()),
            "wire_rows": float(self.predispatched_rows.sum() + self.corrected_rows.sum()),
            "avoided_fraction": float(self.avoided_rows.sum()) / base if base else 0.0,
        }


def speculate(
    indices: torch.Tensor,
    predicted: torch.Tensor,
    expert_rank: torch.Tensor,
    src_rank: torch.Tensor,
    num_ranks: int,
    sent: torch.Tensor | None = None,
) -> SpeculationReport:
    """Count what speculative pre-dispatch saves.

    indices:     [L, T, k] real routing
    predicted:   [L, T, p] predicted experts (from `predict_experts`)
    expert_rank: [L, E] rank holding each expert
    src_rank:    (T,) home rank of each token
    sent:        [L, T, k] bool, assignments that go to an expert at all (default all)
    """
    L, T, k = indices.shape
    sent = torch.ones_like(indices, dtype=torch.bool) if sent is None else sent
    home = src_rank.unsqueeze(1)  # (T, 1)
    stats = {n: torch.zeros(L) for n in ("eacc", "racc", "base", "pre", "corr", "waste")}
    send = torch.zeros(L, num_ranks, dtype=torch.long)
    recv = torch.zeros(L, num_ranks, dtype=torch.long)
    for layer in range(L):
        real = indices[layer]  # (T, k)
        pred = predicted[layer]  # (T, p)
        real_rank = expert_rank[layer][real]  # (T, k)
        pred_rank = expert_rank[layer][pred]  # (T, p)
        hit_expert = (real.unsqueeze(2) == pred.unsqueeze(1)).any(2)  # (T, k)
        has_early = (real_rank.unsqueeze(2) == pred_rank.unsqueeze(1)).any(2)  # (T, k)
        off = (real_rank != home) & sent[layer]
        pred_off = pred_rank != home  # (T, p)
        used = (pred_rank.unsqueeze(2) == torch.where(sent[layer], real_rank, -1).unsqueeze(1)).any(
            2
        )  # (T, p)
        stats["eacc"][layer] = hit_expert[sent[layer]].float().mean() if sent[layer].any() else 1.0
        stats["racc"][layer] = has_early[off].float().mean() if off.any() else 1.0
        stats["base"][layer] = off.sum()
        stats["pre"][layer] = pred_off.sum()
        late = off & ~has_early  # (T, k)
        stats["corr"][layer] = late.sum()
        send[layer] = torch.bincount(home.expand_as(late)[late], minlength=num_ranks)
        recv[layer] = torch.bincount(real_rank[late], minlength=num_ranks)
        stats["waste"][layer] = (pred_off & ~used).sum()
    return SpeculationReport(
        expert_accuracy=stats["eacc"],
        rank_accuracy=stats["racc"],
        baseline_rows=stats["base"],
        predispatched_rows=stats["pre"],
        corrected_rows=stats["corr"],
        wasted_rows=stats["waste"],
        corrected_send=send,
        corrected_recv=recv,
    )
