"""Routing traces: capture from a model, synthetic Zipf skew, expansion to more experts."""

import torch

from moe_understudy.moe.adapters import find_moe_layers
from moe_understudy.moe.presets import build_model, preset_config
from moe_understudy.sim.traces import RoutingTrace, capture_trace, expand_trace, synthetic_trace


def max_over_mean(trace):
    load = trace.expert_load()
    return float((load.max(1).values / load.mean(1)).mean())


def test_captured_trace_is_the_routing_of_each_moe_layer():
    model = build_model(preset_config("quick", vocab_size=300), seed=0)
    blocks = torch.randint(0, 300, (3, 16), generator=torch.Generator().manual_seed(0))
    trace = capture_trace(model, blocks, batch_size=2)
    assert trace.indices.shape == (2, 48, 2) and trace.logits.shape == (2, 48, 4)
    assert torch.equal(trace.token_ids, blocks.reshape(-1))
    # layer 0's input is the embedding, so its routing can be recomputed directly
    layer0 = find_moe_layers(model)[0]
    with torch.no_grad():
        hidden = {}
        h = layer0.block.register_forward_pre_hook(lambda m, a: hidden.setdefault("x", a[0]))
        model(input_ids=blocks[:2])
        h.remove()
    r = layer0.route(hidden["x"].reshape(-1, 64))
    assert torch.equal(trace.indices[0, :32], r.indices)


def test_zipf_controls_skew():
    flat = synthetic_trace(2, 4000, 16, 2, zipf=0.0, seed=0)
    skewed = synthetic_trace(2, 4000, 16, 2, zipf=1.2, seed=0)
    assert max_over_mean(flat) < 1.15 < 2.0 < max_over_mean(skewed)
    assert (skewed.indices[..., 0] != skewed.indices[..., 1]).all()


def test_expansion_keeps_the_skew_and_multiplies_experts():
    t = synthetic_trace(2, 4000, 8, 2, zipf=1.0, seed=1)
    big = expand_trace(t, expert_factor=4, num_tokens=16000, seed=0)
    assert big.num_experts == 32 and big.num_tokens == 16000
    assert (big.indices // 4 < 8).all()
    assert abs(max_over_mean(big) - max_over_mean(t)) / max_over_mean(t) < 0.15
    # the top-k of the expanded logits is still the expanded indices (routing stays consistent)
    top = torch.topk(big.logits, 2, dim=-1).indices.sort(-1).values
    assert torch.equal(top, big.indices.sort(-1).values)


def test_trace_round_trips_through_safetensors(tmp_path):
    t = synthetic_trace(2, 100, 8, 2, zipf=1.0, seed=1)
    t.save(tmp_path / "t.safetensors")
    back = RoutingTrace.load(tmp_path / "t.safetensors")
    assert torch.equal(back.indices, t.indices) and back.source == t.source and back.token_ids is None


def test_token_expansion_sends_a_token_id_to_the_same_sibling_in_every_sample():
    g = torch.Generator().manual_seed(0)
    base = synthetic_trace(1, 200, 4, 1, zipf=0.0, seed=2)
    t = RoutingTrace(base.logits, base.weights, base.indices, torch.randint(0, 5, (200,), generator=g), "x")
    a = expand_trace(t, 8, 300, seed=1, sibling="token")
    b = expand_trace(t, 8, 300, seed=2, sibling="token")
    seen = {}
    for trace in (a, b):
        for tok, e in zip(trace.token_ids.tolist(), trace.indices[0, :, 0].tolist(), strict=True):
            assert seen.setdefault((tok, e // 8), e) == e
