import pytest
import torch
from torch import nn

from moe_understudy.errors import UserError
from moe_understudy.moe.adapters import SUPPORTED_FAMILIES, UnsupportedModelError, find_moe_layers
from moe_understudy.moe.presets import TINY_FAMILIES, build_model, preset_config, tiny_config


def tiny_model(family: str) -> nn.Module:
    model = build_model(tiny_config(family), seed=0)
    # Some families initialise routers to zero, which makes every routing a tie; give them weights.
    g = torch.Generator().manual_seed(1)
    for layer in find_moe_layers(model):
        with torch.no_grad():
            layer.block.gate.weight.copy_(torch.randn(layer.block.gate.weight.shape, generator=g))
    return model


def test_every_supported_family_has_a_tiny_config():
    assert (
        set(TINY_FAMILIES)
        == set(SUPPORTED_FAMILIES)
        == {"mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "deepseek_v3"}
    )


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_router_plus_experts_plus_shared_reproduce_the_block(family):
    model = tiny_model(family)
    layers = find_moe_layers(model)
    assert layers, family
    x = torch.randn(3, 5, model.config.hidden_size)
    for layer in layers:
        expected = layer.block(x).reshape(-1, layer.hidden_size)
        got = layer.forward_parts(x.reshape(-1, layer.hidden_size))
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_layer_sizes_come_from_the_config(family):
    model = tiny_model(family)
    layer = find_moe_layers(model)[0]
    r = layer.route(torch.randn(7, layer.hidden_size))
    assert r.logits.shape == (7, layer.num_experts)
    assert r.indices.shape == r.weights.shape == (7, layer.top_k)
    assert int(r.tokens_per_expert().sum()) == 7 * layer.top_k
    gate, up, down = layer.expert_weights(0)
    assert gate.shape == up.shape == (layer.expert_intermediate_size, layer.hidden_size)
    assert down.shape == (layer.hidden_size, layer.expert_intermediate_size)
    assert layer.has_shared == (family in {"qwen2_moe", "deepseek_v3"})


def test_deepseek_dense_first_layers_are_not_moe_layers():
    model = tiny_model("deepseek_v3")
    assert [layer.index for layer in find_moe_layers(model)] == [1]


def test_masked_assignment_index_contributes_nothing():
    layer = find_moe_layers(tiny_model("mixtral"))[0]
    x = torch.randn(4, layer.hidden_size)
    r = layer.route(x)
    masked = r.indices.clone()
    masked[:, 1] = layer.num_experts
    only_first = layer.experts(x, masked, r.weights)
    first_alone = layer.experts(x, r.indices[:, :1], r.weights[:, :1])
    torch.testing.assert_close(only_first, first_alone)


def test_replace_and_restore_swap_the_block():
    model = tiny_model("qwen3_moe")
    layer = find_moe_layers(model)[0]
    old = layer.replace(nn.Identity())
    assert old is layer.block
    assert isinstance(model.get_submodule(layer.path), nn.Identity)
    layer.restore()
    assert model.get_submodule(layer.path) is layer.block


def test_dense_model_is_refused_naming_the_class_and_the_families():
    model = build_model(preset_config("quick-student", vocab_size=64), seed=0)
    with pytest.raises(UnsupportedModelError) as err:
        find_moe_layers(model)
    message = str(err.value)
    assert "LlamaForCausalLM" in message
    for family in SUPPORTED_FAMILIES:
        assert family in message
    assert isinstance(err.value, UserError)


def test_module_without_config_is_refused():
    with pytest.raises(UnsupportedModelError, match="Linear"):
        find_moe_layers(nn.Linear(2, 2))
