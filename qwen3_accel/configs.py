"""Public shapes of the Qwen3 family, and random-weight models built from them.

Shapes come from the published `config.json` of each checkpoint. Benchmarks and tests build models
from these with random weights: nothing is downloaded.
"""

from typing import Any

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig, Qwen3Config, Qwen3MoeConfig

_COMMON = dict(
    vocab_size=151936, max_position_embeddings=40960, rms_norm_eps=1e-6, hidden_act="silu",
    attention_bias=False, rope_theta=1_000_000.0, head_dim=128,
)

DENSE_SHAPES: dict[str, dict[str, Any]] = {
    "Qwen3-0.6B": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=True),
    "Qwen3-1.7B": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=True),
    "Qwen3-4B": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
    "Qwen3-8B": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
    "Qwen3-14B": dict(hidden_size=5120, intermediate_size=17408, num_hidden_layers=40,
                      num_attention_heads=40, num_key_value_heads=8, tie_word_embeddings=False),
    "Qwen3-32B": dict(hidden_size=5120, intermediate_size=25600, num_hidden_layers=64,
                      num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False),
}

MOE_SHAPES: dict[str, dict[str, Any]] = {
    "Qwen3-30B-A3B": dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                          num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                          num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                          decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False),
    "Qwen3-235B-A22B": dict(hidden_size=4096, intermediate_size=12288, moe_intermediate_size=1536,
                            num_hidden_layers=94, num_attention_heads=64, num_key_value_heads=4,
                            num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                            decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False),
}

# Tiny shapes for tests: every code path of the real models (GQA, tied and untied heads), in milliseconds.
TINY_SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, vocab_size=512, max_position_embeddings=4096,
                 tie_word_embeddings=False),
    "tiny-tied": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, head_dim=32, vocab_size=384, max_position_embeddings=4096,
                      tie_word_embeddings=True),
    "tiny-moe": dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=512,
                     max_position_embeddings=4096, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
                     decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False),
}

MODEL_NAMES = tuple(DENSE_SHAPES) + tuple(MOE_SHAPES) + tuple(TINY_SHAPES)


def get_config(name: str, **overrides: Any) -> PretrainedConfig:
    """The HF config of a named shape (`Qwen3Config` or `Qwen3MoeConfig`), with optional overrides."""
    if name in DENSE_SHAPES:
        shape, cls = {**_COMMON, **DENSE_SHAPES[name]}, Qwen3Config
    elif name in MOE_SHAPES:
        shape, cls = {**_COMMON, **MOE_SHAPES[name]}, Qwen3MoeConfig
    elif name in TINY_SHAPES:
        shape = {**_COMMON, **TINY_SHAPES[name]}
        cls = Qwen3MoeConfig if "num_experts" in shape else Qwen3Config
    else:
        raise ValueError(f"unknown model shape {name!r}; known: {', '.join(MODEL_NAMES)}")
    shape.update(overrides)
    rope_theta = shape.pop("rope_theta")
    config = cls(**shape)
    config.rope_parameters = {"rope_type": "default", "rope_theta": rope_theta}
    return config


def build_model(
    name_or_config: str | PretrainedConfig,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    attn_implementation: str = "sdpa",
) -> torch.nn.Module:
    """A random-weight causal LM of a named shape, initialised directly on `device` in `dtype`."""
    config = get_config(name_or_config) if isinstance(name_or_config, str) else name_or_config
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    return model.eval()
