import itertools

import torch

from moe_understudy.kd.teachers import (
    RoutedBlock,
    RoutingRecorder,
    router_parameters,
    routing_mode,
    select_all,
    select_explore,
    select_ka,
)
from moe_understudy.moe.adapters import Routing, find_moe_layers
from moe_understudy.moe.presets import build_model, tiny_config


def _routing(logits: torch.Tensor, k: int = 2) -> Routing:
    w, i = torch.softmax(logits, -1).topk(k)
    return Routing(logits=logits, weights=w / w.sum(-1, keepdim=True), indices=i)


def _model(family="mixtral"):
    return build_model(tiny_config(family), seed=0)


def _ids():
    return torch.randint(2, 97, (2, 12), generator=torch.Generator().manual_seed(1))


def test_routing_mode_restores_the_original_blocks_and_native_mode_changes_nothing():
    model = _model()
    blocks = [layer.block for layer in find_moe_layers(model)]
    with torch.no_grad():
        ref = model(_ids()).logits
        with routing_mode(model, "native") as layers:
            assert all(isinstance(getattr(x.parent, x.attr), RoutedBlock) for x in layers)
            assert len(find_moe_layers(model)) == len(blocks)  # wrappers stay visible to the adapter
            native = model(_ids()).logits
    assert [getattr(x.parent, x.attr) for x in find_moe_layers(model)] == blocks
    torch.testing.assert_close(native, ref, rtol=0, atol=1e-6)


def test_all_mode_is_the_router_weighted_dense_mixture_of_every_expert():
    layer = find_moe_layers(_model())[0]
    x = torch.randn(1, 5, layer.hidden_size)
    with torch.no_grad():
        probs = layer.route(x[0]).probs()
        manual = torch.zeros(5, layer.hidden_size)
        for e in range(layer.num_experts):
            g, u, d = layer.expert_weights(e)
            manual += probs[:, e : e + 1] * ((layer.act_fn(x[0] @ g.T) * (x[0] @ u.T)) @ d.T)
        out = RoutedBlock(layer, select_all)(x)[0]
    torch.testing.assert_close(out, manual, rtol=1e-5, atol=1e-6)


def test_all_mode_uses_every_expert_zeroing_any_one_changes_the_output():
    model = _model()
    ids = _ids()
    with torch.no_grad(), routing_mode(model, "all"):
        ref = model(ids).logits
        for layer in find_moe_layers(model):
            for e in range(layer.num_experts):
                down = layer.block.experts.down_proj
                saved = down[e].clone()
                down[e].zero_()
                changed = (model(ids).logits - ref).abs().max().item()
                down[e].copy_(saved)
                assert changed > 1e-6, f"layer {layer.index} expert {e} does not contribute"


def test_all_mode_leaves_the_router_untouched():
    model = _model()
    before = [p.clone() for p in router_parameters(model)]
    with routing_mode(model, "all"):
        model(_ids()).logits.sum().backward()
    assert all(torch.equal(a, b) for a, b in zip(before, router_parameters(model), strict=True))


def test_ka_with_lambda_zero_takes_the_top_n_minus_one_with_softmax_over_chosen_logits():
    logits = torch.randn(50, 8)
    sel = select_ka(_routing(logits), num_active=7, lam=0.0)
    assert torch.equal(sel.indices.sort(-1).values, logits.topk(7).indices.sort(-1).values)
    expected = torch.softmax(logits.gather(-1, sel.indices), -1)
    torch.testing.assert_close(sel.weights, expected)
    assert not sel.explored.any()


def _prob_left_out(p: list[float], left_out: int) -> float:
    """P(the one expert not drawn is `left_out`) when drawing len(p)-1 experts without replacement from p."""
    total = 0.0
    for order in itertools.permutations([e for e in range(len(p)) if e != left_out]):
        prob, remaining = 1.0, 1.0
        for e in order:
            prob *= p[e] / remaining
            remaining -= p[e]
        total += prob
    return total


def test_ka_samples_the_expert_set_at_rate_lambda():
    # Near-uniform router over 4 experts: the top-3 leave out expert 0; a set of 3 sampled without
    # replacement leaves out expert 0 with probability P0 (about 1/4, computed exactly below), so the
    # chosen set differs from the top-3 at rate lambda * (1 - P0).
    torch.manual_seed(0)
    t, lam = 20_000, 0.2
    logits = torch.tensor([0.0, 0.01, 0.02, 0.03]).expand(t, 4).contiguous()
    sel = select_ka(_routing(logits), num_active=3, lam=lam, generator=torch.Generator().manual_seed(3))
    top = logits.topk(3).indices.sort(-1).values
    differs = (sel.indices.sort(-1).values != top).any(-1).float().mean().item()
    explored = sel.explored.float().mean().item()
    p_excluded_lowest = _prob_left_out(torch.softmax(logits[0], -1).tolist(), left_out=0)
    assert abs(explored - lam) < 0.015
    assert abs(differs - lam * (1 - p_excluded_lowest)) < 0.015
    assert not (sel.indices.sort(-1).values[~sel.explored] != top[~sel.explored]).any()


def test_ka_mode_on_a_model_runs_n_minus_one_experts_and_respects_ka_experts():
    model = _model()
    for n, expected in ((None, 3), (2, 2)):
        rec = RoutingRecorder()
        with torch.no_grad(), routing_mode(model, "ka", rec, ka_experts=n, ka_lambda=0.5):
            model(_ids())
        for layer in rec.layers():
            assert rec.executed(layer).shape[-1] == expected


def test_explore_visits_experts_the_native_router_never_picks():
    logits = torch.tensor([[8.0, 8.0, -8.0, -8.0]]).expand(500, 4).contiguous()
    assert set(_routing(logits).indices.unique().tolist()) == {0, 1}
    sel = select_explore(_routing(logits), eps=0.1, generator=torch.Generator().manual_seed(0))
    assert set(sel.indices.unique().tolist()) == {0, 1, 2, 3}
    assert sel.indices.shape == (500, 2)
    torch.testing.assert_close(sel.weights.sum(-1), torch.ones(500))


def test_explore_mode_visits_every_expert_of_every_layer_over_a_few_steps():
    for family in ("mixtral", "qwen3_moe"):
        model = _model(family)
        rec = RoutingRecorder()
        gen = torch.Generator().manual_seed(0)
        for step in range(5):
            with torch.no_grad(), routing_mode(model, "explore", rec, explore_eps=0.1, generator=gen):
                model(torch.randint(2, 97, (2, 8), generator=torch.Generator().manual_seed(step)))
        for layer in find_moe_layers(model):
            assert set(rec.executed(layer.index).unique().tolist()) == set(range(layer.num_experts))


def test_explore_weights_carry_gradient_to_the_router():
    model = _model()
    with routing_mode(model, "explore", explore_eps=0.1):
        model(_ids()).logits.pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in router_parameters(model))


def test_deepseek_all_and_ka_weights_keep_the_routed_scaling_factor_and_sigmoid_scores():
    cfg = tiny_config("deepseek_v3")
    cfg.routed_scaling_factor, cfg.norm_topk_prob = 2.5, True
    layer = find_moe_layers(build_model(cfg, seed=0))[0]
    with torch.no_grad():
        r = layer.route(torch.randn(6, layer.hidden_size))
    sigmoid = torch.sigmoid(r.logits.float())
    torch.testing.assert_close(r.probs(), sigmoid / sigmoid.sum(-1, keepdim=True))
    # The native top-k weights sum to the scale, and so must every mode's combine weights.
    torch.testing.assert_close(r.weights.sum(-1), torch.full((6,), 2.5))
    full = torch.full((6,), 2.5)
    torch.testing.assert_close(select_all(r).weights.sum(-1), full)
    torch.testing.assert_close(select_ka(r, num_active=7, lam=0.5).weights.sum(-1), full)
    torch.testing.assert_close(select_explore(r, eps=0.1).weights.sum(-1), full)
