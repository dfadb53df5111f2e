"""Generation under load: continuous-batched greedy decoding with a KV cache, every policy x capacity.

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

Comparison discipline (as eval/quality.py): one unpatched greedy run gives the reference tokens
and logits. Every (policy, capacity factor) system then runs

- teacher-forced: the scheduler replays the reference exactly (each step is fed the reference's
  token, so a flipped token does not poison later steps, and sequences finish and join when the
  reference's did, so every step has the reference's batch composition). Headline: top-1
  agreement with the reference at each decode position, and KL(reference || system) per position;
- free-running: the system's own greedy tokens, compared with the reference generation:
  fraction of identical sequences, mean matching-prefix fraction, ROUGE-L F1 of the texts.

In `decode` mode the prompts' prefill runs unpatched (policy `full`), so the first new token,
which the prefill predicts, is the reference's for every system and the figures measure decode
steps alone; agreement and KL are over the decode positions (new tokens 2..n). `prefill` mode
measures the other side: the prompts are prefilled in chunks under each system (capacity per
chunk of slots x chunk positions; left padding of unequal prompts is routed too and counts toward
a chunk's tokens) and agreement / KL are over the real prompt positions.

Noise floor: the unpatched model again with another batch composition (prompts in reverse order,
half the slots) and in bfloat16, compared with the reference by the same measures, shows how much
free-running text changes without any policy.

`run_serve(ServeConfig)` is the `understudy serve-eval` workflow.
"""

from __future__ import annotations

import copy
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn
from transformers import DynamicCache

from moe_understudy.config import ServeConfig
from moe_understudy.errors import UserError
from moe_understudy.eval.metrics import kl_per_token, top1_agreement
from moe_understudy.eval.quality import stand_in_sizes, systems
from moe_understudy.moe.adapters import find_moe_layers
from moe_understudy.runtime.layer import PatchedModel, check_stand_in, patch
from moe_understudy.runtime.ledger import LoadRecorder, StepLedger
from moe_understudy.runtime.policies import NEEDS_SHADOWS, NEEDS_UNDERSTUDY

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


def _prefill(
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
            joined, logits = _prefill(model, [prompts[s] for s in joiners], joiners, batching, on_forward)
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

    def __call__(self, phase: str, seqs: list[int], steps: list[int], logits: torch.Tensor) -> torch.Tensor:
        ref = self.reference
        if phase == DECODE:
            target = torch.stack([ref.logits[s][j] for s, j in zip(seqs, steps, strict=True)])  # (B, V)
            got = logits.float().cpu()
            agree, kl = top1_agreement(target, got).tolist(), kl_per_token(target, got).tolist()
            for j, a, k in zip(steps, agree, kl, strict=True):
                self.agree[j] += float(a)
                self.kl[j] += k
                self.count[j] += 1
        return torch.tensor([ref.tokens[s][j] for s, j in zip(seqs, steps, strict=True)], dtype=torch.long)

    def summary(self) -> dict[str, Any]:
        scored = [j for j, c in enumerate(self.count) if c]
        total = sum(self.count)
        if total == 0:
            raise UserError(
                "No decode step was scored (every sequence ended at its first token); raise --new-tokens."
            )
        return {
            "positions": total,
            "agreement": sum(self.agree) / total,
            "kl": sum(self.kl) / total,
            "agreement_by_position": [self.agree[j] / self.count[j] for j in scored],
            "kl_by_position": [self.kl[j] / self.count[j] for j in scored],
        }


def reference_run(model: nn.Module, prompts: Sequence[Sequence[int]], batching: Batching) -> Reference:
    """The unpatched (or `full`) model's greedy generation with every step's logits kept."""
    greedy = Greedy(len(prompts), keep_logits=True)
    return Reference(serve(model, prompts, batching, greedy), greedy.logits)


# ---- free-running comparison --------------------------------------------------------------------------


def compare_free(
    tokens: list[list[int]], reference: list[list[int]], text: Callable[[list[int]], str]
) -> dict[str, float]:
    """Identical-sequence fraction, mean matching-prefix fraction and mean ROUGE-L F1 x100 vs `reference`."""
    from rouge_score import rouge_scorer

    from moe_understudy.eval.rouge import rouge_l

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    same, prefix, rouge = 0, 0.0, 0.0
    for got, ref in zip(tokens, reference, strict=True):
        same += got == ref
        common = next(
            (i for i, (a, b) in enumerate(zip(got, ref, strict=False)) if a != b), min(len(got), len(ref))
        )
        prefix += common / len(ref)
        rouge += rouge_l(text(got), [text(ref)], scorer)
    n = len(reference)
    return {"identical_frac": same / n, "prefix_frac": prefix / n, "rouge_l": rouge / n}


def token_text(tokenizer, eos_id: int) -> Callable[[list[int]], str]:
    """Text of generated ids (end-of-text dropped); without a tokenizer, the ids as words."""
    if tokenizer is None:
        return lambda ids: " ".join(f"t{t}" for t in ids if t != eos_id)
    return lambda ids: tokenizer.decode([t for t in ids if t != eos_id], skip_special_tokens=True)


# ---- the systems -------------------------------------------------------------------------------------


class _Phases:
    """Switches the patched model between prefill and decode settings, and marks each forward call.

    `calls[i]` is the index in `recorder.steps` where forward call i's ledgers begin (the recorder
    records only while `recorder_in` phases run).
    """

    def __init__(
        self, handle: PatchedModel, settings: dict[str, dict], recorder: LoadRecorder, recorder_in: str
    ):
        self.handle, self.settings, self.recorder, self.recorder_in = handle, settings, recorder, recorder_in
        self.current: str | None = None
        self.calls: list[int] = []

    def __call__(self, phase: str) -> None:
        if phase != self.current:
            rec = self.recorder if phase == self.recorder_in else None
            self.handle.configure(recorder=rec, **self.settings[phase])
            self.current = phase
        if phase == self.recorder_in:
            self.calls.append(len(self.recorder.steps))

    def per_call(self) -> list[list[StepLedger]]:
        """The recorded ledgers of each recorded forward call (one per MoE layer)."""
        bounds = [*self.calls, len(self.recorder.steps)]
        return [self.recorder.steps[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def overflow_fraction(ledgers: Sequence[StepLedger]) -> float:
    """Assignments beyond their expert's capacity / all assignments, over `ledgers` (0 without capacity)."""
    over = sum(
        sum(max(0, load - s.capacity) for load in s.tokens_per_expert)
        for s in ledgers
        if s.capacity is not None
    )
    return over / max(1, sum(s.assignments for s in ledgers))


def check_policies(
    model: nn.Module, understudies: dict[int, nn.Module] | None, policies: Sequence[str]
) -> None:
    """Refuse, before any generation, a policy whose stand-in is missing or of the wrong kind."""
    for moe in find_moe_layers(model):
        for policy in policies:
            check_stand_in(policy, moe, (understudies or {}).get(moe.index))


def _load_row(phases: _Phases, num_devices: int) -> dict[str, Any]:
    load = phases.recorder.summary()
    calls = phases.per_call()
    return {
        "steps": len(calls),
        "mean_tokens_per_step": sum(c[0].tokens for c in calls) / max(1, len(calls)),
        "tokens_per_step": [c[0].tokens for c in calls],
        "overflow_frac": overflow_fraction(phases.recorder.steps),
        "overflow_by_step": [overflow_fraction(c) for c in calls],
        **{
            k: load[k]
            for k in (
                "frac_expert",
                "frac_dropped",
                "frac_understudy",
                "frac_shadow",
                "frac_tokens_degraded",
                "bytes_moved",
                "bytes_per_token",
                "exchange_bytes",
                "total_bytes",
                "total_bytes_per_token",
                "mean_max_over_mean",
            )
        },
        "num_devices": num_devices,
    }


def _sizes_row(policy: str, sizes: dict[str, float | None]) -> dict[str, Any]:
    uses = policy in NEEDS_UNDERSTUDY + NEEDS_SHADOWS
    return {
        "understudy_cost": sizes["cost"] if uses else None,
        # memory per device per MoE layer beyond its own experts, in routed experts
        "memory_expert_equiv": (sizes["memory_expert_equiv"] or 0.0) if uses else 0.0,
    }


@torch.no_grad()
def decode_rows(
    model: nn.Module,
    understudies: dict[int, nn.Module] | None,
    prompts: Sequence[Sequence[int]],
    batching: Batching,
    policies: Sequence[str],
    capacities: Sequence[float],
    reference: Reference,
    *,
    priority: str = "score",
    num_devices: int = 4,
    text: Callable[[list[int]], str] | None = None,
    free_running: bool = True,
    with_full: bool = True,
    runtime_options: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """One row per (policy, capacity factor), `full` first: teacher-forced along `reference`, then free.

    The model is patched once; each system is a `configure`; prefill runs under `full` unrecorded.
    with_full=False leaves the `full` row out (a caller adding stand-in sets to rows it already has).
    """
    text = text or token_text(None, batching.eos_id)
    check_policies(model, understudies, policies)
    sizes = stand_in_sizes(model, understudies)
    handle = patch(
        model,
        understudies,
        policy="full",
        priority=priority,
        num_devices=num_devices,
        **(runtime_options or {}),
    )
    rows = []
    try:
        for policy, cf in systems(policies, capacities)[0 if with_full else 1 :]:
            settings = {PREFILL: dict(policy="full"), DECODE: dict(policy=policy, capacity_factor=cf or 1.0)}
            phases = _Phases(handle, settings, LoadRecorder(), DECODE)
            forced = Forced(reference)
            serve(model, prompts, batching, forced, on_forward=phases)
            row = {
                "policy": policy,
                "capacity_factor": cf,
                "priority": priority,
                "mode": DECODE,
                "prompts": len(prompts),
                "new_tokens": batching.new_tokens,
                "slots": batching.slots,
                **forced.summary(),
                **_load_row(phases, num_devices),
                **_sizes_row(policy, sizes),
            }
            if free_running:
                free_phases = _Phases(handle, settings, LoadRecorder(), "none")
                free = serve(model, prompts, batching, Greedy(), on_forward=free_phases)
                row.update(compare_free(free.tokens, reference.tokens, text))
                row["tokens_per_s"] = sum(map(len, free.tokens)) / max(free.seconds, 1e-9)
            rows.append(row)
    finally:
        handle.unpatch()
    return rows


@torch.no_grad()
def noise_floor_rows(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    batching: Batching,
    reference: Reference,
    *,
    text: Callable[[list[int]], str] | None = None,
    bf16: bool = True,
) -> list[dict[str, Any]]:
    """The unpatched model under another batch composition (reversed order, half the slots) and in bf16.

    Each row: teacher-forced agreement / KL and the free-running figures against `reference`.
    """
    text = text or token_text(None, batching.eos_id)
    other = Batching(
        max(1, batching.slots // 2),
        batching.new_tokens,
        batching.eos_id,
        batching.pad_id,
        batching.prefill_chunk,
    )
    order = list(reversed(range(len(prompts))))
    runs = [(f"batch composition (reversed order, {other.slots} slots)", model, other, order)]
    if bf16:
        runs.append(
            ("bfloat16 weights and activations", copy.deepcopy(model).to(torch.bfloat16), batching, None)
        )
    rows = []
    for name, m, b, o in runs:
        forced = Forced(reference)
        serve(m, prompts, b, forced, order=o)
        free = serve(m, prompts, b, Greedy(), order=o)
        rows.append(
            {
                "noise": name,
                "slots": b.slots,
                **forced.summary(),
                **compare_free(free.tokens, reference.tokens, text),
                "tokens_per_s": sum(map(len, free.tokens)) / max(free.seconds, 1e-9),
            }
        )
    return rows


@torch.no_grad()
def prefill_rows(
    model: nn.Module,
    understudies: dict[int, nn.Module] | None,
    prompts: Sequence[Sequence[int]],
    batching: Batching,
    policies: Sequence[str],
    capacities: Sequence[float],
    *,
    priority: str = "score",
    num_devices: int = 4,
    runtime_options: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """One row per system: prompts prefilled in groups of `slots`, chunks of `prefill_chunk` positions,
    capacity per chunk; top-1 agreement and KL over real prompt positions vs the unpatched model."""
    check_policies(model, understudies, policies)
    sizes = stand_in_sizes(model, understudies)
    groups = [
        list(range(i, min(i + batching.slots, len(prompts)))) for i in range(0, len(prompts), batching.slots)
    ]
    handle = patch(
        model,
        understudies,
        policy="full",
        priority=priority,
        num_devices=num_devices,
        **(runtime_options or {}),
    )
    reference: list[torch.Tensor] = []
    rows = []
    try:
        for policy, cf in systems(policies, capacities):
            settings = {PREFILL: dict(policy=policy, capacity_factor=cf or 1.0)}
            phases = _Phases(handle, settings, LoadRecorder(), PREFILL)
            agree = kl = 0.0
            count = 0
            start = time.perf_counter()
            for g, seqs in enumerate(groups):
                running, logits = _prefill(
                    model, [prompts[s] for s in seqs], seqs, batching, phases, all_logits=True
                )
                real = running.mask.bool()  # (B, P)
                got = logits[real].float().cpu()  # (positions, V)
                if policy == "full" and len(reference) == g:
                    reference.append(got)  # `full` runs first: the reference
                agree += float(top1_agreement(reference[g], got).sum())
                kl += float(kl_per_token(reference[g], got).sum())
                count += got.shape[0]
            seconds = time.perf_counter() - start
            rows.append(
                {
                    "policy": policy,
                    "capacity_factor": cf,
                    "priority": priority,
                    "mode": PREFILL,
                    "prompts": len(prompts),
                    "slots": batching.slots,
                    "prefill_chunk": batching.prefill_chunk,
                    "positions": count,
                    "agreement": agree / count,
                    "kl": kl / count,
                    "tokens_per_s": count / max(seconds, 1e-9),
                    **_load_row(phases, num_devices),
                    **_sizes_row(policy, sizes),
                }
            )
    finally:
        handle.unpatch()
    return rows


# ---- prompts and the workflow ---------------------------------------------------------------------------


def load_prompts(cfg: ServeConfig, tokenizer, notice: Callable[[str], None] | None = None) -> list[list[int]]:
    """`cfg.prompts` prompts as token ids: held-out blocks (or prose) cut to `prompt_tokens`, or an
    instruction file's prompts cut from the left to `prompt_tokens`."""
    from moe_understudy.data.heldout import data_for, model_blocks
    from moe_understudy.runtime.scenarios import domain_shift_blocks

    if cfg.data in PROMPT_SOURCES:
        if cfg.data == "heldout":
            blocks = model_blocks(cfg.model, None, tokenizer, cfg.prompts, notice=notice)
        else:
            block_size = data_for(cfg.model, None, notice=lambda _: None).block_size
            blocks = domain_shift_blocks(tokenizer, block_size, cfg.prompts)
        if len(blocks) < cfg.prompts:
            raise UserError(
                f"Only {len(blocks)} {cfg.data} blocks are available for {cfg.prompts} prompts; lower --prompts."
            )
        if blocks.shape[1] < cfg.prompt_tokens:
            raise UserError(
                f"{cfg.data} blocks hold {blocks.shape[1]} tokens, fewer than --prompt-tokens {cfg.prompt_tokens}; "
                f"lower --prompt-tokens."
            )
        return [row[: cfg.prompt_tokens].tolist() for row in blocks]
    path = Path(cfg.data)
    if not path.is_file():
        raise UserError(
            f"Unknown prompt source {cfg.data!r}: pass --data {' or '.join(PROMPT_SOURCES)}, or an existing "
            f"instruction file (.jsonl / .json)."
        )
    from moe_understudy.data.instructions import load_instructions

    examples = load_instructions(path, fmt=cfg.fmt, limit=cfg.prompts)
    if len(examples) < cfg.prompts:
        raise UserError(
            f"{path} holds {len(examples)} examples, fewer than --prompts {cfg.prompts}; lower --prompts."
        )
    encoded = tokenizer([e.prompt for e in examples], add_special_tokens=False)["input_ids"]
    prompts = [ids[-cfg.prompt_tokens :] for ids in encoded]
    if not all(prompts):
        raise UserError(f"{path} has an empty prompt; every example needs prompt text.")
    return prompts


def check_context(model: nn.Module, prompts: Sequence[Sequence[int]], new_tokens: int, name: str) -> None:
    """Refuse prompts that with `new_tokens` would not fit the model's context window."""
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    longest = max(len(p) for p in prompts)
    if context is not None and longest + new_tokens > context:
        raise UserError(
            f"Prompts of up to {longest} tokens plus {new_tokens} new tokens need {longest + new_tokens} positions, "
            f"but {name} has a context of {context}; lower --prompt-tokens or --new-tokens."
        )


def _refuse_preset_name(model: str) -> None:
    from moe_understudy.moe.presets import PRESETS

    if model in PRESETS and not Path(model).exists():
        raise UserError(
            f"{model!r} is a model preset, not a trained model; train one with "
            f"`understudy teacher --preset {model} --out DIR` and pass DIR."
        )


_COLUMNS = [
    ("policy", "policy", "{}"),
    ("capacity_factor", "cf", "{:g}"),
    ("agreement", "top-1 agree (forced)", "{:.3f}"),
    ("kl", "KL/pos", "{:.4f}"),
    ("identical_frac", "identical seqs", "{:.3f}"),
    ("prefix_frac", "prefix frac", "{:.3f}"),
    ("rouge_l", "ROUGE-L", "{:.1f}"),
    ("overflow_frac", "overflow", "{:.3f}"),
    ("frac_tokens_degraded", "tok degraded", "{:.3f}"),
    ("mean_tokens_per_step", "tok/step", "{:.1f}"),
    ("bytes_per_token", "bytes/tok", "{:,.0f}"),
    ("memory_expert_equiv", "memory (experts)", "{:.2f}"),
    ("tokens_per_s", "tok/s", "{:.0f}"),
]


def serve_table(rows: list[dict[str, Any]], noise: list[dict[str, Any]], title: str) -> Table:
    """A rich table of system rows, then the noise-floor rows (unpatched model, other conditions)."""
    table = Table(title=title)
    for _, header, _ in _COLUMNS:
        table.add_column(header, justify="left" if header == "policy" else "right")
    cell = lambda v, fmt: "-" if v is None else fmt.format(v)  # noqa: E731
    for r in rows:
        table.add_row(*[cell(r.get(k), fmt) for k, _, fmt in _COLUMNS])
    for r in noise:
        table.add_row(*[cell({**r, "policy": f"noise: {r['noise']}"}.get(k), fmt) for k, _, fmt in _COLUMNS])
    return table


def plot_serving(
    rows: list[dict[str, Any]], noise: list[dict[str, Any]], path: str | Path, title: str
) -> Path:
    """PNG: teacher-forced top-1 agreement (left) and identical free-running sequences (right) vs cf."""
    from moe_understudy.report import pyplot, save_figure

    plt = pyplot()
    panels = [("agreement", "top-1 agreement, teacher-forced")]
    if any("identical_frac" in r for r in rows):
        panels.append(("identical_frac", "identical sequences, free-running"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels) + 3, 5), squeeze=False)
    lines: dict[str, list[dict]] = {}
    for r in rows:
        if r["capacity_factor"] is not None:
            lines.setdefault(r["policy"], []).append(r)
    for ax, (key, label) in zip(axes[0], panels, strict=True):
        for name, series in lines.items():
            series = sorted(series, key=lambda r: r["capacity_factor"])
            ax.plot([r["capacity_factor"] for r in series], [r[key] for r in series], marker="o", label=name)
        full = [r for r in rows if r["capacity_factor"] is None]
        if full:
            ax.axhline(full[0][key], color="black", linestyle="-", linewidth=1, label="full")
        for i, n in enumerate(noise):
            ax.axhline(
                n[key], color="grey", linestyle=("--", ":")[i % 2], linewidth=1, label=f"noise: {n['noise']}"
            )
        ax.set_xlabel("capacity factor (per decode step over its tokens)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def run_serve(cfg: ServeConfig, console: Console | None = None) -> dict[str, Any]:
    """`understudy serve-eval`: load, build prompts, reference run, every system, noise floor, report."""
    import json

    from moe_understudy.moe.loading import load_model_and_tokenizer

    console = console or Console(stderr=True)
    _refuse_preset_name(cfg.model)
    model, tokenizer = load_model_and_tokenizer(cfg.model, cfg.device)
    layers = find_moe_layers(model)  # a model without MoE layers stops here, in one sentence
    understudies = None
    if cfg.understudies:
        from moe_understudy.understudy.io import load_understudies

        understudies = load_understudies(cfg.understudies, model, device=cfg.device)
    check_policies(model, understudies, cfg.policies)
    prompts = load_prompts(cfg, tokenizer, notice=lambda m: console.print(f"[yellow]note:[/] {m}"))
    check_context(model, prompts, cfg.new_tokens if cfg.mode == DECODE else 0, cfg.model)
    eos = tokenizer.eos_token_id
    batching = Batching(
        slots=cfg.slots or len(prompts),
        new_tokens=cfg.new_tokens,
        eos_id=-1 if eos is None else int(eos),
        pad_id=int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)),
        prefill_chunk=cfg.prefill_chunk,
    )
    console.print(
        f"serve-eval [bold]{cfg.mode}[/]: {len(prompts)} prompts ({cfg.data}, up to {max(map(len, prompts))} tokens), "
        f"{batching.slots} slots, {cfg.new_tokens} new tokens; {len(layers)} MoE layers of {layers[0].num_experts} "
        f"experts (top-{layers[0].top_k}), priority {cfg.priority}, {cfg.num_devices} devices"
    )
    noise: list[dict[str, Any]] = []
    if cfg.mode == DECODE:
        reference = reference_run(model, prompts, batching)
        text = token_text(tokenizer, batching.eos_id)
        if cfg.noise_floor:
            noise = noise_floor_rows(model, prompts, batching, reference, text=text, bf16=cfg.bf16_floor)
        rows = decode_rows(
            model,
            understudies,
            prompts,
            batching,
            cfg.policies,
            cfg.capacities,
            reference,
            priority=cfg.priority,
            num_devices=cfg.num_devices,
            text=text,
        )
    else:
        rows = prefill_rows(
            model,
            understudies,
            prompts,
            batching,
            cfg.policies,
            cfg.capacities,
            priority=cfg.priority,
            num_devices=cfg.num_devices,
        )
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg.to_yaml(out / "serve.yaml")
    title = f"serving ({cfg.mode}): {len(prompts)} prompts, {batching.slots} slots, priority {cfg.priority}"
    json_path = out / "report.json"
    json_path.write_text(
        json.dumps({"config": cfg.to_dict(), "rows": rows, "noise_floor": noise}, indent=2, default=str)
    )
    png = plot_serving(rows, noise, out / "report.png", title)
    width = console.width
    console.width = max(width, 170)
    try:
        console.print(serve_table(rows, noise, title))
    finally:
        console.width = width
    console.print(f"report: [bold]{json_path}[/]  plot: [bold]{png}[/]")
    return {"rows": rows, "noise_floor": noise, "json": json_path, "png": png}
