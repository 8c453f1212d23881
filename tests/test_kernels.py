"""Each Triton kernel (interpreted on CPU, compiled on CUDA) against its torch reference, and each
reference against HF's own modules."""

import pytest
import torch
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm, apply_rotary_pos_emb

from qwen3_accel.custom_ops import activation, rms_norm, rope

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3)}


def randn(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float32) * scale).to(device=DEVICE, dtype=dtype)


def assert_close_ulp(actual, expected, dtype):
    """Within the dtype's tolerance, counting one rounding step of the larger values."""
    tol = TOL[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=tol["atol"], rtol=tol["rtol"] * 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(1, 64), (3, 5, 1000), (7, 4096), (2, 130)])
def test_rms_norm_matches_reference(dtype, shape):
    x, w = randn(*shape, dtype=dtype), randn(shape[-1], dtype=dtype)
    assert_close_ulp(rms_norm.rms_norm_triton(x, w, 1e-6), rms_norm.rms_norm_reference(x, w, 1e-6), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(1, 64), (3, 5, 1000), (9, 2048)])
def test_fused_add_rms_norm_matches_reference(dtype, shape):
    x, r, w = randn(*shape, dtype=dtype), randn(*shape, dtype=dtype), randn(shape[-1], dtype=dtype)
    normed, residual = rms_norm.fused_add_rms_norm_triton(x, r, w, 1e-6)
    normed_ref, residual_ref = rms_norm.fused_add_rms_norm_reference(x, r, w, 1e-6)
    torch.testing.assert_close(residual, residual_ref, atol=0, rtol=0)
    assert_close_ulp(normed, normed_ref, dtype)


def test_rms_norm_reference_is_hf():
    hf = Qwen3RMSNorm(96, eps=1e-6)
    with torch.no_grad():
        hf.weight.normal_()
    x = torch.randn(4, 96, dtype=torch.bfloat16)
    hf = hf.to(torch.bfloat16)
    assert torch.equal(rms_norm.rms_norm_reference(x, hf.weight, 1e-6), hf(x))


def _rope_inputs(n_tokens, n_q, n_kv, head_dim, dtype):
    qkv = randn(n_tokens, n_q + 2 * n_kv, head_dim, dtype=dtype)
    cos_sin = randn(50, head_dim)
    positions = torch.randint(0, 50, (n_tokens,), device=DEVICE)
    return qkv[:, :n_q], qkv[:, n_q : n_q + n_kv], randn(head_dim, dtype=dtype), randn(head_dim, dtype=dtype), \
        cos_sin, positions


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n_tokens,n_q,n_kv,head_dim", [(1, 16, 8, 128), (7, 4, 2, 64), (3, 6, 1, 96), (5, 2, 2, 32)])
def test_qk_norm_rope_matches_reference(dtype, n_tokens, n_q, n_kv, head_dim):
    args = _rope_inputs(n_tokens, n_q, n_kv, head_dim, dtype)
    q, k = rope.qk_norm_rope_triton(*args, 1e-6)
    q_ref, k_ref = rope.qk_norm_rope_reference(*args, 1e-6)
    assert q.is_contiguous() and k.is_contiguous()
    # The kernel rounds once where HF rounds after every op: allow a few ulps of the output's magnitude.
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=4e-3)
    torch.testing.assert_close(q, q_ref, **tol)
    torch.testing.assert_close(k, k_ref, **tol)


def test_qk_norm_rope_clamps_positions_past_the_table():
    """A position outside the table (an unused row of a graph bucket) reads the table's edge, in the kernel and
    in its reference alike, instead of past its end."""
    q, k, q_weight, k_weight, cos_sin, _ = _rope_inputs(4, 4, 2, 64, torch.float32)
    table_len = cos_sin.shape[0]
    outside = torch.tensor([table_len, table_len + 1000, -3, 7], device=DEVICE)
    clamped = torch.tensor([table_len - 1, table_len - 1, 0, 7], device=DEVICE)
    expected = rope.qk_norm_rope_reference(q, k, q_weight, k_weight, cos_sin, clamped, 1e-6)
    for impl in (rope.qk_norm_rope_reference, rope.qk_norm_rope_triton):
        actual = impl(q, k, q_weight, k_weight, cos_sin, outside, 1e-6)
        for a, e in zip(actual, expected):
            torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)


def _store_kv_inputs(n_tokens, n_q, n_kv, head_dim, dtype, cache_rows, cache_len, slot):
    q, k, q_weight, k_weight, cos_sin, positions = _rope_inputs(n_tokens, n_q, n_kv, head_dim, dtype)
    v = randn(n_tokens, 2 * n_kv, head_dim, dtype=dtype)[:, n_kv:]  # a strided view, as the fused QKV gives
    key_cache = randn(cache_rows, cache_len, n_kv, head_dim, dtype=dtype)
    value_cache = randn(cache_rows, cache_len, n_kv, head_dim, dtype=dtype)
    write_pos = torch.tensor([slot], device=DEVICE)
    return q, k, v, q_weight, k_weight, cos_sin, positions, 1e-6, key_cache, value_cache, write_pos


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n_tokens,n_q,n_kv,head_dim,cache_rows,slot",
                         [(1, 16, 8, 128, 1, 0), (3, 4, 2, 64, 4, 9), (17, 8, 1, 96, 32, 5), (5, 2, 2, 32, 5, 10)])
def test_qk_norm_rope_store_kv_matches_reference(dtype, n_tokens, n_q, n_kv, head_dim, cache_rows, slot):
    """The decode step's form: q out, this step's keys and values in the cache at `slot`, nothing else touched."""
    args = _store_kv_inputs(n_tokens, n_q, n_kv, head_dim, dtype, cache_rows, 11, slot)
    expected = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    q = rope.qk_norm_rope_store_kv_triton(*args)
    q_ref = rope.qk_norm_rope_store_kv_reference(*expected)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=4e-3)
    torch.testing.assert_close(q, q_ref, **tol)
    key_cache, value_cache = args[8], args[9]
    torch.testing.assert_close(key_cache, expected[8], **tol)
    torch.testing.assert_close(value_cache, expected[9], rtol=0, atol=0)
    q_plain, k_plain = rope.qk_norm_rope_triton(*args[:2], *args[3:8])
    torch.testing.assert_close(q, q_plain, rtol=0, atol=0)
    torch.testing.assert_close(key_cache[:n_tokens, slot], k_plain, rtol=0, atol=0)
    torch.testing.assert_close(value_cache[:n_tokens, slot], args[2], rtol=0, atol=0)


def test_qk_norm_rope_reference_is_hf():
    """The reference equals HF's q_norm/k_norm followed by `apply_rotary_pos_emb` with HF's rotary module."""
    from qwen3_accel.configs import build_model
    from qwen3_accel.decoder import rope_table

    model = build_model("tiny")
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        attn.q_norm.weight.normal_()
        attn.k_norm.weight.normal_()
    n_q, n_kv, d = 4, 2, attn.head_dim
    q, k = torch.randn(1, 6, n_q, d), torch.randn(1, 6, n_kv, d)
    positions = torch.tensor([[0, 3, 4, 5, 100, 2047]])
    cos, sin = model.model.rotary_emb(q, positions)
    q_hf, k_hf = apply_rotary_pos_emb(attn.q_norm(q).transpose(1, 2), attn.k_norm(k).transpose(1, 2), cos, sin)
    table = rope_table(model, 4096)
    q_ours, k_ours = rope.qk_norm_rope_reference(
        q[0], k[0], attn.q_norm.weight, attn.k_norm.weight, table, positions[0], attn.q_norm.variance_epsilon
    )
    torch.testing.assert_close(q_ours, q_hf[0].transpose(0, 1), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(k_ours, k_hf[0].transpose(0, 1), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(1, 2 * 96), (5, 2 * 3000), (2, 3, 2 * 17)])
def test_silu_and_mul_matches_reference(dtype, shape):
    x = randn(*shape, dtype=dtype, scale=3.0)
    assert_close_ulp(activation.silu_and_mul_triton(x), activation.silu_and_mul_reference(x), dtype)


@pytest.mark.parametrize(
    "op,args",
    [
        (torch.ops.qwen3_accel.rms_norm, lambda: (randn(3, 64), randn(64), 1e-6)),
        (torch.ops.qwen3_accel.fused_add_rms_norm, lambda: (randn(3, 64), randn(3, 64), randn(64), 1e-6)),
        (torch.ops.qwen3_accel.qk_norm_rope, lambda: (*_rope_inputs(3, 4, 2, 32, torch.float32), 1e-6)),
        (torch.ops.qwen3_accel.qk_norm_rope_store_kv, lambda: _store_kv_inputs(3, 4, 2, 32, torch.float32, 4, 6, 2)),
        (torch.ops.qwen3_accel.silu_and_mul, lambda: (randn(3, 64),)),
    ],
    ids=["rms_norm", "fused_add_rms_norm", "qk_norm_rope", "qk_norm_rope_store_kv", "silu_and_mul"],
)
def test_op_registration(op, args):
    """Schema, fake (meta) implementation and real implementation agree (torch.library.opcheck)."""
    torch.library.opcheck(op, args(), test_utils=("test_schema", "test_faketensor"))
