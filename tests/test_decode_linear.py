"""`decode_linear`: the decode step's projections with RMSNorm, SiLU·mul and the residual add folded in, for weights
in the model dtype and every quantized format, interpreted, against HF's modules run one after the other."""

import dataclasses

import pytest
import torch

import qwen3_accel
from conftest import left_padded_batch, model_pair
from qwen3_accel.configs import build_model, get_config
from qwen3_accel.custom_ops import formats
from qwen3_accel.custom_ops import linear as ql

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FORMATS = [None, "int8", "int4", "fp8"]
# (the projection in Qwen3, weight rows, K, norm, silu_mul, residual): K and rows not powers of two.
FUSIONS = [
    ("qkv_norm_first", 96, 72, True, False, False),
    ("gate_up_norm_first_silu_mul_after", 2 * 64, 72, True, True, False),
    ("o_down_residual_after", 72, 200, False, False, True),
    ("all_three", 2 * 64, 130, True, True, True),
]


def operands(fmt, n_rows, n_in, rows, dtype, norm, silu_mul, residual, seed):
    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(n_rows, n_in, generator=g) * 0.05).to(dtype)
    if fmt is None:
        packed = (weight, None, None, 1, n_in)
    elif fmt == "int8":
        packed = (*formats.quantize_int8(weight), None, 1, n_in)
    elif fmt == "int4":
        packed = (*formats.quantize_int4(weight), 1, formats.INT4_GROUP)
    else:
        packed = (*formats.quantize_fp8(weight, 32, 32), None, 32, 32)
    x = (torch.randn(rows, n_in, generator=g) * 3).to(dtype)
    n_out = n_rows // 2 if silu_mul else n_rows
    norm_weight = (1 + 0.1 * torch.randn(n_in, generator=g)).to(dtype) if norm else None
    res = torch.randn(rows, n_out, generator=g).to(dtype) if residual else None
    on_device = [t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in (x, *packed, norm_weight, 1e-6, res)]
    return (*on_device, silu_mul)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f or "dense")
@pytest.mark.parametrize("fusion", FUSIONS, ids=lambda f: f[0])
@pytest.mark.parametrize("rows", [1, 3, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_linear_matches_hf_modules(fmt, fusion, rows, dtype):
    _, n_rows, n_in, norm, silu_mul, residual = fusion
    args = operands(fmt, n_rows, n_in, rows, dtype, norm, silu_mul, residual, seed=n_rows + n_in + rows)
    actual = ql.decode_linear_triton(*args)
    expected = ql.decode_linear_reference(*args)
    assert actual.shape == expected.shape == (rows, n_rows // 2 if silu_mul else n_rows) and actual.dtype == dtype
    # The kernel sums in another order than the reference's matmul; fp16 may then round one step apart.
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=4e-3, atol=4e-3)
    torch.testing.assert_close(actual, expected, **tol)


def test_reference_is_hf_modules():
    """(CPU) The reference against HF's own RMSNorm, Linear, MLP activation and residual add."""
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    torch.manual_seed(0)
    dtype = torch.bfloat16
    x, residual = torch.randn(3, 40, dtype=dtype), torch.randn(3, 24, dtype=dtype)
    norm = Qwen3RMSNorm(40, eps=1e-6).to(dtype)
    norm.weight.data = 1 + 0.1 * torch.randn(40, dtype=dtype)
    gate_up, down = torch.randn(48, 40, dtype=dtype), torch.randn(24, 24, dtype=dtype)
    with torch.no_grad():
        h = norm(x)
        gate, up = (h @ gate_up.T).chunk(2, dim=-1)
        expected = residual + (torch.nn.functional.silu(gate) * up) @ down.T
        act = ql.decode_linear_reference(x, gate_up, None, None, 1, 40, norm.weight, 1e-6, None, True)
        actual = ql.decode_linear_reference(act, down, None, None, 1, 24, None, 0.0, residual, False)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_bad_operands_are_named():
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="silu_mul needs gate and up halves"):
        ql.decode_linear_reference(x, torch.randn(33, 64), None, None, 1, 64, None, 0.0, None, True)
    with pytest.raises(ValueError, match=r"residual must be \[2, 16\]"):
        ql.decode_linear_reference(x, torch.randn(16, 64), None, None, 1, 64, None, 0.0, torch.randn(2, 8), False)
    with pytest.raises(ValueError, match="norm_weight must be"):
        ql.decode_linear_reference(x, torch.randn(16, 64), None, None, 1, 64, torch.ones(8), 1e-6, None, False)
    with pytest.raises(ValueError, match="whole scale blocks"):
        qweight, scale = formats.quantize_fp8(torch.randn(96, 64), 32, 32)
        ql.decode_linear_reference(x, qweight, scale, None, 32, 32, None, 0.0, None, True)


@pytest.mark.parametrize("fmt", ["dense", "int8"])
def test_op_registration(fmt):
    args = operands(None if fmt == "dense" else fmt, 2 * 32, 48, 3, torch.float32, True, True, True, seed=1)
    torch.library.opcheck(torch.ops.qwen3_accel.decode_linear, args, test_utils=("test_schema", "test_faketensor"))


def counting_decode_linear(optimized):
    """Record the weight (dtype, shape) of each of the model's `decode_linear` calls (the real kernel still runs)."""
    acc = optimized.qwen3_accel
    calls = []
    real = acc.runner.kernels.decode_linear
    acc.runner.kernels = dataclasses.replace(
        acc.runner.kernels, decode_linear=lambda *a: calls.append((a[1].dtype, tuple(a[1].shape))) or real(*a))
    return calls


def head_calls(calls: list, model) -> int:
    """How many recorded calls ran the LM head (final norm folded in)."""
    return sum(shape == tuple(model.lm_head.weight.shape) for _, shape in calls)


@pytest.mark.parametrize("name,weights", [("tiny", None), ("tiny", "int4"), ("tiny-moe", None), ("tiny-moe", "int8")])
def test_tiny_models_decode_through_decode_linear(name, weights):
    """Dense and MoE (layer 1 a dense MLP) models on the Triton kernels, interpreted, with decode_linear="always":
    every decode step runs its projections through `decode_linear` (4 per dense layer; per MoE layer QKV, o_proj
    and the router, the norm and residual add going into `fused_moe`; the final norm with the LM head) and the
    greedy tokens are HF eager's (quantized: those of the dequantized model, whose weights the kernels read)."""
    from test_quantized import dequantized_reference

    config = get_config(name, **({"mlp_only_layers": [1]} if name == "tiny-moe" else {}))
    reference = build_model(config)
    optimized = build_model(config, seed=1)
    optimized.load_state_dict(reference.state_dict())
    optimized = qwen3_accel.optimize(optimized, compile=False, kernels="triton", weights=weights,
                                     decode_linear="always")
    if weights:
        reference = dequantized_reference(optimized, reference)
    calls = counting_decode_linear(optimized)
    ids, mask = left_padded_batch([9, 4, 7], config.vocab_size, seed=3)
    kwargs = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(optimized.generate(ids, **kwargs), reference.generate(ids, **kwargs))
    layers = config.num_hidden_layers
    per_step = 4 * layers if name == "tiny" else 3 * layers + 1  # MoE layers: QKV, o_proj and the router
    assert len(calls) == 4 * (per_step + 1)  # 4 decode steps after the prefill, each with the LM head
    assert head_calls(calls, optimized) == 4
    projections = {torch.uint8 if weights == "int4" else torch.int8 if weights else torch.float32}
    assert {dtype for dtype, _ in calls} == projections | {torch.float32}  # the router and the LM head stay fp32


def test_wider_batches_keep_the_unfused_path():
    reference, optimized = model_pair("tiny", compile=False, kernels="triton", decode_linear="always")
    calls = counting_decode_linear(optimized)
    ids, mask = left_padded_batch([3, 5, 4, 6, 2], 512, seed=4)
    kwargs = dict(attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(optimized.generate(ids, **kwargs), reference.generate(ids, **kwargs))
    assert not calls


@pytest.mark.parametrize("name,mode,weights,dense_max_hidden,fused,head", [
    ("tiny", "never", None, 2048, False, False), ("tiny", "never", "int8", 2048, False, False),
    ("tiny", "always", None, 0, True, True), ("tiny", "auto", None, 0, False, False),
    ("tiny", "auto", "int8", 0, True, False), ("tiny", "auto", "int8", 2048, True, True),
    ("tiny", "auto", None, 2048, True, True), ("tiny-moe", "auto", None, 0, False, False),
    ("tiny-moe", "auto", None, 2048, True, True), ("tiny-moe", "auto", "int8", 0, True, False),
])
def test_decode_linear_modes(monkeypatch, name, mode, weights, dense_max_hidden, fused, head):
    """"auto" fuses quantized projections always, those in the model dtype (the LM head among them) up to the
    hidden-size bound (set here below and above the tiny models'); "always" and "never" override it. Tokens are
    HF's either way."""
    monkeypatch.setattr(qwen3_accel.decoder, "DECODE_LINEAR_DENSE_MAX_HIDDEN", dense_max_hidden)
    reference, optimized = model_pair(name, compile=False, kernels="triton", decode_linear=mode, weights=weights)
    if weights:
        from test_quantized import dequantized_reference

        reference = dequantized_reference(optimized, reference)
    calls = counting_decode_linear(optimized)
    ids, mask = left_padded_batch([6, 3], 512, seed=5)
    kwargs = dict(attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(optimized.generate(ids, **kwargs), reference.generate(ids, **kwargs))
    assert bool(calls) == fused
    assert head_calls(calls, optimized) == (2 if head else 0)  # 2 decode steps after the prompt


def test_beam_search_steps_over_hf_cache_use_the_fused_projections():
    """HF's loop over its DynamicCache (beam search) reaches our forward a few tokens at a time: those steps take
    the fused projections too (the prompt, 2 beams x 6 tokens, does not), with HF's tokens."""
    reference, optimized = model_pair("tiny", compile=False, kernels="triton", decode_linear="always")
    calls = counting_decode_linear(optimized)
    ids, mask = left_padded_batch([6], 512, seed=6)
    kwargs = dict(attention_mask=mask, max_new_tokens=4, num_beams=2, do_sample=False, pad_token_id=0)
    assert torch.equal(optimized.generate(ids, **kwargs), reference.generate(ids, **kwargs))
    assert len(calls) == 3 * 4 * reference.config.num_hidden_layers  # 3 steps after the prompt, 4 per layer
