"""MoE-aware routing modes for distillation: ALL, KA, SAR's trainable router, B-Distill's MC exploration.

Every mode is a *selector* — a pure function `Routing -> Selection` (which experts each token uses
and with what combine weights). `RoutedBlock` is the execution core (runtime/core.py) with the
selector as its planner — every selected assignment expert-served — installed through
`MoELayer.replace` for the duration of a `routing_mode(...)` context:

    r = layer.route(x)                        # router logits (T, E) and the native top-k
    sel = selector(r)                         # indices (T, n), weights (T, n)
    y = layer.experts(x, sel.indices, sel.weights) (+ layer.shared(x))

Modes (N = experts per layer, k = the model's top-k, p = softmax(router logits)):

- ``native``: the router's own top-k (useful to record routing without changing it).
- ``all`` (EEM "ALL"): every expert active, combined by the full router distribution p. The router
  is untouched. SAR uses this mode with the router's weights trainable.
- ``ka`` (EEM Knowledge Augmentation): n = N-1 experts (configurable). Per token, with probability
  lambda the n experts are drawn by sampling without replacement from p; otherwise the top-n of
  the logits are taken. Combine weights are softmax over the chosen logits (all others masked).
- ``explore`` (B-Distill Monte Carlo exploration, our formulation — only the abstract is public):
  per token the model's k experts are drawn without replacement from the perturbed distribution
  p~ = (1 - eps) p + eps / N, and weighted by p renormalised over the chosen experts. Every expert has
  probability at least eps / N per draw, so over training every expert of the teacher and of an MoE
  student is visited and receives gradient; the router still gets gradient through the weights.

Routing decisions can be recorded into an explicit `RoutingRecorder` passed in (never a global).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from moe_understudy.moe.adapters import MoELayer, Routing, find_moe_layers
from moe_understudy.runtime.core import MoECore
from moe_understudy.runtime.plan import everything_to_experts

MODES = ("native", "all", "ka", "explore")


@dataclass(frozen=True)
class Selection:
    """Experts executed for each token.

    indices: (T, n) expert ids; weights: (T, n) combine weights;
    explored: (T,) bool, tokens whose choice was sampled rather than taken from the top.
    """

    indices: torch.Tensor
    weights: torch.Tensor
    explored: torch.Tensor


# ---- selectors: pure functions of a Routing --------------------------------------------------


def select_native(r: Routing) -> Selection:
    """The router's own top-k and weights."""
    return Selection(
        r.indices, r.weights, torch.zeros(r.indices.shape[0], dtype=torch.bool, device=r.indices.device)
    )


def _renormalised(probs: torch.Tensor, indices: torch.Tensor, scale: float) -> torch.Tensor:
    """(T, n) combine weights: router probabilities of the chosen experts summing to `scale`.

    For a softmax router this equals the softmax over the chosen logits (all others masked); the
    scale keeps DeepSeek-V3's routed_scaling_factor, which its experts were trained under.
    """
    chosen = probs.gather(-1, indices)
    return scale * chosen / chosen.sum(-1, keepdim=True).clamp_min(1e-9)


def select_all(r: Routing) -> Selection:
    """All N experts, weighted by the full router distribution (times the family's scale): (T, N)."""
    t, n = r.logits.shape
    indices = torch.arange(n, device=r.logits.device).expand(t, n)
    explored = torch.zeros(t, dtype=torch.bool, device=r.logits.device)
    return Selection(indices, r.scale * r.probs(), explored)


def _draw_device(generator: torch.Generator | None, device: torch.device) -> torch.device:
    """Where random draws happen: on the generator's device (a CPU generator serves a CUDA model), else `device`."""
    return generator.device if generator is not None else device


def select_ka(r: Routing, num_active: int, lam: float, generator: torch.Generator | None = None) -> Selection:
    """KA: `num_active` experts per token, sampled from p with probability `lam`, else the top ones.

    indices (T, n); weights = p over the chosen experts, renormalised (for a softmax router, the
    softmax of the chosen logits) (T, n); explored (T,) the sampled tokens.
    """
    probs = r.probs()  # (T, N)
    t, n_exp = probs.shape
    if not 0 < num_active <= n_exp:
        raise ValueError(f"KA needs 0 < num_active <= {n_exp} experts, got {num_active}.")
    top = r.logits.float().topk(num_active, dim=-1).indices  # (T, n)
    with torch.no_grad():
        at = _draw_device(generator, probs.device)
        explored = (torch.rand(t, generator=generator, device=at) < lam).to(probs.device)  # (T,)
        sampled = torch.multinomial(probs.to(at), num_active, replacement=False, generator=generator)
        sampled = sampled.to(probs.device)
    indices = torch.where(explored[:, None], sampled, top)
    return Selection(indices, _renormalised(probs, indices, r.scale), explored)


def select_explore(r: Routing, eps: float, generator: torch.Generator | None = None) -> Selection:
    """B-Distill MC exploration: k experts drawn without replacement from (1 - eps) p + eps / N.

    indices (T, k); weights = p over the chosen experts, renormalised (gradient reaches the router).
    """
    probs = r.probs()  # (T, N)
    k = r.top_k
    with torch.no_grad():
        perturbed = (1.0 - eps) * probs + eps / probs.shape[-1]
        at = _draw_device(generator, probs.device)
        indices = torch.multinomial(perturbed.to(at), k, replacement=False, generator=generator)  # (T, k)
        indices = indices.to(probs.device)
    explored = torch.ones(indices.shape[0], dtype=torch.bool, device=indices.device)
    return Selection(indices, _renormalised(probs, indices, r.scale), explored)


# ---- recording and execution -----------------------------------------------------------------


@dataclass
class RoutingRecorder:
    """Collects, per forward, each layer's router logits and the experts actually executed.

    `records[layer_index]` is a list of (logits (T, E), native top-k (T, k), executed (T, n)), one per
    call; call `clear()` between steps.
    """

    records: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = field(default_factory=dict)

    def record(self, step) -> None:
        """`step`: a runtime.core.Step of a routed block (the core's recorder interface)."""
        self.records.setdefault(step.moe.index, []).append(
            (step.routing.logits, step.routing.indices, step.plan.indices)
        )

    def clear(self) -> None:
        self.records.clear()

    def layers(self) -> list[int]:
        return sorted(self.records)

    def logits(self, layer: int) -> torch.Tensor:
        """(T, E) router logits of `layer`, concatenated over the calls since the last clear."""
        return torch.cat([rec[0] for rec in self.records[layer]])

    def native_indices(self, layer: int) -> torch.Tensor:
        return torch.cat([rec[1] for rec in self.records[layer]])

    def executed(self, layer: int) -> torch.Tensor:
        return torch.cat([rec[2] for rec in self.records[layer]])


class RoutedBlock(MoECore):
    """The execution core routing by `selector`: every selected (token, expert) pair goes to its expert."""

    def __init__(
        self,
        layer: MoELayer,
        selector: Callable[[Routing], Selection],
        recorder: RoutingRecorder | None = None,
    ) -> None:
        super().__init__(layer, self._plan, recorder=recorder)
        self.selector = selector

    def _plan(self, routing: Routing):
        sel = self.selector(routing)
        return everything_to_experts(sel.indices, sel.weights), None


def selector_for(
    mode: str,
    *,
    ka_experts: int | None = None,
    ka_lambda: float = 0.05,
    explore_eps: float = 0.1,
    generator: torch.Generator | None = None,
    num_experts: int,
) -> Callable[[Routing], Selection]:
    """The selector of `mode` with its parameters bound (`ka_experts` None means N-1)."""
    if mode == "native":
        return select_native
    if mode == "all":
        return select_all
    if mode == "ka":
        n = num_experts - 1 if ka_experts is None else ka_experts
        return lambda r: select_ka(r, n, ka_lambda, generator)
    if mode == "explore":
        return lambda r: select_explore(r, explore_eps, generator)
    raise ValueError(f"Unknown routing mode {mode!r}; choose one of {', '.join(MODES)}.")


@contextmanager
def routing_mode(
    model: nn.Module,
    mode: str,
    recorder: RoutingRecorder | None = None,
    **selector_kw,
) -> Iterator[list[MoELayer]]:
    """Inside the block every MoE layer of `model` routes by `mode`; the original blocks come back after.

    `selector_kw`: ka_experts, ka_lambda, explore_eps, generator (see `selector_for`).
    """
    layers = find_moe_layers(model)
    for layer in layers:
        layer.replace(
            RoutedBlock(layer, selector_for(mode, num_experts=layer.num_experts, **selector_kw), recorder)
        )
    try:
        yield layers
    finally:
        for layer in layers:
            layer.restore()


def router_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The routers' own parameters (gate weights and biases) of every MoE layer — what SAR trains."""
    return [p for layer in find_moe_layers(model) for p in layer.block.gate.parameters()]
