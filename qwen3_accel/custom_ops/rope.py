"""Qwen3's per-head RMSNorm of q and k followed by rotary embedding, in one launch.

`cos_sin` is a table [max_positions, head_dim] in fp32: columns [0, D/2) hold cos, [D/2, D) hold sin
(HF's `rotate_half` convention, where both halves share one frequency). It is built once from the
model's own rotary module, so any rope type HF computes is reproduced exactly.

`qk_norm_rope_store_kv` is the decode step's form: the same kernel also writes each new key and value into the
KV cache at the step's slot, so the step needs no separate cache writes.
"""

import torch
import triton
import triton.language as tl

from .rms_norm import rms_norm_reference


@triton.jit
def _qk_norm_rope_kernel(
    q_ptr, k_ptr, v_ptr, q_weight_ptr, k_weight_ptr, cos_sin_ptr, positions_ptr, slot_ptr,
    q_out_ptr, k_out_ptr, v_out_ptr,
    q_token_stride, q_head_stride, k_token_stride, k_head_stride, v_token_stride, v_head_stride,
    out_token_stride, out_slot_stride, out_head_stride,
    cos_sin_stride, n_positions, n_q_heads, eps,
    HALF: tl.constexpr, HALF_BLOCK: tl.constexpr, STORE_KV: tl.constexpr,
):
    # q: [T, Hq, D], k: [T, Hkv, D] (strided views are fine); q_out contiguous. Grid: (T, Hq + Hkv).
    # k_out[token, slot, kv_head] at the given strides: a contiguous [T, Hkv, D] (slot 0), or with STORE_KV the KV
    # cache [rows, len, Hkv, D] at slot `slot_ptr[0]`, where the kv-head programs also copy v into v_out.
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    slot = 0
    if STORE_KV:
        slot = tl.load(slot_ptr).to(tl.int64)
    kv_dst = token * out_token_stride + slot * out_slot_stride + (head - n_q_heads) * out_head_stride
    if head < n_q_heads:
        src = q_ptr + token * q_token_stride + head * q_head_stride
        dst = q_out_ptr + (token * n_q_heads + head) * (2 * HALF)
        weight_ptr = q_weight_ptr
    else:
        src = k_ptr + token * k_token_stride + (head - n_q_heads) * k_head_stride
        dst = k_out_ptr + kv_dst
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
    # Clamped to the table: a position past it (an unused padding row of a graph bucket) never reads outside.
    pos = tl.minimum(tl.maximum(tl.load(positions_ptr + token).to(tl.int64), 0), n_positions - 1)
    cos = tl.load(cos_sin_ptr + pos * cos_sin_stride + offs, mask=mask, other=0.0).to(dtype).to(tl.float32)
    sin = tl.load(cos_sin_ptr + pos * cos_sin_stride + HALF + offs, mask=mask, other=0.0).to(dtype).to(tl.float32)
    tl.store(dst + offs, (n1 * cos - n2 * sin).to(dtype), mask=mask)
    tl.store(dst + HALF + offs, (n2 * cos + n1 * sin).to(dtype), mask=mask)
    if STORE_KV:
        if head >= n_q_heads:
            v_src = v_ptr + token * v_token_stride + (head - n_q_heads) * v_head_stride
            tl.store(v_out_ptr + kv_dst + offs, tl.load(v_src + offs, mask=mask), mask=mask)
            tl.store(v_out_ptr + kv_dst + HALF + offs, tl.load(v_src + HALF + offs, mask=mask), mask=mask)


def _check(q, k, q_weight, k_weight, cos_sin, positions):
    head_dim = q.shape[-1]
    assert q.dim() == 3 and k.dim() == 3, "q and k must be [tokens, heads, head_dim]"
    assert k.shape[0] == q.shape[0] and k.shape[-1] == head_dim and head_dim % 2 == 0
    assert q.stride(-1) == 1 and k.stride(-1) == 1, "q and k need unit stride on head_dim"
    assert q_weight.shape == (head_dim,) and k_weight.shape == (head_dim,)
    assert cos_sin.dtype == torch.float32 and cos_sin.shape[-1] == head_dim and cos_sin.stride(-1) == 1
    assert positions.shape == (q.shape[0],), "one position per token"


def _check_cache(k, v, key_cache, value_cache, write_pos):
    assert v.shape == k.shape and v.stride(-1) == 1, "v must be [tokens, kv_heads, head_dim] like k"
    assert key_cache.dim() == 4 and key_cache.shape == value_cache.shape, "caches are [rows, len, kv_heads, head_dim]"
    assert key_cache.stride() == value_cache.stride() and key_cache.stride(-1) == 1
    assert key_cache.shape[0] >= k.shape[0] and key_cache.shape[2:] == k.shape[1:], "one cache row per token"
    assert key_cache.dtype == k.dtype == v.dtype == value_cache.dtype
    assert write_pos.numel() == 1 and write_pos.dtype in (torch.int32, torch.int64)


def _launch(q, k, v, q_weight, k_weight, cos_sin, positions, eps, q_out, k_out, v_out, slot, out_strides, store_kv):
    n_tokens, n_q_heads, head_dim = q.shape
    if n_tokens == 0:
        return
    half = head_dim // 2
    _qk_norm_rope_kernel[(n_tokens, n_q_heads + k.shape[1])](
        q, k, v, q_weight.contiguous(), k_weight.contiguous(), cos_sin, positions.contiguous(), slot,
        q_out, k_out, v_out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), *out_strides,
        cos_sin.stride(0), cos_sin.shape[0], n_q_heads, float(eps),
        HALF=half, HALF_BLOCK=triton.next_power_of_2(half), STORE_KV=store_kv,
        num_warps=1 if head_dim <= 128 else 2,
    )


def qk_norm_rope_triton(q, k, q_weight, k_weight, cos_sin, positions, eps: float):
    _check(q, k, q_weight, k_weight, cos_sin, positions)
    q_out = q.new_empty(q.shape)
    k_out = k.new_empty(k.shape)
    # k stands in for the unused v pointers; positions for the unused slot pointer.
    _launch(q, k, k, q_weight, k_weight, cos_sin, positions, eps, q_out, k_out, k_out, positions,
            (k_out.stride(0), 0, k_out.stride(1)), store_kv=False)
    return q_out, k_out


def qk_norm_rope_store_kv_triton(q, k, v, q_weight, k_weight, cos_sin, positions, eps: float,
                                 key_cache, value_cache, write_pos):
    _check(q, k, q_weight, k_weight, cos_sin, positions)
    _check_cache(k, v, key_cache, value_cache, write_pos)
    q_out = q.new_empty(q.shape)
    _launch(q, k, v, q_weight, k_weight, cos_sin, positions, eps, q_out, key_cache, value_cache, write_pos,
            key_cache.stride()[:3], store_kv=True)
    return q_out


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def qk_norm_rope_reference(q, k, q_weight, k_weight, cos_sin, positions, eps: float):
    """HF's `q_norm`/`k_norm` then `apply_rotary_pos_emb`, step for step, on [T, H, D] tensors.

    Positions outside the table are clamped to it, as the kernel does (callers check real positions up front)."""
    half = q.shape[-1] // 2
    table = cos_sin[positions.clamp(0, cos_sin.shape[0] - 1)]  # [T, D]
    cos = torch.cat((table[:, :half], table[:, :half]), dim=-1).to(q.dtype)[:, None, :]
    sin = torch.cat((table[:, half:], table[:, half:]), dim=-1).to(q.dtype)[:, None, :]
    qn, kn = rms_norm_reference(q, q_weight, eps), rms_norm_reference(k, k_weight, eps)
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


def qk_norm_rope_store_kv_reference(q, k, v, q_weight, k_weight, cos_sin, positions, eps: float,
                                    key_cache, value_cache, write_pos):
    """`qk_norm_rope_reference`, then token t's key and value written to cache row t at slot `write_pos[0]`."""
    q_out, k_out = qk_norm_rope_reference(q, k, q_weight, k_weight, cos_sin, positions, eps)
    slot = (torch.arange(q.shape[0], device=q.device)[:, None], write_pos.reshape(1, 1))
    key_cache[slot] = k_out[:, None]
    value_cache[slot] = v[:, None]
    return q_out.contiguous()


@torch.library.custom_op("qwen3_accel::qk_norm_rope_store_kv", mutates_args=("key_cache", "value_cache"))
def qk_norm_rope_store_kv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
    cos_sin: torch.Tensor, positions: torch.Tensor, eps: float,
    key_cache: torch.Tensor, value_cache: torch.Tensor, write_pos: torch.Tensor,
) -> torch.Tensor:
    """The decode step's `qk_norm_rope` with the cache write folded in: returns q; token t's normed, rotated key
    and its value land in row t of `key_cache`/`value_cache` [rows, len, Hkv, D] at slot `write_pos[0]`."""
    if q.is_cuda:
        return qk_norm_rope_store_kv_triton(q, k, v, q_weight, k_weight, cos_sin, positions, eps, key_cache,
                                            value_cache, write_pos)
    return qk_norm_rope_store_kv_reference(q, k, v, q_weight, k_weight, cos_sin, positions, eps, key_cache,
                                           value_cache, write_pos)


@qk_norm_rope_store_kv.register_fake
def _(q, k, v, q_weight, k_weight, cos_sin, positions, eps, key_cache, value_cache, write_pos):
    return q.new_empty(q.shape)
