"""The two kinds of stand-in the runtime serves overflow with, and what every stand-in reports.

A stand-in approximates part of one MoE layer's ROUTED output (shared experts stay local and are
always computed). The level says what it replaces:

- `TokenStandIn` (the *understudy*): ``forward(x) -> (T, H)`` approximates a token's whole routed
  output; a token with any overflowing assignment takes all of it from the understudy.
- `AssignmentStandIn`: ``forward(x, indices, weights) -> (T, H)`` has the contract of
  `MoELayer.experts` (weighted sum over the given (token, expert) assignments, index E skipped), so
  only the overflowing assignments are replaced. Per-expert shadows are one form; a shared,
  expert-conditioned network is another.

Both report `param_count`, `memory_expert_equiv` (stored size in units of one routed expert of the
layer held at 16 bits per weight: what every device holds per MoE layer beyond its own experts) and
their FLOPs, so every comparison can state memory and compute beside quality. A float stand-in's
memory is its parameter count over the expert's; weights stored in int8 (`understudy quantize`)
count half, their per-row scales one each. The runtime dispatches on the level, never on attribute
guesses.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

TOKEN = "token"
ASSIGNMENT = "assignment"


class StandIn(nn.Module):
    """Base of both kinds: sizes, cost and the keyword arguments that rebuild it."""

    level: ClassVar[str] = "?"
    arch: str = "?"
    # Weights whose every read goes through `weight(name)`, so they may be stored in int8.
    QUANTIZABLE: ClassVar[tuple[str, ...]] = ()

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.quantized: tuple[str, ...] = ()  # the weights held in int8 (understudy/quantize.py)

    def weight(self, name: str) -> torch.Tensor:
        """The weight `name` as the forward uses it: the parameter, or its int8 rows times their scales."""
        stored = getattr(self, name)
        if stored is None or stored.dtype != torch.int8:
            return stored
        scale = getattr(self, f"{name}_scale")
        return stored.to(scale.dtype) * scale

    def _int8_weights(self) -> list[torch.Tensor]:
        return [getattr(self, name) for name in self.quantized]

    def param_count(self) -> int:
        """Weights held, float or int8 (an int8 weight's scales are not counted)."""
        return sum(p.numel() for p in self.parameters()) + sum(q.numel() for q in self._int8_weights())

    def storage_units(self) -> float:
        """Stored size in 16-bit values: one per float parameter, half per int8 weight, one per scale."""
        scales = sum(getattr(self, f"{name}_scale").numel() for name in self.quantized)
        return (
            sum(p.numel() for p in self.parameters())
            + 0.5 * sum(q.numel() for q in self._int8_weights())
            + scales
        )

    def memory_expert_equiv(self, expert_params: int) -> float:
        """Stored size in units of one routed expert of `expert_params` weights (3 H I for SwiGLU) held at
        16 bits each; for a float stand-in, its parameters over the expert's."""
        return self.storage_units() / expert_params

    def config(self) -> dict[str, Any]:
        """Keyword arguments that rebuild this module's shapes."""
        raise NotImplementedError  # pragma: no cover - every concrete stand-in overrides


class TokenStandIn(StandIn):
    """x (T, H) -> (T, H) approximating the layer's whole routed output per token."""

    level: ClassVar[str] = TOKEN

    def flops_per_token(self) -> int:  # pragma: no cover - every subclass overrides
        raise NotImplementedError

    def token_flops(self, tokens: torch.Tensor) -> torch.Tensor:
        """(T,) FLOPs spent on each token when the understudy runs on `tokens` (T,) bool."""
        return tokens.double() * float(self.flops_per_token())


class AssignmentStandIn(StandIn):
    """Serves single (token, expert) assignments: called like `MoELayer.experts(x, indices, weights)`."""

    level: ClassVar[str] = ASSIGNMENT

    def forward(
        self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def pair_outputs(self, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """x (N, H), indices (N, n) -> (N, n, H): unweighted S(x, e) for each of the n experts (fitting)."""
        N, n = indices.shape
        one = torch.ones(N * n, 1, dtype=x.dtype, device=x.device)
        return self(x.repeat_interleave(n, 0), indices.reshape(-1, 1), one).view(N, n, -1)

    def flops_per_assignment(self) -> float:  # pragma: no cover - every subclass overrides
        """FLOPs of serving one assignment alone (a token with one overflowing assignment)."""
        raise NotImplementedError

    def token_flops(self, served: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        """(T,) FLOPs spent on each token when the assignments `served` (T, k) bool are stand-in served;
        `indices` (T, k) are their experts, for a stand-in whose cost differs by expert.

        Default: independent per assignment. A stand-in that shares work between a token's
        assignments (one trunk pass for all of them) overrides this.
        """
        return served.sum(-1).double() * float(self.flops_per_assignment())

    def flops_per_token(self) -> float:
        """A token whose every one of its k assignments is stand-in served (for cost ratios)."""
        k = getattr(self, "top_k", 1)
        return float(self.token_flops(torch.ones(1, k, dtype=torch.bool))[0])


def level_of(module: nn.Module | None) -> str | None:
    """ "token", "assignment", or None for no stand-in; anything else is refused with the fix."""
    if module is None:
        return None
    if isinstance(module, StandIn) and module.level in (TOKEN, ASSIGNMENT):
        return module.level
    raise TypeError(
        f"{type(module).__name__} is not a stand-in; subclass moe_understudy.moe.standins.TokenStandIn "
        f"(forward(x)) or AssignmentStandIn (forward(x, indices, weights))."
    )
