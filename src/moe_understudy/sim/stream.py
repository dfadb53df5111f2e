"""Token streams: which captured tokens each rank's attention feeds the MoE layers at every step.

Data-parallel attention + expert parallelism: every rank serves its own requests, so at step t rank
r holds its own `tokens_per_rank` tokens, and the MoE step is over all ranks' tokens (rank-major,
rank r's tokens contiguous, as `ledger.Topology.token_device` places them).

- decode: each rank keeps `tokens_per_rank` sequences; every step each emits its next token. A
  sequence is `sequence_tokens` consecutive tokens of a captured block, from a random position
  (routed as captured, with the block as its context); when it ends, a new one is drawn from the
  scenario's source at that step (continuous batching). Sequences start part-way through, so they
  do not end together. Time is compressed: real decode runs hundreds of tokens per sequence, so a
  shift that turns the batch over in `sequence_tokens` steps here takes that many times longer
  there; refresh intervals are chosen in the same units.
- prefill: each rank takes whole blocks, ``tokens_per_rank / block_size`` of them per step.

Scenarios (the source new sequences are drawn from, uniformly, at step t):
- natural: held-out text of the teacher's own domain, every step;
- domain_shift: natural until step ``shift_at * steps``, prose (`domain_shift_blocks`) after it;
  under decode the sequences in flight finish first, so the load moves over one block length;
- hot_burst: natural, and every `burst_every` steps a burst of `burst_len` steps during which one
  expert per layer (drawn per burst) gets `burst_bias` added to its router logit (the runtime's
  hot-expert scenario, applied to the captured logits: routing only, see `traces.biased_routing`).
Steps before 0 are warm-up: their load plans the first stale EPLB and they are not timed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from moe_understudy.sim.traces import RoutingTrace


@dataclass(frozen=True)
class Source:
    """A trace holding `natural` blocks then `prose` blocks, each `block_size` consecutive rows."""

    trace: RoutingTrace
    block_size: int
    natural_blocks: int
    prose_blocks: int = 0

    def block_starts(self, prose: bool) -> torch.Tensor:
        """(n,) first trace row of every natural (or prose) block."""
        first = self.natural_blocks if prose else 0
        n = self.prose_blocks if prose else self.natural_blocks
        return (first + torch.arange(n)) * self.block_size


@dataclass(frozen=True)
class StreamConfig:
    scenario: str
    num_ranks: int
    tokens_per_rank: int
    steps: int
    warmup_steps: int
    phase: str = "decode"
    sequence_tokens: int = 32
    shift_at: float = 0.25
    burst_every: int = 48
    burst_len: int = 16
    seed: int = 0

    @property
    def shift_step(self) -> int:
        return int(self.shift_at * self.steps)


@dataclass(frozen=True)
class StepTokens:
    """The tokens of one step: trace rows (T,) rank-major, and the burst's hot expert per layer, if any."""

    step: int  # < 0 during warm-up
    rows: torch.Tensor
    hot: torch.Tensor | None  # (L,) expert ids, or None outside a burst
    prose_fraction: float  # share of the step's tokens from prose blocks


def in_burst(step: int, cfg: StreamConfig) -> bool:
    return step >= 0 and step % cfg.burst_every >= cfg.burst_every - cfg.burst_len


def hot_experts(step: int, cfg: StreamConfig, num_layers: int, num_experts: int) -> torch.Tensor:
    """(L,) the expert each layer's burst heats (one draw per burst, fixed by the seed)."""
    burst = step // cfg.burst_every
    g = torch.Generator().manual_seed(cfg.seed * 7919 + burst)
    return torch.randint(num_experts, (num_layers,), generator=g)


def stream(source: Source, cfg: StreamConfig) -> Iterator[StepTokens]:
    """The steps -warmup_steps .. steps - 1 of `cfg.scenario`."""
    if cfg.scenario == "domain_shift" and source.prose_blocks == 0:
        raise ValueError("domain_shift needs prose blocks in the source.")
    g = torch.Generator().manual_seed(cfg.seed)
    natural, prose = source.block_starts(False), source.block_starts(True)
    S = source.block_size

    def draw(step: int, n: int) -> torch.Tensor:
        pool = prose if cfg.scenario == "domain_shift" and step >= cfg.shift_step else natural
        return pool[torch.randint(len(pool), (n,), generator=g)]

    L, E = source.trace.num_layers, source.trace.num_experts
    first_prose = source.natural_blocks * S

    def tokens(step: int, rows: torch.Tensor) -> StepTokens:
        burst = cfg.scenario == "hot_burst" and in_burst(step, cfg)
        hot = hot_experts(step, cfg, L, E) if burst else None
        return StepTokens(step, rows, hot, float((rows >= first_prose).double().mean()))

    if cfg.phase == "prefill":
        per_rank = -(-cfg.tokens_per_rank // S)
        for step in range(-cfg.warmup_steps, cfg.steps):
            starts = draw(step, cfg.num_ranks * per_rank).view(cfg.num_ranks, per_rank)
            rows = (starts[:, :, None] + torch.arange(S)).reshape(cfg.num_ranks, -1)
            yield tokens(step, rows[:, : cfg.tokens_per_rank].reshape(-1))
        return
    n = cfg.num_ranks * cfg.tokens_per_rank
    length = min(cfg.sequence_tokens, S)

    def sequences(step: int, count: int) -> torch.Tensor:  # first row of `count` new sequences
        return draw(step, count) + torch.randint(S - length + 1, (count,), generator=g)

    start = sequences(-cfg.warmup_steps, n)
    offset = torch.randint(length, (n,), generator=g)
    for step in range(-cfg.warmup_steps, cfg.steps):
        yield tokens(step, start + offset)
        offset = offset + 1
        done = offset == length
        if done.any():
            start[done] = sequences(step + 1, int(done.sum()))
            offset[done] = 0
