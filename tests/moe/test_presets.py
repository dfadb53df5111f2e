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


def test_fine_preset_is_a_fine_grained_qwen3_moe_with_the_default_active_width():
    config = preset_config("fine", vocab_size=512)
    assert config.model_type == "qwen3_moe"
    assert config.norm_topk_prob and config.output_router_logits and config.tie_word_embeddings
    assert config.router_aux_loss_coef == 0.01
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 2, 32)
    layers = find_moe_layers(build_model(config, seed=0))
    assert len(layers) == 4
    assert {
        (layer.family, layer.hidden_size, layer.num_experts, layer.expert_intermediate_size, layer.top_k)
        for layer in layers
    } == {("qwen3_moe", 128, 64, 64, 8)}
    # Active routed width equals the default teacher's 2 x 256.
    assert layers[0].top_k * layers[0].expert_intermediate_size == 2 * 256
