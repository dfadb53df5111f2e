"""Saving and loading understudies: bit-identical round trip, refusal of mismatched models."""

from __future__ import annotations

import json

import pytest
import torch

from moe_understudy.errors import UserError
from moe_understudy.moe.adapters import find_moe_layers
from moe_understudy.moe.presets import build_model, tiny_config
from moe_understudy.understudy.io import load_understudies, save_understudies
from moe_understudy.understudy.modules import build_understudy


@pytest.mark.parametrize("arch", ["dense", "lowrank", "merged", "small_moe", "shadows"])
def test_saved_understudies_reload_bit_identically(tmp_path, tiny_model, arch):
    kw = {"usage": torch.arange(1.0, 5.0)} if arch == "merged" else {}
    understudies = {
        ly.index: build_understudy(arch, ly, seed=ly.index, **kw) for ly in find_moe_layers(tiny_model)
    }
    save_understudies(tmp_path, understudies, tiny_model)
    loaded = load_understudies(tmp_path, tiny_model)
    assert set(loaded) == set(understudies)
    for index, module in understudies.items():
        assert loaded[index].arch == arch
        for (name, a), (_, b) in zip(
            module.state_dict().items(), loaded[index].state_dict().items(), strict=True
        ):
            assert torch.equal(a, b), name
    x = torch.randn(5, 32)
    if arch != "shadows":
        assert torch.equal(loaded[0](x), understudies[0](x))


def test_loading_onto_a_different_hidden_size_is_refused(tmp_path, tiny_model):
    save_understudies(tmp_path, {0: build_understudy("dense", find_moe_layers(tiny_model)[0])}, tiny_model)
    other = build_model(
        tiny_config("mixtral").__class__(**{**tiny_config("mixtral").to_dict(), "hidden_size": 48}), seed=0
    )
    with pytest.raises(UserError, match="hidden size 32 but the model has 48"):
        load_understudies(tmp_path, other)


def test_loading_onto_a_different_layer_list_is_refused(tmp_path, tiny_model):
    save_understudies(tmp_path, {0: build_understudy("dense", find_moe_layers(tiny_model)[0])}, tiny_model)
    deeper = build_model(tiny_config("mixtral", num_layers=3), seed=0)
    with pytest.raises(UserError, match=r"made for 2 layers with MoE layers \[0, 1\] but the model has 3"):
        load_understudies(tmp_path, deeper)


def test_a_folder_without_understudies_is_refused(tmp_path, tiny_model):
    with pytest.raises(UserError, match="no saved understudies"):
        load_understudies(tmp_path, tiny_model)


def test_config_records_arch_shape_kwargs_and_model_facts(tmp_path, tiny_model):
    layer = find_moe_layers(tiny_model)[1]
    save_understudies(tmp_path, {1: build_understudy("lowrank", layer, rank=3)}, tiny_model)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["hidden_size"] == 32 and config["num_layers"] == 2 and config["moe_layers"] == [0, 1]
    assert config["layers"]["1"] == {
        "arch": "lowrank",
        "config": {"hidden_size": 32, "rank": 3, "intermediate": 32},
    }
    assert not list(tmp_path.glob("*.tmp"))
