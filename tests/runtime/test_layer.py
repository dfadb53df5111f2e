"""The load-aware layer: `full` is the unpatched model; every other policy executes its plan."""

from __future__ import annotations

import pytest
import torch
from load_aware_helpers import CopyOfLayer, make_ids, tiny_model

from moe_understudy.config import RuntimeConfig
from moe_understudy.errors import UserError
from moe_understudy.moe.adapters import MoELayer, find_moe_layers
from moe_understudy.moe.presets import TINY_FAMILIES
from moe_understudy.moe.standins import AssignmentStandIn, TokenStandIn
from moe_understudy.runtime.layer import LoadAwareMoE, patch, unpatch
from moe_understudy.runtime.ledger import LoadRecorder


class Constant(TokenStandIn):
    """An understudy that answers `value` for every token and counts the rows it was asked for."""

    def __init__(self, hidden: int, value: float = 0.5):
        super().__init__(hidden)
        self.value = value
        self.rows: list[int] = []
        self.hidden = hidden

    def forward(self, x):
        self.rows.append(x.shape[0])
        return torch.full_like(x, self.value)

    def flops_per_token(self) -> int:
        return 0


class ExactShadows(AssignmentStandIn):
    """Shadows that are the experts themselves."""

    def __init__(self, moe: MoELayer):
        super().__init__(moe.hidden_size)
        self.moe = moe

    def forward(self, x, indices, weights):
        return self.moe.experts(x, indices, weights)

    def flops_per_assignment(self) -> float:
        return self.moe.expert_flops_per_token()


@pytest.fixture
def ids():
    return make_ids()


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("record", [False, True])
def test_full_policy_equals_unpatched_logits_and_gradients(family, record, ids):
    model = tiny_model(family)
    ref = model(input_ids=ids).logits
    ref.square().mean().backward()
    ref_grads = grads(model)
    model.zero_grad()

    patch(model, policy="full", recorder=LoadRecorder() if record else None)
    out = model(input_ids=ids).logits
    out.square().mean().backward()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    got = {n.replace(".block", ""): g for n, g in grads(model).items()}
    assert got.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        torch.testing.assert_close(got[name], g, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_capacity_policy_with_room_for_everything_equals_full(family, ids):
    model = tiny_model(family)
    ref = model(input_ids=ids).logits
    patch(model, policy="drop", capacity_factor=100.0)
    torch.testing.assert_close(model(input_ids=ids).logits, ref, atol=1e-5, rtol=0)


def test_drop_changes_the_output_when_experts_overflow(ids):
    model = tiny_model()
    ref = model(input_ids=ids).logits
    patch(model, policy="drop", capacity_factor=0.5)
    assert (model(input_ids=ids).logits - ref).abs().max() > 1e-3


def test_unpatch_restores_the_original_blocks(ids):
    model = tiny_model("qwen2_moe")
    blocks = [m.block for m in find_moe_layers(model)]
    ref = model(input_ids=ids).logits
    handle = patch(model, policy="drop", capacity_factor=0.5)
    assert all(isinstance(m.parent.mlp, LoadAwareMoE) for m in find_moe_layers(model))
    patch(model, policy="drop", capacity_factor=0.5)  # re-patching replaces, never nests
    assert [m.block for m in find_moe_layers(model)] == blocks
    handle.unpatch()
    assert [m.parent.mlp for m in find_moe_layers(model)] == blocks
    torch.testing.assert_close(model(input_ids=ids).logits, ref, atol=0, rtol=0)


def _one_layer(family="mixtral", T=24):
    model = tiny_model(family)
    moe = find_moe_layers(model)[0]
    x = torch.randn(1, T, moe.hidden_size, generator=torch.Generator().manual_seed(3))
    return model, moe, x


def test_understudy_tokens_get_the_understudy_output_and_others_the_experts():
    _, moe, x = _one_layer()
    stand_in = Constant(moe.hidden_size)
    cfg = RuntimeConfig(policy="understudy", capacity_factor=0.5, readmit=False)
    layer = LoadAwareMoE(moe, cfg, understudy=stand_in)
    flat = x[0]
    plan, _ = layer.plan(layer.route(flat))
    out = layer(x)[0]
    full = moe.forward_parts(flat)
    u = plan.understudy_tokens
    assert u.any() and (~u).any()
    torch.testing.assert_close(out[u], torch.full_like(out[u], 0.5))
    torch.testing.assert_close(out[~u], full[~u], atol=1e-6, rtol=0)
    assert stand_in.rows == [int(u.sum())]  # only the understudy tokens are sent to it


def test_understudy_that_copies_the_layer_reproduces_full(ids):
    model = tiny_model("qwen2_moe")  # with shared experts: those stay added for understudy tokens
    ref = model(input_ids=ids).logits
    stand_ins = {m.index: CopyOfLayer(m) for m in find_moe_layers(model)}
    for policy in ("understudy", "layer", "deadline"):
        patch(model, stand_ins, policy=policy, capacity_factor=0.5)
        torch.testing.assert_close(model(input_ids=ids).logits, ref, atol=1e-5, rtol=0)


def test_exact_shadows_reproduce_full_and_change_nothing_else(ids):
    model = tiny_model("olmoe")
    ref = model(input_ids=ids).logits
    shadows = {m.index: ExactShadows(m) for m in find_moe_layers(model)}
    rec = LoadRecorder()
    patch(model, shadows, policy="shadow", capacity_factor=0.5, recorder=rec)
    torch.testing.assert_close(model(input_ids=ids).logits, ref, atol=1e-5, rtol=0)
    assert sum(s.shadow for s in rec.steps) > 0


def test_deadline_runs_the_understudy_on_every_token_first():
    _, moe, x = _one_layer()
    stand_in = Constant(moe.hidden_size)
    layer = LoadAwareMoE(moe, RuntimeConfig(policy="deadline", capacity_factor=0.5), understudy=stand_in)
    layer(x)
    assert stand_in.rows == [x.shape[1]]


def test_layer_policy_replaces_the_whole_layer_when_overloaded():
    _, moe, x = _one_layer()
    stand_in = Constant(moe.hidden_size, value=0.25)
    hot = LoadAwareMoE(moe, RuntimeConfig(policy="layer", threshold=1.0), understudy=stand_in)
    torch.testing.assert_close(hot(x), torch.full_like(x, 0.25))
    calm = LoadAwareMoE(moe, RuntimeConfig(policy="layer", threshold=100.0), understudy=stand_in)
    torch.testing.assert_close(calm(x)[0], moe.forward_parts(x[0]), atol=1e-6, rtol=0)


def test_recorder_counts_every_assignment_once_per_layer_and_step(ids):
    model = tiny_model("deepseek_v3")
    rec = LoadRecorder()
    patch(model, policy="reroute", capacity_factor=0.75, recorder=rec)
    model(input_ids=ids)
    layers = find_moe_layers(model)
    assert [s.layer for s in rec.steps] == [m.index for m in layers]
    for s in rec.steps:
        k = layers[0].top_k
        assert s.tokens == ids.numel() and s.assignments == ids.numel() * k
        assert s.expert + s.dropped + s.shadow + s.understudy == s.assignments
        assert max(s.served_per_expert) <= s.capacity
        assert sum(s.tokens_per_expert) == s.assignments


def test_hot_expert_bias_raises_that_experts_load_without_touching_weights(ids):
    model = tiny_model()
    ref = model(input_ids=ids).logits
    weights = [m.block.gate.weight.clone() for m in find_moe_layers(model)]
    calm, hot = LoadRecorder(), LoadRecorder()
    handle = patch(model, recorder=calm)
    model(input_ids=ids)
    handle.configure(recorder=hot, logit_bias=torch.tensor([0.0, 0.0, 0.0, 100.0]))
    model(input_ids=ids)
    for c, h in zip(calm.steps, hot.steps, strict=True):
        assert h.tokens_per_expert[3] > c.tokens_per_expert[3]
        assert h.tokens_per_expert[3] == h.tokens  # a bias of 100 puts expert 3 in every top-2
    handle.configure(logit_bias=None)
    torch.testing.assert_close(model(input_ids=ids).logits, ref, atol=0, rtol=0)
    assert all(
        torch.equal(w, m.block.gate.weight) for w, m in zip(weights, find_moe_layers(model), strict=True)
    )


def test_policies_that_need_a_stand_in_refuse_to_run_without_one():
    model = tiny_model()
    with pytest.raises(UserError, match="understudy"):
        patch(model, policy="understudy")
    with pytest.raises(UserError, match="shadows"):
        patch(model, {m.index: Constant(32) for m in find_moe_layers(model)}, policy="shadow")
    with pytest.raises(UserError, match="not MoE layers"):
        patch(model, {99: Constant(32)}, policy="understudy")
    unpatch(model)


def test_configure_switches_policy_between_steps(ids):
    model = tiny_model()
    ref = model(input_ids=ids).logits
    handle = patch(model, policy="drop", capacity_factor=0.5)
    dropped = model(input_ids=ids).logits
    handle.configure(policy="full")
    torch.testing.assert_close(model(input_ids=ids).logits, ref, atol=1e-5, rtol=0)
    handle.configure(policy="drop")
    torch.testing.assert_close(model(input_ids=ids).logits, dropped, atol=0, rtol=0)


def test_capacity_per_rank_in_one_process_needs_simulated_devices():
    model = tiny_model("mixtral")
    with patch(model, policy="drop", capacity_scope="rank"), pytest.raises(UserError, match="--devices N"):
        model(input_ids=make_ids())
    rec = LoadRecorder()
    with patch(model, policy="drop", capacity_factor=0.5, capacity_scope="rank", num_devices=2, recorder=rec):
        model(input_ids=make_ids())
    for step in rec.steps:  # capacity per device = ceil(0.5 * 48 tokens * 2 / 2 devices) = 24 rows
        assert max(step.rank_rows) <= 24 and step.capacity == 24
