"""Small from-scratch configs: MoE teachers, dense and MoE students, and tiny per-family test models.

Sizes follow the probes in PROBES.md: 4 layers, hidden 128, 8 experts of intermediate 256, top-2,
BPE vocabulary 4096 trains to useful perplexity in about 8 minutes on 2 CPU cores. `fine` is the
fine-grained teacher (Qwen3-MoE-style, 64 experts of 64, top-8) on which headline figures are stated.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

# Each preset: (model_type, keyword overrides). `vocab_size` and `max_position_embeddings` come
# from the tokenizer and block size at build time.
# Default teacher (Mixtral-style): 8 experts of 256, top-2.
_MIXTRAL: dict[str, Any] = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_local_experts=8,
    num_experts_per_tok=2,
    router_aux_loss_coef=0.01,
    output_router_logits=True,
    tie_word_embeddings=True,
)
# Two layers of hidden 64 and 4 experts: the shape of the seconds-long presets.
_QUICK_MIXTRAL: dict[str, Any] = {
    **_MIXTRAL,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_local_experts": 4,
}
_QWEN3_MOE: dict[str, Any] = dict(
    hidden_size=128,
    intermediate_size=512,
    moe_intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    num_experts=8,
    num_experts_per_tok=2,
    norm_topk_prob=True,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    router_aux_loss_coef=0.01,
    output_router_logits=True,
    tie_word_embeddings=True,
)
_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "mixtral": ("mixtral", _MIXTRAL),
    # Larger Mixtral-style teacher for whole-model distillation, about 4x the active size of
    # `llama-student` (EEM distils a 3.5B-active MoE into a 1.3B dense model).
    "mixtral-large": (
        "mixtral",
        {
            **_MIXTRAL,
            "hidden_size": 192,
            "intermediate_size": 384,
            "num_hidden_layers": 6,
            "num_attention_heads": 6,
        },
    ),
    # Qwen3-MoE-style teacher: same budget, normalised top-k, per-head q/k norms.
    "qwen3_moe": ("qwen3_moe", _QWEN3_MOE),
    # Fine-grained Qwen3-MoE-style teacher, the regime real MoEs run in (OLMoE-like granularity):
    # 64 routed experts of 64, top-8. Active routed width 8 x 64 = 512, as the default's 2 x 256.
    "fine": (
        "qwen3_moe",
        {**_QWEN3_MOE, "num_experts": 64, "moe_intermediate_size": 64, "num_experts_per_tok": 8},
    ),
    # Seconds-long teacher for tests and `--quick`.
    "quick": ("mixtral", {**_QUICK_MIXTRAL, "intermediate_size": 64}),
    # Dense Llama-style student (about the active size of the default teacher).
    "llama-student": (
        "llama",
        dict(
            hidden_size=128,
            intermediate_size=384,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        ),
    ),
    # Smaller MoE student for MoE-to-MoE distillation (B-Distill): 4 experts of 128, top-2.
    "moe-student": ("mixtral", {**_MIXTRAL, "intermediate_size": 128, "num_local_experts": 4}),
    "quick-student": (
        "llama",
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        ),
    ),
    "quick-moe-student": ("mixtral", {**_QUICK_MIXTRAL, "intermediate_size": 32}),
}
PRESETS = tuple(_PRESETS)

# Tiny configs, one per supported family, for adapter parity tests (no download).
_TINY: dict[str, dict[str, Any]] = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=32),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2, intermediate_size=32, norm_topk_prob=False),
    "qwen2_moe": dict(
        num_experts=4,
        num_experts_per_tok=2,
        intermediate_size=48,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=False,
    ),
    "qwen3_moe": dict(
        num_experts=4,
        num_experts_per_tok=2,
        intermediate_size=48,
        moe_intermediate_size=32,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=True,
        head_dim=16,
    ),
    "deepseek_v3": dict(
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        n_shared_experts=1,
        intermediate_size=48,
        moe_intermediate_size=32,
        first_k_dense_replace=1,
        kv_lora_rank=16,
        q_lora_rank=None,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
    ),
}
TINY_FAMILIES = tuple(_TINY)


def preset_config(name: str, vocab_size: int, max_positions: int = 512, **overrides: Any) -> PretrainedConfig:
    """A transformers config for preset `name` with the given vocabulary and context."""
    if name not in _PRESETS:
        raise ValueError(f"Unknown preset {name!r}; choose one of: {', '.join(PRESETS)}.")
    model_type, kwargs = _PRESETS[name]
    kwargs = {**kwargs, **overrides, "vocab_size": vocab_size, "max_position_embeddings": max_positions}
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_config(family: str, vocab_size: int = 97, num_layers: int = 2) -> PretrainedConfig:
    """A tiny config of `family` (hidden 32) that builds in milliseconds."""
    if family not in _TINY:
        raise ValueError(f"No tiny config for {family!r}; have: {', '.join(TINY_FAMILIES)}.")
    base = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=0,
    )
    return AutoConfig.for_model(family, **{**base, **_TINY[family]})


def build_model(
    config: PretrainedConfig, seed: int = 0, dtype: torch.dtype = torch.float32
) -> PreTrainedModel:
    """A freshly initialised causal LM for `config` (deterministic under `seed`)."""
    torch.manual_seed(seed)
    config._attn_implementation = "eager" if config.model_type == "deepseek_v3" else "sdpa"
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()
