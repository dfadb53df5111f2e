"""The gated trunk: a bounded-memory assignment-level stand-in shared by all experts of a layer."""

from __future__ import annotations

import pytest
import torch

from moe_understudy.moe.standins import ASSIGNMENT, level_of
from moe_understudy.understudy.layerwise import AssignmentObjective, fit_layer
from moe_understudy.understudy.modules import GatedTrunk, build_understudy, from_config

H, INTER, E, K = 32, 32, 4, 2  # tiny mixtral: hidden, expert intermediate, experts, top-k


def test_the_trunk_serves_single_assignments_and_reports_its_size(tiny_layer):
    trunk = build_understudy("trunk", tiny_layer, seed=0, usage=torch.ones(E))
    w = trunk.width
    assert level_of(trunk) == ASSIGNMENT and w == (3 * H * INTER) // (6 * H + 8)  # about INTER / 2
    assert trunk.param_count() == 3 * H * w + E * 3 * w
    # memory per device in routed experts: under half an expert plus the per-expert vectors
    expert = tiny_layer.expert_params()
    assert trunk.memory_expert_equiv(expert) == pytest.approx((3 * H * w + 3 * E * w) / expert)
    # a lone served assignment costs at most half an expert's FLOPs, and the next width would not
    assert trunk.flops_per_assignment() <= 0.5 * tiny_layer.expert_flops_per_token()
    assert GatedTrunk(H, E, K, w + 1).flops_per_assignment() > 0.5 * tiny_layer.expert_flops_per_token()


def test_the_default_width_without_shifts_keeps_a_lone_assignment_within_half_an_expert(tiny_layer):
    # without shifts a token pays the mix of the scales instead of FiLM per pair: the default width
    # follows that cost, not the FiLM trunk's
    trunk = build_understudy("trunk", tiny_layer, seed=0, film=False, usage=torch.ones(E))
    half = 0.5 * tiny_layer.expert_flops_per_token()
    assert trunk.flops_per_assignment() <= half
    assert GatedTrunk(H, E, K, trunk.width + 1, film=False).flops_per_assignment() > half
    # at the demo teacher's sizes the FiLM trunk's width (126) would be too wide without shifts
    half = 3 * 128 * 256
    w = GatedTrunk.widest(128, 8, half, adapter_rank=0, film=False)
    assert w < GatedTrunk.widest(128, 8, half, adapter_rank=0, film=True) == 126
    assert GatedTrunk(128, 8, 2, w, film=False).flops_per_assignment() <= half
    assert GatedTrunk(128, 8, 2, w + 1, film=False).flops_per_assignment() > half


def test_adapters_add_their_parameters_and_per_pair_flops_and_start_as_the_plain_trunk(
    tiny_layer, routed_rows
):
    plain = build_understudy("trunk", tiny_layer, seed=0, width=8, usage=torch.ones(E))
    adapted = build_understudy("trunk", tiny_layer, seed=0, width=8, usage=torch.ones(E), adapter_rank=3)
    assert adapted.param_count() == plain.param_count() + 2 * H * E * 3
    assert adapted.flops_per_assignment() == plain.flops_per_assignment() + 4 * H * 3
    rows = routed_rows(tiny_layer, n=8)
    torch.testing.assert_close(
        adapted(rows["x"], rows["indices"], rows["weights"]),
        plain(rows["x"], rows["indices"], rows["weights"]),
    )
    assert from_config("trunk", adapted.config()).adapter_rank == 3
    # the default width leaves room for the adapter within half an expert's FLOPs per lone assignment
    default = build_understudy("trunk", tiny_layer, seed=0, usage=torch.ones(E), adapter_rank=3)
    assert default.flops_per_assignment() <= 0.5 * tiny_layer.expert_flops_per_token()


def test_per_expert_adapter_ranks_are_charged_at_each_experts_own_rank(tiny_layer):
    ranks = (0, 5, 1, 2)
    plain = build_understudy("trunk", tiny_layer, seed=0, width=8, init="random")
    trunk = build_understudy("trunk", tiny_layer, seed=0, width=8, init="random", adapter_rank=ranks)
    assert trunk.param_count() == plain.param_count() + 2 * H * sum(ranks)
    assert trunk.adapter_rank == 5  # a lone assignment costs at most the largest rank's adapter
    assert trunk.flops_per_assignment() == plain.flops_per_assignment() + 4 * H * 5
    served = torch.tensor([[True, True], [True, False], [False, False]])
    indices = torch.tensor([[0, 1], [3, 2], [1, 2]])
    extra = trunk.token_flops(served, indices) - plain.token_flops(served, indices)
    assert extra.tolist() == [4 * H * (0 + 5), 4 * H * 2, 0.0]
    # without the experts, every pair is charged at the largest rank: never under the true cost
    assert (trunk.token_flops(served) >= trunk.token_flops(served, indices)).all()
    rebuilt = from_config("trunk", trunk.config())
    assert rebuilt.adapter_ranks == ranks and rebuilt.param_count() == trunk.param_count()


def test_a_trunk_saved_with_adapters_as_one_matrix_per_expert_loads_to_the_same_outputs(
    tiny_layer, routed_rows
):
    trunk = _perturbed_adapters(build_understudy("trunk", tiny_layer, seed=0, init="random", adapter_rank=3))
    state = dict(trunk.state_dict())
    a, b = state["adapter_in"], state["adapter_out"]  # (E r, H) each, B transposed
    state["adapter_in"] = a.view(E, 3, H).clone()  # the earlier layout: A (E, r, H), B (E, H, r)
    state["adapter_out"] = b.view(E, 3, H).transpose(1, 2).clone()
    reloaded = build_understudy("trunk", tiny_layer, seed=1, init="random", adapter_rank=3)
    reloaded.load_state_dict(state)
    rows = routed_rows(tiny_layer, n=8)
    torch.testing.assert_close(
        reloaded(rows["x"], rows["indices"], rows["weights"]),
        trunk(rows["x"], rows["indices"], rows["weights"]),
    )


def test_overflow_ranks_share_the_budget_by_mass_under_the_cap_and_sum_to_it():
    from moe_understudy.understudy.assignment import overflow_ranks

    ranks = overflow_ranks(torch.tensor([0.6, 0.3, 0.1, 0.0]), total=16, cap=6)
    assert sum(ranks) == 16 and max(ranks) <= 6
    assert ranks[0] == 6 and ranks[1] == 6  # capped; what they could not take went to the rest
    assert ranks[2] > ranks[3]
    assert overflow_ranks(torch.tensor([3.0, 1.0]), total=8, cap=100) == (6, 2)  # in proportion
    assert overflow_ranks(torch.zeros(4), total=12, cap=8) == (3, 3, 3, 3)  # no overflow seen: uniform
    assert overflow_ranks(torch.tensor([1.0, 0.0]), total=10, cap=3) == (3, 3)  # never over E x cap


def test_a_tokens_assignments_share_one_trunk_pass(tiny_layer):
    trunk = build_understudy("trunk", tiny_layer, seed=0, usage=torch.ones(E))
    served = torch.tensor([[True, True], [True, False], [False, False]])
    flops = trunk.token_flops(served)
    pass_ = 6 * H * trunk.width
    assert flops.tolist() == [pass_ + 2 * 8 * trunk.width, pass_ + 8 * trunk.width, 0.0]


def test_without_shifts_a_tokens_assignments_cost_one_pass_and_one_mix_of_the_scales(tiny_layer):
    # without FiLM shifts the hidden units are the expert's own no more: the served pairs' scales are
    # mixed per token by one (1, E) x (E, w) product, whatever the number of pairs
    trunk = build_understudy("trunk", tiny_layer, seed=0, film=False, usage=torch.ones(E))
    served = torch.tensor([[True, True], [True, False], [False, False]])
    per_token = 6 * H * trunk.width + 2 * E * trunk.width + 3 * trunk.width
    assert trunk.token_flops(served).tolist() == [per_token, per_token, 0.0]
    assert trunk.flops_per_assignment() == per_token


def test_when_most_rows_are_served_the_pass_of_every_row_is_charged(tiny_layer):
    # from 80% of the rows served the forward runs the trunk on every row, so all rows are charged
    trunk = build_understudy("trunk", tiny_layer, seed=0, film=False, usage=torch.ones(E))
    per_token = trunk.flops_per_assignment()
    four_of_five = torch.tensor([[True, False]] * 4 + [[False, False]])
    assert trunk.token_flops(four_of_five).tolist() == [per_token] * 5
    three_of_five = torch.tensor([[True, False]] * 3 + [[False, False]] * 2)
    assert trunk.token_flops(three_of_five).tolist() == [per_token] * 3 + [0.0, 0.0]


def test_the_sum_over_a_tokens_assignments_is_the_sum_of_single_assignments(tiny_layer, routed_rows):
    trunk = build_understudy("trunk", tiny_layer, seed=0, init="random")
    with torch.no_grad():
        trunk.shift.normal_()
        trunk.scale.uniform_(0.5, 1.5)
    rows = routed_rows(tiny_layer, n=16)
    together = trunk(rows["x"], rows["indices"], rows["weights"])
    apart = sum(
        trunk(rows["x"], rows["indices"][:, j : j + 1], rows["weights"][:, j : j + 1]) for j in range(K)
    )
    torch.testing.assert_close(together, apart, rtol=1e-5, atol=1e-6)


def test_skipped_assignments_contribute_nothing(tiny_layer):
    trunk = GatedTrunk(H, E, K, width=8)
    x = torch.randn(3, H)
    assert torch.equal(trunk(x, torch.full((3, K), E), torch.ones(3, K)), torch.zeros(3, H))


def test_a_union_warm_start_gives_each_expert_its_own_pruned_units(tiny_layer, routed_rows):
    trunk = build_understudy("trunk", tiny_layer, seed=0, width=E * INTER, film=False, init="union")
    rows = routed_rows(tiny_layer, n=32)
    # every unit of every expert kept: the trunk is exactly the experts
    torch.testing.assert_close(
        trunk(rows["x"], rows["indices"], rows["weights"]), rows["y"], rtol=1e-5, atol=1e-5
    )


def test_the_trunk_rebuilds_from_its_config(tiny_layer):
    trunk = build_understudy("trunk", tiny_layer, seed=0, width=12, film=False, usage=torch.ones(E))
    again = from_config("trunk", trunk.config())
    assert again.config() == trunk.config() and again.shift is None


def test_fitting_per_assignment_expert_targets_lowers_the_held_out_error(tiny_layer, routed_rows):
    trunk = build_understudy("trunk", tiny_layer, seed=0, width=2 * INTER, usage=torch.ones(E))
    objective = AssignmentObjective(tiny_layer, extra=1)
    train, val = routed_rows(tiny_layer, n=1024, seed=1), routed_rows(tiny_layer, n=128, seed=2)
    fit = fit_layer(
        trunk, train, val, objective=objective, steps=300, batch_tokens=256, lr=1e-2, eval_every=100
    )
    assert fit.val_error < 0.6 * fit.val_error_start


def test_the_assignment_objective_draws_extra_experts_outside_the_top_k(tiny_layer, routed_rows):
    rows = routed_rows(tiny_layer, n=64)
    idx, w = AssignmentObjective(tiny_layer, extra=1)._pairs(rows, torch.Generator().manual_seed(0))
    assert idx.shape == (64, K + 1) and (w > 0).all()
    assert not (idx[:, K:] == idx[:, :K]).any(-1).any()  # the extra expert is not one of the routed


def _perturbed_adapters(trunk):
    if trunk.adapter_rank:  # B starts at zero, where the adapter would be invisible
        with torch.no_grad():
            trunk.adapter_out.normal_(std=0.1)
    return trunk


@pytest.mark.parametrize("adapter_rank", [3, (0, 5, 1, 2)], ids=["uniform", "per-expert"])
def test_adapters_add_each_served_pairs_own_low_rank_product(tiny_layer, routed_rows, adapter_rank):
    trunk = _conditioned_trunk(tiny_layer, True, adapter_rank)
    rows = routed_rows(tiny_layer, n=8)
    x, indices, weights = rows["x"], rows["indices"].clone(), rows["weights"]
    indices[::3, 1] = E  # some slots not served
    with torch.no_grad():
        adapted = trunk(x, indices, weights)
        b_stack = trunk.adapter_out.clone()
        trunk.adapter_out.zero_()
        plain = trunk(x, indices, weights)
    start = trunk._adapter_start
    want = torch.zeros_like(x)
    for t, j in (indices < E).nonzero().tolist():
        e = int(indices[t, j])
        a, b = trunk.adapter_in[start[e] : start[e + 1]], b_stack[start[e] : start[e + 1]]
        want[t] += weights[t, j] * ((a @ x[t]) @ b).detach()
    torch.testing.assert_close(adapted - plain, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("adapter_rank", [0, 3, (0, 5, 1, 2)], ids=["none", "uniform", "per-expert"])
def test_the_trunks_per_pair_outputs_equal_serving_each_assignment_alone(
    tiny_layer, routed_rows, adapter_rank
):
    from moe_understudy.moe.standins import AssignmentStandIn

    trunk = build_understudy("trunk", tiny_layer, seed=0, init="random", adapter_rank=adapter_rank)
    with torch.no_grad():
        trunk.shift.normal_()
    _perturbed_adapters(trunk)
    rows = routed_rows(tiny_layer, n=8)
    generic = AssignmentStandIn.pair_outputs(trunk, rows["x"], rows["indices"])  # one forward per pair
    torch.testing.assert_close(trunk.pair_outputs(rows["x"], rows["indices"]), generic, rtol=1e-5, atol=1e-6)


def _conditioned_trunk(tiny_layer, film, adapter_rank):
    """A trunk whose scales, shifts and adapters all differ by expert, so a mixed-up pair shows."""
    trunk = build_understudy("trunk", tiny_layer, seed=0, film=film, init="random", adapter_rank=adapter_rank)
    _perturbed_adapters(trunk)
    with torch.no_grad():
        trunk.scale.uniform_(0.5, 1.5)
        if film:
            trunk.shift.normal_()
    return trunk


@pytest.mark.parametrize("one_per_token", [False, True], ids=["some-tokens-two-pairs", "one-pair-per-token"])
@pytest.mark.parametrize(
    ("film", "adapter_rank"), [(True, 0), (False, 0), (True, 3), (False, 3), (True, (0, 5, 1, 2))]
)
def test_serving_a_mix_of_assignments_equals_the_weighted_per_pair_outputs_in_value_and_gradient(
    tiny_layer, routed_rows, film, adapter_rank, one_per_token
):
    trunk = _conditioned_trunk(tiny_layer, film, adapter_rank)
    rows = routed_rows(tiny_layer, n=16)
    indices = rows["indices"].clone()
    indices[::3, 0] = E  # some slots skipped, as the shadow policy hands them over
    if one_per_token:  # the trunk's shortcut: no gather to pairs, no sum over them
        indices[:, 1:] = E
    x = rows["x"].clone().requires_grad_(True)
    served = trunk(x, indices, rows["weights"])
    kept = (indices < E).to(x.dtype)[..., None]
    pairs = trunk.pair_outputs(x, indices.clamp(max=E - 1))
    reference = (pairs * (rows["weights"][..., None] * kept)).sum(1)
    torch.testing.assert_close(served, reference, rtol=1e-5, atol=1e-6)
    params = [x, *trunk.parameters()]
    for got, want in zip(
        torch.autograd.grad(served.square().sum(), params),
        torch.autograd.grad(reference.square().sum(), params),
        strict=True,
    ):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("served_rows", [1 / 4, 15 / 16], ids=["few-rows-gathered", "most-rows-every-row"])
@pytest.mark.parametrize(("film", "adapter_rank"), [(True, 0), (False, 0), (False, 3)])
def test_rows_without_a_served_pair_come_out_zero_whether_or_not_the_trunk_runs_on_every_row(
    tiny_layer, routed_rows, film, adapter_rank, served_rows
):
    # From _EVERY_ROW_FROM (0.8) of the rows up, the trunk runs on every row instead of gathering
    # the served ones; both ways must give the per-pair reference and zero elsewhere.
    trunk = _conditioned_trunk(tiny_layer, film, adapter_rank)
    rows = routed_rows(tiny_layer, n=32)
    indices = rows["indices"].clone()
    unserved = torch.arange(32) >= int(served_rows * 32)
    indices[unserved] = E
    served = trunk(rows["x"], indices, rows["weights"])
    kept = (indices < E).to(served.dtype)[..., None]
    pairs = trunk.pair_outputs(rows["x"], indices.clamp(max=E - 1))
    torch.testing.assert_close(
        served, (pairs * (rows["weights"][..., None] * kept)).sum(1), rtol=1e-5, atol=1e-6
    )
    assert bool((served[unserved] == 0).all())


def test_the_serving_focus_weighs_routed_pairs_by_how_often_they_overflow(tiny_layer, routed_rows):
    rows = routed_rows(tiny_layer, n=256)
    focused = AssignmentObjective(tiny_layer, extra=0, serving=(0.5, 1.0), batch_rows=64)
    freq = focused.overflow_frequency(rows)
    assert freq.shape == rows["indices"].shape and 0 < float(freq.mean()) < 1
    # the lowest-weight choice overflows first under score priority
    assert float(freq[:, 1].mean()) > float(freq[:, 0].mean())
    idx, w = focused._pairs(rows, torch.Generator().manual_seed(0))
    plain = rows["weights"].float()
    torch.testing.assert_close(w, plain * (0.1 + 0.9 * freq))


def test_weight_power_two_weighs_each_pair_by_its_squared_weight_before_the_focus(tiny_layer, routed_rows):
    rows = routed_rows(tiny_layer, n=256)
    plain = rows["weights"].float()
    squared = AssignmentObjective(tiny_layer, extra=0, serving=(0.5, 1.0), batch_rows=64, weight_power=2.0)
    _, w = squared._pairs(rows, torch.Generator().manual_seed(0))
    torch.testing.assert_close(w, plain.pow(2) * (0.1 + 0.9 * squared.overflow_frequency(rows)))
    _, held_out = squared._pairs(rows, None)  # held-out rows: the same power, no focus
    torch.testing.assert_close(held_out, plain.pow(2))
    with_extra = AssignmentObjective(tiny_layer, extra=2, weight_power=2.0)
    _, w_extra = with_extra._pairs(rows, torch.Generator().manual_seed(0))
    _, w_linear = AssignmentObjective(tiny_layer, extra=2)._pairs(rows, torch.Generator().manual_seed(0))
    k = rows["indices"].shape[1]  # the extra experts' weights: (probability x norm)^2 x extra_weight
    torch.testing.assert_close(w_extra[:, k:], (w_linear[:, k:] / 0.5).pow(2) * 0.5)


def test_under_the_shadow_policy_the_trunk_serves_single_assignments_never_whole_tokens(
    tiny_layer, routed_rows
):
    from moe_understudy.config import RuntimeConfig
    from moe_understudy.runtime.layer import LoadAwareMoE
    from moe_understudy.runtime.ledger import LoadRecorder

    trunk = build_understudy("trunk", tiny_layer, seed=0, usage=torch.ones(E))
    rec = LoadRecorder()
    core = LoadAwareMoE(
        tiny_layer, RuntimeConfig(policy="shadow", capacity_factor=0.5, priority="score"), trunk, rec
    )
    x = routed_rows(tiny_layer, n=64)["x"][None]
    with torch.no_grad():
        core(x)
    step = rec.steps[0]
    assert step.understudy == 0 and step.shadow > 0  # served assignment by assignment
    assert step.expert + step.shadow == step.assignments  # every other assignment stays with its expert
    assert step.degraded_tokens < step.tokens


@pytest.mark.parametrize("preset", ["mixtral", "fine", "qwen3_moe", "mixtral-large"])
def test_the_default_trunk_of_every_teacher_preset_holds_at_most_one_expert(preset):
    from moe_understudy.moe.adapters import find_moe_layers
    from moe_understudy.moe.presets import build_model, preset_config

    layer = find_moe_layers(build_model(preset_config(preset, vocab_size=64, max_positions=16)))[0]
    trunk = build_understudy("trunk", layer, seed=0, init="random")
    assert trunk.memory_expert_equiv(layer.expert_params()) <= 1.0
    assert trunk.flops_per_assignment() <= 0.5 * layer.expert_flops_per_token()
