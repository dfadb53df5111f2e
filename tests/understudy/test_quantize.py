"""Int8 storage of the gated trunk: the same network in half the memory, reloadable, for serving."""

from __future__ import annotations

import pytest
import torch

from moe_understudy.errors import UserError
from moe_understudy.understudy.io import load_understudies, save_understudies
from moe_understudy.understudy.modules import build_understudy
from moe_understudy.understudy.quantize import QMAX, quantize_, quantize_rows

E = 4  # tiny_layer's experts


def _trunk(tiny_layer, film=True, adapter_rank=3):
    trunk = build_understudy("trunk", tiny_layer, seed=0, film=film, init="random", adapter_rank=adapter_rank)
    with torch.no_grad():  # every per-expert weight away from its init, so a wrong dequantization shows
        trunk.scale.uniform_(0.5, 1.5)
        if adapter_rank:
            trunk.adapter_out.normal_(std=0.1)
        if film:
            trunk.shift.normal_()
    return trunk


def test_rows_round_to_int8_within_half_a_step_of_their_own_scale():
    w = torch.randn(6, 10) * torch.logspace(-3, 1, 6)[:, None]  # rows four decades apart
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and scale.shape == (6, 1)
    assert int(q.abs().max()) == QMAX  # each row's largest weight spends the whole range
    assert bool(((q.float() * scale - w).abs() <= scale / 2 + 1e-12).all())


@pytest.mark.parametrize(("film", "adapter_rank"), [(True, 3), (False, 0)])
def test_an_int8_trunk_serves_as_its_float_self_within_the_rounding(
    tiny_layer, routed_rows, film, adapter_rank
):
    trunk = _trunk(tiny_layer, film, adapter_rank)
    rows = routed_rows(tiny_layer, n=64)
    indices = rows["indices"].clone()
    indices[::3, 0] = E  # some slots not served
    before = trunk(rows["x"], indices, rows["weights"]).detach()
    quantize_(trunk)
    after = trunk(rows["x"], indices, rows["weights"])
    assert trunk.gate_up.dtype == torch.int8 and "gate_up" in trunk.quantized
    rel = float((after - before).norm() / before.norm())
    assert 0 < rel < 0.02  # changed (it is rounded) but by far less than a stand-in's own error


def test_int8_weights_are_charged_half_and_their_scales_in_full(tiny_layer):
    trunk = _trunk(tiny_layer, film=True, adapter_rank=3)
    expert = tiny_layer.expert_params()
    weights = {n: p.numel() for n, p in trunk.named_parameters()}
    assert trunk.memory_expert_equiv(expert) == pytest.approx(sum(weights.values()) / expert)
    quantize_(trunk)
    rows = {n: getattr(trunk, f"{n}_scale").numel() for n in trunk.quantized}
    assert set(trunk.quantized) == {"gate_up", "down", "scale", "shift", "adapter_in", "adapter_out"}
    units = sum(weights.values()) / 2 + sum(rows.values())
    assert trunk.memory_expert_equiv(expert) == pytest.approx(units / expert)
    assert trunk.param_count() == sum(weights.values())  # the same weights, stored smaller


def test_an_int8_trunk_saves_int8_and_reloads_to_the_same_outputs(
    tmp_path, tiny_model, tiny_layer, routed_rows
):
    from moe_understudy.files import load_tensors
    from moe_understudy.moe.adapters import find_moe_layers

    trunks = {ly.index: quantize_(_trunk(ly)) for ly in find_moe_layers(tiny_model)}
    save_understudies(tmp_path, trunks, tiny_model)
    assert load_tensors(tmp_path / "understudies.safetensors", "")["layer0.gate_up"].dtype == torch.int8
    again = load_understudies(tmp_path, tiny_model)
    rows = routed_rows(tiny_layer, n=32)
    for i, trunk in trunks.items():
        assert again[i].quantized == trunk.quantized
        torch.testing.assert_close(
            again[i](rows["x"], rows["indices"], rows["weights"]),
            trunk(rows["x"], rows["indices"], rows["weights"]),
        )


def test_a_stand_in_without_int8_storage_is_refused_in_one_sentence(tiny_layer):
    with pytest.raises(UserError, match="arch trunk"):
        quantize_(build_understudy("dense", tiny_layer, seed=0))
