"""The trunk's width ladder: each row runs as many hidden units as its served pairs pay for."""

from __future__ import annotations

import pytest
import torch

from moe_understudy.errors import UserError
from moe_understudy.understudy.ladder import prefix_pair_outputs, row_widths, rungs
from moe_understudy.understudy.modules import GatedTrunk, build_understudy, from_config

H, E, K = 32, 4, 2  # tiny mixtral: hidden, experts, top-k


def _ladder(tiny_layer, width=10, per_pair=4):
    trunk = build_understudy(
        "trunk", tiny_layer, seed=0, film=False, init="random", width=width, width_per_pair=per_pair
    )
    with torch.no_grad():
        trunk.scale.uniform_(0.5, 1.5)  # scales differ by expert, so a mixed-up pair shows
    return trunk


def test_rungs_climb_by_the_width_per_pair_up_to_the_whole_width():
    assert rungs(10, 4) == [4, 8, 10]
    assert rungs(12, 4) == [4, 8, 12]
    served = torch.tensor(
        [[False, False, False], [True, False, False], [True, True, False], [True, True, True]]
    )
    assert row_widths(served, 10, 4).tolist() == [0, 4, 8, 10]


def test_each_row_is_served_on_the_prefix_its_served_pairs_pay_for_in_value_and_gradient(
    tiny_layer, routed_rows
):
    trunk = _ladder(tiny_layer)
    rows = routed_rows(tiny_layer, n=24)
    indices = rows["indices"].clone()
    indices[::3, 0] = E  # a third of the rows with one served pair, the rest with two
    indices[::4] = E  # some rows with none
    x = rows["x"].clone().requires_grad_(True)
    served = trunk(x, indices, rows["weights"])
    reference = torch.zeros_like(served)
    widths = row_widths(indices < E, trunk.width, trunk.width_per_pair)
    for t in range(x.shape[0]):
        if widths[t] == 0:
            continue
        pairs = prefix_pair_outputs(trunk, x[t : t + 1], indices[t : t + 1].clamp(max=E - 1), int(widths[t]))
        kept = (indices[t] < E).to(x.dtype)[:, None]
        reference[t] = (pairs[0] * rows["weights"][t][:, None] * kept).sum(0)
    assert sorted(set(widths.tolist())) == [0, 4, 8]
    torch.testing.assert_close(served, reference, rtol=1e-5, atol=1e-6)
    params = [x, *trunk.parameters()]
    for got, want in zip(
        torch.autograd.grad(served.square().sum(), params),
        torch.autograd.grad(reference.square().sum(), params),
        strict=True,
    ):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_a_served_pair_never_costs_more_than_its_width_per_pair(tiny_layer):
    trunk = _ladder(tiny_layer, width=10, per_pair=4)
    unit = 6 * H + 2 * E + 3  # one hidden unit of the no-FiLM trunk's pass and mix
    served = torch.tensor([[True, True], [True, False], [False, False]])
    assert trunk.token_flops(served).tolist() == [8 * unit, 4 * unit, 0.0]
    assert trunk.flops_per_assignment() == 4 * unit
    assert trunk.flops_per_token() == 8 * unit  # every pair of a top-2 token: two rungs
    whole = build_understudy("trunk", tiny_layer, seed=0, film=False, init="random", width=10)
    assert whole.flops_per_assignment() == 10 * unit  # without the ladder a lone pair pays the whole pass


def test_fitting_draws_a_rung_per_step_and_checking_uses_the_whole_width(tiny_layer, routed_rows):
    trunk = _ladder(tiny_layer)
    rows = routed_rows(tiny_layer, n=16)
    whole = from_config("trunk", {**trunk.config(), "width_per_pair": 0})
    whole.load_state_dict(trunk.state_dict())
    with torch.no_grad():  # the held-out check: the whole width
        torch.testing.assert_close(
            trunk.pair_outputs(rows["x"], rows["indices"]), whole.pair_outputs(rows["x"], rows["indices"])
        )
    torch.manual_seed(0)
    outputs = {
        tuple(trunk.pair_outputs(rows["x"], rows["indices"]).detach().flatten()[:4].tolist())
        for _ in range(30)
    }
    assert len(outputs) == len(rungs(trunk.width, trunk.width_per_pair))  # each rung drawn, no other width


def test_the_ladder_rebuilds_from_its_config_and_quantizes(tiny_layer, routed_rows):
    from moe_understudy.understudy.quantize import quantize_

    trunk = _ladder(tiny_layer).eval()
    again = from_config("trunk", trunk.config())
    assert isinstance(again, GatedTrunk) and again.width_per_pair == 4
    rows = routed_rows(tiny_layer, n=16)
    with torch.no_grad():
        before = trunk(rows["x"], rows["indices"], rows["weights"])
        after = quantize_(trunk)(rows["x"], rows["indices"], rows["weights"])
    assert 0 < float((after - before).norm() / before.norm()) < 0.02


@pytest.mark.parametrize("kwargs", [{"film": True}, {"film": False, "adapter_rank": 2}])
def test_a_ladder_with_per_pair_terms_is_refused_in_one_sentence(tiny_layer, kwargs):
    with pytest.raises(UserError, match="--no-film"):
        build_understudy("trunk", tiny_layer, seed=0, init="random", width=10, width_per_pair=4, **kwargs)
