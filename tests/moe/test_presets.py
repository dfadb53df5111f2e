import pytest

from moe_understudy.moe.adapters import find_moe_layers
from moe_understudy.moe.presets import PRESETS, build_model, preset_config


def test_default_teacher_has_the_documented_shape():
    model = build_model(preset_config("mixtral", vocab_size=4096), seed=0)
    layers = find_moe_layers(model)
    assert len(layers) == 4
    assert {
        (layer.hidden_size, layer.num_experts, layer.expert_intermediate_size, layer.top_k)
        for layer in layers
    } == {(128, 8, 256, 2)}


def test_qwen3_preset_is_a_qwen3_moe():
    model = build_model(preset_config("qwen3_moe", vocab_size=512), seed=0)
    assert find_moe_layers(model)[0].family == "qwen3_moe"


def test_build_model_is_deterministic_under_a_seed():
    a = build_model(preset_config("quick", vocab_size=128), seed=3)
    b = build_model(preset_config("quick", vocab_size=128), seed=3)
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert p.equal(q), name


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError) as err:
        preset_config("gpt5", vocab_size=10)
    assert all(name in str(err.value) for name in PRESETS)
