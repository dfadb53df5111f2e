"""Understudy modules: shapes, parameter and FLOP counts, exact copies of the layer."""

from __future__ import annotations

import pytest
import torch

from moe_understudy.errors import UserError
from moe_understudy.understudy.modules import (
    DenseUnderstudy,
    Shadows,
    build_understudy,
    cost_ratio,
    from_config,
)

H, INTER, E, K = 32, 32, 4, 2  # tiny mixtral: hidden, expert intermediate, experts, top-k


@pytest.mark.parametrize(
    ("arch", "kw", "params", "flops"),
    [
        ("dense", {"intermediate": 16}, 3 * H * 16, 2 * 3 * H * 16),
        ("lowrank", {"rank": 4, "intermediate": 16}, 2 * H * 4 + 3 * 4 * 16, 2 * (2 * H * 4 + 3 * 4 * 16)),
        ("merged", {"usage": torch.ones(E)}, 3 * H * INTER, 2 * 3 * H * INTER),
        (
            "small_moe",
            {"num_experts": 2, "intermediate": 8, "top_k": 1},
            2 * H + 2 * 3 * H * 8,
            2 * H * 2 + 1 * 2 * 3 * H * 8,
        ),
        ("shadows", {"width": 8}, E * 3 * H * 8, K * 2 * 3 * H * 8),
        ("shadows", {"width": 4, "kind": "lowrank"}, E * 2 * H * 4, K * 2 * 2 * H * 4),
    ],
)
def test_every_arch_maps_tokens_to_hidden_and_counts_its_cost(
    tiny_layer, arch, kw, params, flops, routed_rows
):
    module = build_understudy(arch, tiny_layer, seed=0, **kw)
    rows = routed_rows(tiny_layer, n=10)
    out = module(rows["x"], rows["indices"], rows["weights"]) if arch == "shadows" else module(rows["x"])
    assert out.shape == (10, H)
    assert module.param_count() == params
    assert module.flops_per_token() == flops
    assert cost_ratio(module, tiny_layer) == pytest.approx(flops / (K * 2 * 3 * H * INTER))


def test_default_dense_has_one_experts_width_and_half_the_active_cost(tiny_layer):
    module = build_understudy("dense", tiny_layer)
    assert module.intermediate == INTER
    assert cost_ratio(module, tiny_layer) == pytest.approx(1 / K)


def test_small_moe_copied_from_the_teacher_reproduces_the_routed_output(tiny_layer, routed_rows):
    module = build_understudy(
        "small_moe", tiny_layer, num_experts=E, intermediate=INTER, top_k=K, init="teacher"
    )
    rows = routed_rows(tiny_layer)
    torch.testing.assert_close(module(rows["x"]), rows["y"], rtol=1e-5, atol=1e-6)


def test_merged_of_a_single_used_expert_is_that_expert(tiny_layer, routed_rows):
    usage = torch.tensor([0.0, 1.0, 0.0, 0.0])
    module = build_understudy("merged", tiny_layer, usage=usage)
    rows = routed_rows(tiny_layer, n=16)
    only_e1 = tiny_layer.experts(rows["x"], torch.ones(16, 1, dtype=torch.long), torch.ones(16, 1))
    torch.testing.assert_close(module(rows["x"]), only_e1, rtol=1e-5, atol=1e-6)


def test_merged_without_usage_is_refused(tiny_layer):
    with pytest.raises(UserError, match="usage"):
        build_understudy("merged", tiny_layer)


def test_full_width_shadows_from_the_teacher_equal_the_experts(tiny_layer, routed_rows):
    shadows = build_understudy("shadows", tiny_layer, width=INTER, init="teacher")
    rows = routed_rows(tiny_layer)
    torch.testing.assert_close(
        shadows(rows["x"], rows["indices"], rows["weights"]), rows["y"], rtol=1e-5, atol=1e-6
    )


def test_shadows_serve_single_assignments_like_their_experts(tiny_layer):
    shadows = build_understudy("shadows", tiny_layer, width=INTER, init="teacher")
    x = torch.randn(6, H)
    expert = torch.tensor([0, 1, 2, 3, 0, 2])[:, None]
    want = tiny_layer.experts(x, expert, torch.ones(6, 1))
    torch.testing.assert_close(shadows(x, expert, torch.ones(6, 1)), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "dtype, out_features, grouped",
    [(torch.float32, 4, True), (torch.float64, 4, False), (torch.float32, 2, False)],
    ids=["grouped-gemm", "loop-float64", "loop-unaligned"],
)
def test_grouped_linear_is_one_linear_per_group_empty_groups_included(dtype, out_features, grouped):
    from moe_understudy.understudy.assignment import _grouped_mm_runs, expert_order, grouped_linear

    g = torch.Generator().manual_seed(0)
    experts = torch.tensor([2, 0, 2, 3, 0, 2, 3])  # expert 1 has no rows
    order, ends = expert_order(experts, 4)
    assert ends.tolist() == [2, 2, 5, 7] and experts[order].tolist() == [0, 0, 2, 2, 2, 3, 3]
    x = torch.randn(7, 8, generator=g, dtype=dtype)[order]
    weight = torch.randn(4, out_features, 8, generator=g, dtype=dtype)
    assert _grouped_mm_runs(x, weight) == grouped  # the path the id names
    want = torch.stack([weight[e] @ row for e, row in zip(experts[order].tolist(), x, strict=True)])
    torch.testing.assert_close(grouped_linear(x, weight, ends), want)


def test_shadows_one_unit_wide_serve_through_the_loop_and_train(tiny_layer):
    # width 1 (all 64 shadows of the fine teacher weigh one expert) is below the grouped kernel's
    # 16-byte unit: the per-group loop serves it, forward and backward
    shadows = Shadows(H, E, K, width=1)
    x, expert = torch.randn(6, H), torch.tensor([0, 1, 2, 3, 0, 2])[:, None]
    y = shadows(x, expert, torch.ones(6, 1))
    y.square().sum().backward()
    assert y.shape == (6, H) and shadows.inp.grad.abs().sum() > 0


def test_shadows_skip_the_index_equal_to_num_experts(tiny_layer):
    shadows = Shadows(H, E, K, width=4)
    x = torch.randn(3, H)
    skipped = torch.full((3, K), E)
    assert torch.equal(shadows(x, skipped, torch.ones(3, K)), torch.zeros(3, H))


def test_from_config_rebuilds_the_same_shapes(tiny_layer):
    for arch, kw in [
        ("dense", {}),
        ("lowrank", {}),
        ("small_moe", {}),
        ("shadows", {}),
        ("merged", {"usage": torch.ones(E)}),
    ]:
        module = build_understudy(arch, tiny_layer, **kw)
        again = from_config(module.arch, module.config())
        assert {k: v.shape for k, v in again.state_dict().items()} == {
            k: v.shape for k, v in module.state_dict().items()
        }
        assert again.arch == module.arch


def test_unknown_arch_is_a_user_error(tiny_layer):
    with pytest.raises(UserError, match="arch"):
        build_understudy("huge", tiny_layer)
    with pytest.raises(UserError, match="intermediate"):
        DenseUnderstudy(H, 0)
