"""The routing exchange of expert parallelism: what ranks must tell each other before they can plan.

Under expert parallelism every rank routes its own tokens, but capacity is over the GLOBAL batch,
so each rank needs something of the other ranks' routing to compute the same plan. What it needs
depends on the policy and the priority, and this module sends no more than that:

- ``counts`` (full, layer; drop / drop_renorm / shadow / deadline with position priority and
  capacity per expert): one (k, E) int32 table per rank, assignments by (choice rank, expert).
  Position priority admits every first choice before any second choice and, within a choice rank,
  tokens in global (rank-major) order, so a rank's place in each expert's queue follows from the
  counts alone (`global_places`), and so does what every rank sends to every expert (`admitted`).
- ``rows`` (everything else: score priority, whole-token decisions, reroute, expanded drop, capacity
  per rank): one row per token in the smallest exact dtypes, the chosen experts (uint8 for up to 255
  experts), their combine weights in the routing's own dtype, and what the policy needs beyond them
  (reroute: the experts outside the top-k by logit order; expanded policies: the local candidates and
  their weights), after one int32 token count per rank.

Both are all-gathers: a rank's payload reaches each of the R - 1 others, and that is what the
ledger charges (`exchange_bytes`), beside dispatch and combine. Full logits are never sent.
"""

from __future__ import annotations

import torch

from moe_understudy.runtime.admission import choice_rank
from moe_understudy.runtime.policies import EXPANDED

COUNTS = "counts"
ROWS = "rows"
COUNT_DTYPE = torch.int32
_COUNTS_POLICIES = ("drop", "drop_renorm", "shadow", "deadline")


def exchange_mode(policy: str, priority: str, capacity_scope: str = "expert") -> str:
    """``counts`` where per-rank counts determine the plan, else ``rows``."""
    if policy in ("full", "layer"):
        return COUNTS
    if policy in _COUNTS_POLICIES and priority == "position" and capacity_scope == "expert":
        return COUNTS
    return ROWS


def index_dtype(num_experts: int) -> torch.dtype:
    """Smallest integer dtype holding expert ids 0..E (E marks an empty candidate)."""
    if num_experts < 256:
        return torch.uint8
    if num_experts < 2**15:
        return torch.int16
    return torch.int32


def row_layout(
    policy: str, num_experts: int, top_k: int, weight_dtype: torch.dtype, candidates: int = 0
) -> list[tuple[str, int, torch.dtype]]:
    """(field, width, dtype) of one token's row in the ``rows`` exchange, in packing order."""
    idx = index_dtype(num_experts)
    layout = [("indices", top_k, idx), ("weights", top_k, weight_dtype)]
    if policy == "reroute":
        layout.append(("alternatives", num_experts - top_k, idx))
    if policy in EXPANDED:
        layout += [("candidate_indices", candidates, idx), ("candidate_weights", candidates, weight_dtype)]
    return layout


def row_bytes(layout: list[tuple[str, int, torch.dtype]]) -> int:
    return sum(width * torch.empty((), dtype=dtype).element_size() for _, width, dtype in layout)


def pack_rows(fields: dict[str, torch.Tensor], layout: list[tuple[str, int, torch.dtype]]) -> torch.Tensor:
    """Per-token fields -> (T, row_bytes) uint8, each field cast to its layout dtype."""
    parts = [fields[name].to(dtype).contiguous().view(torch.uint8) for name, _, dtype in layout]
    return torch.cat(parts, dim=1)


def unpack_rows(rows: torch.Tensor, layout: list[tuple[str, int, torch.dtype]]) -> dict[str, torch.Tensor]:
    """(T, row_bytes) uint8 -> the fields of `pack_rows`, integer fields as long."""
    out, start = {}, 0
    for name, width, dtype in layout:
        size = width * torch.empty((), dtype=dtype).element_size()
        value = rows[:, start : start + size].contiguous().view(dtype)
        out[name] = value.long() if not dtype.is_floating_point else value
        start += size
    return out


def choice_counts(indices: torch.Tensor, weights: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(k, E) int32: a rank's assignments by choice rank (0 = first choice) and expert."""
    k = indices.shape[1]
    flat = (choice_rank(weights) * num_experts + indices).reshape(-1)
    return torch.bincount(flat, minlength=k * num_experts).view(k, num_experts).to(COUNT_DTYPE)


def queue_ahead(counts: torch.Tensor) -> torch.Tensor:
    """counts (R, k, E) -> (R, k, E): global assignments of expert e queued before rank r's first (j, e) one.

    Position order: all choice-rank-0 assignments in rank-major token order, then rank 1, ...
    """
    c = counts.long()
    earlier_choices = torch.cumsum(c.sum(0), 0) - c.sum(0)  # (k, E) sum over j' < j, every rank
    earlier_ranks = torch.cumsum(c, 0) - c  # (R, k, E) sum over r' < r, same j
    return earlier_choices[None] + earlier_ranks


def global_places(
    indices: torch.Tensor, weights: torch.Tensor, counts: torch.Tensor, rank: int
) -> torch.Tensor:
    """(T, k) place of each of this rank's assignments in its expert's global position-priority queue."""
    E = counts.shape[2]
    j = choice_rank(weights)  # (T, k)
    # this rank's own assignments of the same (j, e) that precede, in token order
    key = (j * E + indices).reshape(-1)
    same_before = _running_count(key, counts.shape[1] * E).view_as(indices)
    return queue_ahead(counts)[rank][j, indices] + same_before


def _running_count(key: torch.Tensor, num_keys: int) -> torch.Tensor:
    """(n,) how many earlier entries (in index order) share each entry's key."""
    n = key.numel()
    order = torch.argsort(key * n + torch.arange(n, device=key.device))
    counts = torch.bincount(key, minlength=num_keys)
    starts = torch.cumsum(counts, 0) - counts
    out = torch.empty_like(key)
    out[order] = torch.arange(n, device=key.device) - starts[key[order]]
    return out


def admitted(counts: torch.Tensor, capacity: int | None) -> torch.Tensor:
    """(R, E) assignments each rank gets into each expert under position priority (all when `capacity` is None)."""
    c = counts.long()
    if capacity is None:
        return c.sum(1)
    room = (capacity - queue_ahead(counts)).clamp(min=0)
    return torch.minimum(room, c).sum(1)


def exchange_bytes(
    mode: str,
    tokens_per_rank: list[int],
    num_experts: int,
    top_k: int,
    layout_bytes: int,
) -> list[int]:
    """Bytes each rank's exchange payload puts on the wire: its all-gather payloads x (R - 1) peers.

    counts: one (k, E) int32 table. rows: one int32 token count, then max(T_r) rows of `layout_bytes`
    (all-gather needs equal sizes, so shorter ranks pad; the padding is charged, it is sent).
    """
    R = len(tokens_per_rank)
    if R <= 1:
        return [0] * R
    count_bytes = COUNT_DTYPE.itemsize
    if mode == COUNTS:
        payload = top_k * num_experts * count_bytes
    else:
        payload = count_bytes + max(tokens_per_rank) * layout_bytes
    return [payload * (R - 1)] * R
