"""Split-KV decode attention against a float64 reference, and long-context generation."""

import pytest
import torch

from conftest import left_padded_batch, model_pair
from qwen3_accel.custom_ops.attention import (_num_sms, decode_attention_reference, decode_attention_triton,
                                              num_kv_splits)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _cache_case(context, group, head_dim, dtype, batch=3, kv_heads=2, spare_slots=9, seed=0):
    """A cache with `batch` sequences of left-padded length <= context (one spare cache row, unused)."""
    g = torch.Generator().manual_seed(seed)
    slots = context + spare_slots
    q = torch.randn(batch, kv_heads * group, head_dim, generator=g).to(DEVICE, dtype)
    k = torch.randn(batch + 1, slots, kv_heads, head_dim, generator=g).to(DEVICE, dtype)
    v = torch.randn(batch + 1, slots, kv_heads, head_dim, generator=g).to(DEVICE, dtype)
    start = torch.tensor([0, context // 3, context - 1, 0][: batch + 1], dtype=torch.int32)
    valid = torch.zeros(batch + 1, slots, dtype=torch.bool)
    for row, s in enumerate(start.tolist()):
        valid[row, s:context] = True
    valid[0, context // 2] = context == 1  # a hole inside the range is honoured too
    end = torch.tensor([context])
    return q, k, v, valid.to(DEVICE), start.to(DEVICE), end.to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 2, 8])
@pytest.mark.parametrize("context", [1, 17, 1000, 4096])
def test_decode_kernel_matches_float64_reference(context, group, head_dim, dtype):
    """Short caches take one split (the kernel writes the output itself), long ones several and the merge."""
    q, k, v, valid, start, end = _cache_case(context, group, head_dim, dtype)
    splits = num_kv_splits(q.shape[0], k.shape[2], k.shape[1], _num_sms(q.device))
    assert (splits == 1) == (context < 1000)
    scale = head_dim**-0.5
    out = decode_attention_triton(q, k, v, valid, start, end, scale)
    expected = decode_attention_reference(q.double(), k.double(), v.double(), valid, start, end, scale)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_kernel_reads_hf_cache_layout_in_place(dtype):
    """HF's caches are [B, kv_heads, S, D]: the kernel reads their transposed view (the attention interface
    entry passes it without a copy)."""
    q, k, v, valid, start, end = _cache_case(1000, 2, 64, dtype)
    hf_keys, hf_values = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
    out = decode_attention_triton(q, hf_keys.transpose(1, 2), hf_values.transpose(1, 2), valid, start, end, 0.125)
    expected = decode_attention_reference(q.double(), k.double(), v.double(), valid, start, end, 0.125)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)


def test_decode_attention_registration():
    q, k, v, valid, start, end = _cache_case(17, 2, 64, torch.float32)
    torch.library.opcheck(torch.ops.qwen3_accel.decode_attention, (q, k, v, valid, start, end, 0.125),
                          test_utils=("test_schema", "test_faketensor"))


def test_long_prompt_greedy_matches_hf_with_the_triton_kernel():
    """A 1500-token prompt; decode attention through the Triton kernel (interpreted on CPU)."""
    reference, optimized = model_pair("tiny", device=DEVICE, compile=False, kernels="torch", attention="triton")
    ids, mask = left_padded_batch([1500, 1320], 512, seed=4)
    ids, mask = ids.to(DEVICE), mask.to(DEVICE)
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(optimized.generate(ids, **kwargs), reference.generate(ids, **kwargs))


def test_backend_errors_are_clear():
    """Unknown backends, flash_attn among them (it is not one of ours), are a ValueError naming the supported ones."""
    import qwen3_accel
    from qwen3_accel.configs import build_model

    with pytest.raises(ValueError, match=r"attention='flash_attn' is not supported; choose one of "
                                         r"\('auto', 'triton', 'sdpa'\)"):
        qwen3_accel.optimize(build_model("tiny"), attention="flash_attn")
    with pytest.raises(ValueError, match="attention='xformers' is not supported"):
        qwen3_accel.optimize(build_model("tiny"), attention="xformers")
