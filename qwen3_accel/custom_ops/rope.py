"""Qwen3's per-head RMSNorm of q and k followed by rotary embedding, in one launch.

`cos_sin` is a table [max_positions, head_dim] in fp32: columns [0, D/2) hold cos, [D/2, D) hold sin
(HF's `rotate_half` convention, where both halves share one frequency). It is built once from the
model's own rotary module, so any rope type HF computes is reproduced exactly.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _qk_norm_rope_kernel(
    q_ptr, k_ptr, q_weight_ptr, k_weight_ptr, cos_sin_ptr, positions_ptr, q_out_ptr, k_out_ptr,
    q_token_stride, q_head_stride, k_token_stride, k_head_stride,
    cos_sin_stride, n_q_heads, n_kv_heads, eps,
    HALF: tl.constexpr, HALF_BLOCK: tl.constexpr,
):
    # q: [T, Hq, D], k: [T, Hkv, D] (strided views are fine); outputs contiguous. Grid: (T, Hq + Hkv).
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    if head < n_q_heads:
        src = q_ptr + token * q_token_stride + head * q_head_stride
        dst = q_out_ptr + (token * n_q_heads + head) * (2 * HALF)
        weight_ptr = q_weight_ptr
    else:
        kv_head = head - n_q_heads
        src = k_ptr + token * k_token_stride + kv_head * k_head_stride
        dst = k_out_ptr + (token * n_kv_heads + kv_head) * (2 * HALF)
        weight_ptr = k_weight_ptr
    offs = tl.arange(0, HALF_BLOCK)
    mask = offs < HALF
    x1 = tl.load(src + offs, mask=mask, other=0.0)
    x2 = tl.load(src + HALF + offs, mask=mask, other=0.0)
    dtype = x1.dtype
    x1f = x1.to(tl.float32)
    x2f = x2.to(tl.float32)
    rstd = tl.rsqrt((tl.sum(x1f * x1f, axis=0) + tl.sum(x2f * x2f, axis=0)) / (2 * HALF) + eps)
    # HF rounds the normalised value, then the product with the weight, to the input dtype.
    w1 = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w2 = tl.load(weight_ptr + HALF + offs, mask=mask, other=0.0).to(tl.float32)
    n1 = ((x1f * rstd).to(dtype).to(tl.float32) * w1).to(dtype).to(tl.float32)
    n2 = ((x2f * rstd).to(dtype).to(tl.float32) * w2).to(dtype).to(tl.float32)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    cos = tl.load(cos_sin_ptr + pos * cos_sin_stride + offs, mask=mask, other=0.0).to(dtype).to(tl.float32)
    sin = tl.load(cos_sin_ptr + pos * cos_sin_stride + HALF + offs, mask=mask, other=0.0).to(dtype).to(tl.float32)
    tl.store(dst + offs, (n1 * cos - n2 * sin).to(dtype), mask=mask)
    tl.store(dst + HALF + offs, (n2 * cos + n1 * sin).to(dtype), mask=mask)


def _check(q, k, q_weight, k_weight, cos_sin, positions):
    head_dim = q.shape[-1]
    assert q.dim() == 3 and k.dim() == 3, "q and k must be [tokens, heads, head_dim]"
    assert k.shape[0] == q.shape[0] and k.shape[-1] == head_dim and head_dim % 2 == 0
    assert q.stride(-1) == 1 and k.stride(-1) == 1, "q and k need unit stride on head_dim"
    assert q_weight.shape == (head_dim,) and k_weight.shape == (head_dim,)
    assert cos_sin.dtype == torch.float32 and cos_sin.shape[-1] == head_dim and cos_sin.stride(-1) == 1
    assert positions.shape == (q.shape[0],), "one position per token"


def qk_norm_rope_triton(q, k, q_weight, k_weight, cos_sin, positions, eps: float):
    _check(q, k, q_weight, k_weight, cos_sin, positions)
    n_tokens, n_q_heads, head_dim = q.shape
    n_kv_heads = k.shape[1]
    q_out = q.new_empty(q.shape)
    k_out = k.new_empty(k.shape)
    if n_tokens > 0:
        half = head_dim // 2
        _qk_norm_rope_kernel[(n_tokens, n_q_heads + n_kv_heads)](
            q, k, q_weight.contiguous(), k_weight.contiguous(), cos_sin, positions.contiguous(), q_out, k_out,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            cos_sin.stride(0), n_q_heads, n_kv_heads, float(eps),
            HALF=half, HALF_BLOCK=triton.next_power_of_2(half), num_warps=1 if head_dim <= 128 else 2,
        )
    return q_out, k_out


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def qk_norm_rope_reference(q, k, q_weight, k_weight, cos_sin, positions, eps: float):
    """HF's `q_norm`/`k_norm` then `apply_rotary_pos_emb`, step for step, on [T, H, D] tensors."""
    def norm(x, w):
        xf = x.to(torch.float32)
        return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    half = q.shape[-1] // 2
    table = cos_sin[positions]  # [T, D]
    cos = torch.cat((table[:, :half], table[:, :half]), dim=-1).to(q.dtype)[:, None, :]
    sin = torch.cat((table[:, half:], table[:, half:]), dim=-1).to(q.dtype)[:, None, :]
    qn, kn = norm(q, q_weight), norm(k, k_weight)
    return qn * cos + _rotate_half(qn) * sin, kn * cos + _rotate_half(kn) * sin


@torch.library.custom_op("qwen3_accel::qk_norm_rope", mutates_args=())
def qk_norm_rope(
    q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
    cos_sin: torch.Tensor, positions: torch.Tensor, eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head RMSNorm of q [T, Hq, D] and k [T, Hkv, D], then RoPE at `positions` [T]; contiguous outputs."""
    if q.is_cuda:
        return qk_norm_rope_triton(q, k, q_weight, k_weight, cos_sin, positions, eps)
    q_out, k_out = qk_norm_rope_reference(q, k, q_weight, k_weight, cos_sin, positions, eps)
    return q_out.contiguous(), k_out.contiguous()


@qk_norm_rope.register_fake
def _(q, k, q_weight, k_weight, cos_sin, positions, eps):
    return q.new_empty(q.shape), k.new_empty(k.shape)
