"""Every (policy, capacity factor) system served against the unpatched reference: forced and free-running rows.

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
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from moe_understudy.eval.batching import (
    DECODE,
    PREFILL,
    Batching,
    Forced,
    Greedy,
    Reference,
    prefill_prompts,
    serve,
)
from moe_understudy.eval.metrics import kl_per_token, top1_agreement
from moe_understudy.eval.quality import stand_in_sizes, systems
from moe_understudy.moe.adapters import find_moe_layers
from moe_understudy.runtime.layer import PatchedModel, check_stand_in, patch
from moe_understudy.runtime.ledger import LoadRecorder, StepLedger
from moe_understudy.runtime.policies import NEEDS_SHADOWS, NEEDS_UNDERSTUDY

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


class Phases:
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


def _load_row(phases: Phases, num_devices: int) -> dict[str, Any]:
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
            phases = Phases(handle, settings, LoadRecorder(), DECODE)
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
                free_phases = Phases(handle, settings, LoadRecorder(), "none")
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
            phases = Phases(handle, settings, LoadRecorder(), PREFILL)
            agree = kl = 0.0
            count = 0
            start = time.perf_counter()
            for g, seqs in enumerate(groups):
                running, logits = prefill_prompts(
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
