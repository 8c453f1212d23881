"""What optimize() promises besides speed: clear errors, idempotence, weights and state_dict intact."""

import warnings

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import qwen3_accel
from conftest import left_padded_batch, model_pair
from qwen3_accel.configs import build_model

GREEDY = dict(do_sample=False, pad_token_id=0)


def test_rejects_other_model_classes():
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, vocab_size=64))
    with pytest.raises(TypeError, match="supports Qwen3ForCausalLM.*got LlamaForCausalLM"):
        qwen3_accel.optimize(llama)


def test_rejects_unsupported_dtype():
    model = build_model("tiny", dtype=torch.float64)
    with pytest.raises(TypeError, match="torch.bfloat16.*float64"):
        qwen3_accel.optimize(model)


def test_rejects_unsupported_quantization_naming_the_method():
    """A model quantized by a method we do not run (here bitsandbytes' config) is refused before anything changes;
    raw int8 weights in a plain linear are refused naming the tensor. (Supported formats: tests/test_quantized.py.)"""
    from transformers import BitsAndBytesConfig

    model = build_model("tiny")
    model.config.quantization_config = BitsAndBytesConfig(load_in_8bit=True)
    with pytest.raises(TypeError, match="quantization method 'bitsandbytes'.*weights='int8', 'int4' or 'fp8'"):
        qwen3_accel.optimize(model)
    assert not hasattr(model, "qwen3_accel") and "forward" not in vars(model)
    model = build_model("tiny")
    proj = model.model.layers[0].self_attn.q_proj
    proj.weight = torch.nn.Parameter(proj.weight.to(torch.int8), requires_grad=False)
    with pytest.raises(TypeError, match=r"q_proj.weight \(torch.int8, in Linear\)"):
        qwen3_accel.optimize(model)


def test_rejects_unknown_kernel_mode():
    with pytest.raises(ValueError, match="kernels='cuda' is not supported"):
        qwen3_accel.optimize(build_model("tiny"), kernels="cuda")
    with pytest.raises(ValueError, match=r"decode_linear='fused' is not supported; choose one of \('auto'"):
        qwen3_accel.optimize(build_model("tiny"), decode_linear="fused")


def test_optimize_twice_is_a_no_op():
    model = qwen3_accel.optimize(build_model("tiny"), compile=False)
    accelerator = model.qwen3_accel
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert qwen3_accel.optimize(model, compile=False) is model
    assert model.qwen3_accel is accelerator


def test_fixed_cache_is_a_hard_limit():
    model = qwen3_accel.optimize(build_model("tiny"), compile=False, max_cache_len=32, max_batch_size=2)
    ids, mask = left_padded_batch([20], 512)
    model.generate(ids, attention_mask=mask, max_new_tokens=12, **GREEDY)  # exactly 32
    with pytest.raises(ValueError, match="max_cache_len=33 but the KV cache was fixed at 32"):
        model.generate(ids, attention_mask=mask, max_new_tokens=13, **GREEDY)
    ids3, mask3 = left_padded_batch([4, 4, 4], 512)
    with pytest.raises(ValueError, match="max_batch_size=3 but the KV cache was fixed at 2"):
        model.generate(ids3, attention_mask=mask3, max_new_tokens=2, **GREEDY)


def test_automatic_cache_grows_once_with_a_warning():
    reference, model = model_pair("tiny", compile=False)
    ids, mask = left_padded_batch([10], 512)
    model.generate(ids, attention_mask=mask, max_new_tokens=5, **GREEDY)
    assert model.qwen3_accel.runner.cache.current.max_cache_len == 256
    long_ids, long_mask = left_padded_batch([250], 512)
    with pytest.warns(UserWarning, match="growing the KV cache from 1x256 to 1x512"):
        out = model.generate(long_ids, attention_mask=long_mask, max_new_tokens=20, **GREEDY)
    assert torch.equal(out, reference.generate(long_ids, attention_mask=long_mask, max_new_tokens=20, **GREEDY))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.generate(ids, attention_mask=mask, max_new_tokens=5, **GREEDY)  # fits: no second growth


def test_prompt_beyond_model_positions_is_an_error():
    model = qwen3_accel.optimize(build_model("tiny"), compile=False)
    ids, _ = left_padded_batch([4000], 512)
    with pytest.raises(ValueError, match="exceeds the model's 4096 positions"):
        model.generate(ids, max_new_tokens=200, **GREEDY)


def test_direct_forward_beyond_the_cache_is_an_error():
    model = qwen3_accel.optimize(build_model("tiny"), compile=False, max_cache_len=16)
    cache = model.qwen3_accel.runner.cache_for(1, 16)
    ids, _ = left_padded_batch([17], 512)
    with torch.no_grad(), pytest.raises(ValueError, match="exceed the KV cache's max_cache_len=16"):
        model(ids, cache=cache)


def test_state_dict_is_hf_loadable_and_weights_are_shared():
    reference, optimized = model_pair("tiny", compile=False)
    state = optimized.state_dict()
    assert list(state) == list(reference.state_dict())
    fresh = build_model("tiny", seed=99)
    fresh.load_state_dict(state)
    ids, mask = left_padded_batch([7, 3], 512)
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids, attention_mask=mask).logits, reference(ids, attention_mask=mask).logits,
                                   atol=0, rtol=0)
    attn = optimized.model.layers[0].self_attn
    qkv = optimized.qwen3_accel.runner.weights.layers[0].attention.qkv.weight
    assert attn.q_proj.weight.untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr()
    # Loading new weights into the HF parameters reaches the fused GEMMs too.
    optimized.load_state_dict(fresh.state_dict())
    expected = fresh.generate(ids, attention_mask=mask, max_new_tokens=6, **GREEDY)
    assert torch.equal(optimized.generate(ids, attention_mask=mask, max_new_tokens=6, **GREEDY), expected)


def test_casting_after_optimize_is_caught():
    model = qwen3_accel.optimize(build_model("tiny"), compile=False)
    model.to(torch.float16)
    ids, _ = left_padded_batch([5], 512)
    with pytest.raises(RuntimeError, match="moved or converted after qwen3_accel.optimize"):
        model.generate(ids, max_new_tokens=3, **GREEDY)
