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


def test_sibling_split_keeps_parents_and_distinct_choices_and_is_fixed_per_token():
    from moe_understudy.sim.expansion import Expansion, SiblingSplit

    t = synthetic_trace(2, 2000, 8, 3, zipf=1.0, seed=3)
    split = SiblingSplit(Expansion(4, alpha=1.0, context=0.5, seed=0), 2, 8)
    rows = torch.arange(2000)
    kids = split.children(1, t.indices[1], t.weights[1], rows)
    assert split.num_experts == 32 and torch.equal(kids // 4, t.indices[1])
    again = split.children(1, t.indices[1, 100:], t.weights[1, 100:], rows[100:])
    assert torch.equal(again, kids[100:])  # a token's sibling does not depend on the batch it is in
    # a parent chosen twice (a coarsened trace) still gives distinct siblings
    twice = torch.tensor([[0, 0, 1], [2, 2, 2]])
    c = split.children(0, twice, torch.tensor([[0.5, 0.3, 0.2]] * 2), torch.tensor([0, 1]))
    assert all(len(set(row)) == 3 for row in c.tolist()) and torch.equal(c // 4, twice)


def test_equal_shares_keep_the_captured_skew_and_uneven_shares_add_to_it():
    from moe_understudy.sim.expansion import Expansion, SiblingSplit, mean_stats

    t = synthetic_trace(1, 8000, 8, 2, zipf=1.0, seed=1)
    base = mean_stats(t.indices, 8, 100)
    rows = torch.arange(8000)
    even = SiblingSplit(Expansion(4), 1, 8).children(0, t.indices[0], t.weights[0], rows)[None]
    uneven = SiblingSplit(Expansion(4, alpha=0.5), 1, 8).children(0, t.indices[0], t.weights[0], rows)[None]
    assert abs(mean_stats(even, 32, 100)["load_cv"] - base["load_cv"]) < 0.15
    assert mean_stats(uneven, 32, 100)["load_cv"] > base["load_cv"] + 0.3


def test_expansion_fit_reproduces_the_captured_statistics_better_than_random_siblings():
    from moe_understudy.sim.expansion import fit_expansion

    t = synthetic_trace(2, 4096, 16, 4, zipf=1.2, seed=5)
    fit = fit_expansion(t, 2, 64, alphas=(0.5, 2.0, float("inf")), contexts=(0.0, 0.5))
    assert len(fit.grid) == 6 and fit.loss <= fit.random_loss
    assert set(fit.real) == {"max_over_mean", "load_cv", "coactivation_sd", "block_dispersion"}
    assert fit.to_dict()["expansion"]["factor"] == 2


def test_biased_routing_heats_the_expert_and_keeps_the_family_normalisation():
    from moe_understudy.sim.traces import biased_routing, renormalises

    t = synthetic_trace(1, 3000, 8, 2, zipf=0.5, seed=2)
    assert renormalises(t)
    bias = torch.zeros(8)
    bias[3] = 3.0
    w, i = biased_routing(t.logits[0], bias, 2, renormalise=True)
    assert (i == 3).any(-1).float().mean() > 2 * (t.indices[0] == 3).any(-1).float().mean()
    assert torch.allclose(w.sum(-1), torch.ones(3000))
    w0, i0 = biased_routing(t.logits[0], torch.zeros(8), 2, renormalise=True)
    assert torch.equal(i0.sort(-1).values, t.indices[0].sort(-1).values)
