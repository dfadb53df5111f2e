"""Continuous-batched greedy decoding with a KV cache, and the token choices that drive it.

Serving, not teacher forcing over whole blocks: prompts are served by a scheduler with `slots`
places. A waiting prompt joins when a place is free: the joining prompts are prefilled together
(in chunks of `prefill_chunk` positions if set) and their KV-cache rows are merged into the
running batch (left padding to a common length, masked). Every decode step feeds ONE token per
running sequence through the model with the shared cache, so a step holds as many tokens as
sequences are running and the runtime's capacity of that step, ceil(cf * tokens * k / E), is over
those tokens (capacity is per forward call). A sequence leaves at end-of-text or after
`new_tokens` tokens; its place goes to the next waiting prompt. With `slots >= prompts` (the
default) every prompt joins at step 0 and no one waits: one batch of N, from which sequences that
finish early leave.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from moe_understudy.errors import UserError
from moe_understudy.eval.metrics import kl_per_token, ratio_interval, top1_agreement

PREFILL, DECODE = "prefill", "decode"
PROMPT_SOURCES = ("heldout", "domain_shift")  # besides an instruction file

# (phase, sequence ids (B,), generation index per row (B,), logits (B, V)) -> next tokens (B,)
Choose = Callable[[str, list[int], list[int], torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Batching:
    """How prompts are served: at most `slots` sequences run together, `new_tokens` each at most."""

    slots: int  # sequences decoding at once; a finished sequence's slot goes to the next waiting prompt
    new_tokens: int  # generated tokens per sequence (fewer when it emits eos_id)
    eos_id: int  # a sequence that emits this token leaves (-1: never)
    pad_id: int  # input id of left-padding positions (masked out)
    prefill_chunk: int | None = None  # prefill positions per forward call; None: a whole prompt at once

    def __post_init__(self) -> None:
        if self.slots < 1 or self.new_tokens < 1:
            raise ValueError("slots and new_tokens must be at least 1.")
        if self.prefill_chunk is not None and self.prefill_chunk < 1:
            raise ValueError("prefill_chunk must be at least 1 (or None).")


# ---- the running batch ------------------------------------------------------------------------------


@dataclass
class _Running:
    """The sequences decoding together: one KV cache, rows left-padded to a common length L.

    cache:     DynamicCache, per attention layer keys / values (B, kv_heads, L, head_dim)
    mask:      (B, L) long, 1 where a row holds a real token, 0 on its left padding
    positions: (B,) long, position id of each row's next input token
    last:      (B,) long, each row's next input token (its latest generated one)
    seqs:      sequence id of each row
    """

    cache: DynamicCache
    mask: torch.Tensor
    positions: torch.Tensor
    last: torch.Tensor
    seqs: list[int]

    def join(self, other: _Running) -> _Running:
        """Both batches' rows in one cache: the shorter one left-padded (masked) to the longer."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        layers = [
            (
                torch.cat([_left_pad(ka, width), _left_pad(kb, width)]),
                torch.cat([_left_pad(va, width), _left_pad(vb, width)]),
            )
            for (ka, va, *_), (kb, vb, *_) in zip(self.cache, other.cache, strict=True)
        ]
        return _Running(
            DynamicCache(ddp_cache_data=layers),
            torch.cat([_left_pad(self.mask, width, dim=1), _left_pad(other.mask, width, dim=1)]),
            torch.cat([self.positions, other.positions]),
            torch.cat([self.last, other.last]),
            self.seqs + other.seqs,
        )

    def keep(self, rows: list[int]) -> _Running | None:
        """Only `rows` (None if none); padding columns no kept row needs are cut off."""
        if len(rows) == len(self.seqs):
            return self
        if not rows:
            return None
        idx = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        mask = self.mask[idx]
        cut = int(mask.any(0).nonzero()[0])  # first column some kept row uses
        layers = [(k[idx, :, cut:], v[idx, :, cut:]) for k, v, *_ in self.cache]
        return _Running(
            DynamicCache(ddp_cache_data=layers),
            mask[:, cut:],
            self.positions[idx],
            self.last[idx],
            [self.seqs[r] for r in rows],
        )


def _left_pad(t: torch.Tensor, width: int, dim: int = -2) -> torch.Tensor:
    """Zeros prepended along `dim` so that it is `width` long."""
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _forward(model: nn.Module, ids, mask, positions, cache, logits_to_keep: int = 0) -> torch.Tensor:
    """One cached forward call: ids / positions (B, q), mask (B, L + q) -> logits (B, q', V)."""
    extra = (
        {"output_router_logits": False}
        if hasattr(getattr(model, "config", None), "output_router_logits")
        else {}
    )
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        cache=cache,
        use_cache=True,
        logits_to_keep=logits_to_keep,
        **extra,
    )
    return out.logits


def prefill_prompts(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    seqs: list[int],
    batching: Batching,
    on_forward: Callable[[str], None] | None = None,
    all_logits: bool = False,
) -> tuple[_Running, torch.Tensor]:
    """Prefill `prompts` together (left-padded, in chunks): (running batch, logits).

    logits: (B, V) at each prompt's last position, or (B, P, V) at every position if `all_logits`.
    """
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), batching.pad_id, dtype=torch.long)  # (B, P)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)  # (B, P)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
        mask[row, width - len(p) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, P)
    chunk = batching.prefill_chunk or width
    cache, pieces = DynamicCache(), []
    for start in range(0, width, chunk):
        stop = min(start + chunk, width)
        if on_forward is not None:
            on_forward(PREFILL)
        logits = _forward(
            model,
            ids[:, start:stop],
            mask[:, :stop],
            positions[:, start:stop],
            cache,
            logits_to_keep=0 if all_logits else 1,
        )
        pieces.append(logits)
    logits = torch.cat(pieces, dim=1) if all_logits else pieces[-1][:, -1]
    last = torch.zeros(len(prompts), dtype=torch.long, device=device)
    return _Running(cache, mask, positions[:, -1] + 1, last, list(seqs)), logits


@dataclass
class Served:
    """What one serve run produced: each sequence's new tokens, the schedule, and its wall time."""

    tokens: list[list[int]]  # per sequence id, generated tokens (ending with eos_id if it was emitted)
    # (phase, sequence ids) per decode step and per prefill of joining prompts (all its chunks)
    schedule: list[tuple[str, list[int]]] = field(default_factory=list)
    seconds: float = 0.0

    def decode_steps(self) -> list[list[int]]:
        return [seqs for phase, seqs in self.schedule if phase == DECODE]


@torch.no_grad()
def serve(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    batching: Batching,
    choose: Choose,
    *,
    order: Sequence[int] | None = None,
    on_forward: Callable[[str], None] | None = None,
) -> Served:
    """Continuous batching of `prompts` (token id lists) with a KV cache; `choose` picks each next token.

    order: the sequence ids in the order they wait (default 0..N-1). on_forward(phase) is called
    before every forward call (the workflow switches the runtime's policy and recorder there).
    Loop: fill free slots with waiting prompts (prefilled together, first token chosen from the
    prefill), drop sequences that finished, then one decode step over every running sequence.
    """
    start = time.perf_counter()
    waiting = deque(range(len(prompts)) if order is None else order)
    out: list[list[int]] = [[] for _ in prompts]
    served = Served(out)
    running: _Running | None = None

    def finished(seq: int) -> bool:
        return len(out[seq]) >= batching.new_tokens or out[seq][-1] == batching.eos_id

    def take(batch: _Running, phase: str, logits: torch.Tensor) -> _Running | None:
        served.schedule.append((phase, list(batch.seqs)))
        tokens = choose(phase, batch.seqs, [len(out[s]) for s in batch.seqs], logits).to(batch.last.device)
        for seq, token in zip(batch.seqs, tokens.tolist(), strict=True):
            out[seq].append(int(token))
        batch.last = tokens
        return batch.keep([r for r, seq in enumerate(batch.seqs) if not finished(seq)])

    while waiting or running is not None:
        free = batching.slots - (len(running.seqs) if running is not None else 0)
        if free > 0 and waiting:
            joiners = [waiting.popleft() for _ in range(min(free, len(waiting)))]
            joined, logits = prefill_prompts(
                model, [prompts[s] for s in joiners], joiners, batching, on_forward
            )
            joined = take(joined, PREFILL, logits)
            if joined is not None:
                running = joined if running is None else running.join(joined)
        if running is None:
            continue
        if on_forward is not None:
            on_forward(DECODE)
        mask = torch.cat([running.mask, torch.ones_like(running.mask[:, :1])], dim=1)  # (B, L + 1)
        logits = _forward(model, running.last[:, None], mask, running.positions[:, None], running.cache)
        running.mask, running.positions = mask, running.positions + 1
        running = take(running, DECODE, logits[:, -1])
    served.seconds = time.perf_counter() - start
    return served


# ---- token choice: greedy (reference, free-running) and teacher-forced ---------------------------------


class Greedy:
    """Each sequence's most likely token; with `keep_logits`, stores every step's logits (reference)."""

    def __init__(self, num_prompts: int = 0, keep_logits: bool = False):
        self.logits: list[dict[int, torch.Tensor]] = [{} for _ in range(num_prompts)] if keep_logits else []

    def __call__(self, phase: str, seqs: list[int], steps: list[int], logits: torch.Tensor) -> torch.Tensor:
        if self.logits:
            for row, (seq, step) in enumerate(zip(seqs, steps, strict=True)):
                self.logits[seq][step] = logits[row].float().cpu()
        return logits.argmax(-1)


@dataclass(frozen=True)
class Reference:
    """The unpatched model's greedy generation: tokens, logits (seq -> step -> (V,)), and the run."""

    served: Served
    logits: list[dict[int, torch.Tensor]]

    @property
    def tokens(self) -> list[list[int]]:
        return self.served.tokens


class Forced:
    """Feeds the reference's tokens and scores each decode step's logits against the reference's.

    Sums per generation index: top-1 agreement and KL(reference || system). Steps chosen from a
    prefill (index 0 in decode mode) are fed but not scored.
    """

    def __init__(self, reference: Reference):
        self.reference = reference
        n = max(len(t) for t in reference.tokens)
        self.agree = [0.0] * n
        self.kl = [0.0] * n
        self.count = [0] * n
        self.seq_agree = [0.0] * len(reference.tokens)  # per sequence, for the interval over prompts
        self.seq_count = [0] * len(reference.tokens)

    def __call__(self, phase: str, seqs: list[int], steps: list[int], logits: torch.Tensor) -> torch.Tensor:
        ref = self.reference
        if phase == DECODE:
            target = torch.stack([ref.logits[s][j] for s, j in zip(seqs, steps, strict=True)])  # (B, V)
            got = logits.float().cpu()
            agree, kl = top1_agreement(target, got).tolist(), kl_per_token(target, got).tolist()
            for s, j, a, k in zip(seqs, steps, agree, kl, strict=True):
                self.agree[j] += float(a)
                self.kl[j] += k
                self.count[j] += 1
                self.seq_agree[s] += float(a)
                self.seq_count[s] += 1
        return torch.tensor([ref.tokens[s][j] for s, j in zip(seqs, steps, strict=True)], dtype=torch.long)

    def summary(self) -> dict[str, Any]:
        scored = [j for j, c in enumerate(self.count) if c]
        total = sum(self.count)
        if total == 0:
            raise UserError(
                "No decode step was scored (every sequence ended at its first token); raise --new-tokens."
            )
        scored_seqs = [i for i, c in enumerate(self.seq_count) if c]
        per_seq = torch.tensor(
            [[self.seq_agree[i] for i in scored_seqs], [self.seq_count[i] for i in scored_seqs]],
            dtype=torch.float64,
        )
        return {
            "positions": total,
            "agreement": sum(self.agree) / total,
            # 95% bootstrap over prompts (the steps of one prompt are not independent of each other)
            "agreement_ci95": list(ratio_interval(*per_seq)),
            "kl": sum(self.kl) / total,
            "agreement_by_position": [self.agree[j] / self.count[j] for j in scored],
            "kl_by_position": [self.kl[j] / self.count[j] for j in scored],
        }


def reference_run(model: nn.Module, prompts: Sequence[Sequence[int]], batching: Batching) -> Reference:
    """The unpatched (or `full`) model's greedy generation with every step's logits kept."""
    greedy = Greedy(len(prompts), keep_logits=True)
    return Reference(serve(model, prompts, batching, greedy), greedy.logits)
