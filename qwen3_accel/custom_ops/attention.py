"""Attention over the static KV cache.

Cache layout, per layer: keys and values `[max_batch, max_len, kv_heads, head_dim]` (flash-attn's
layout), plus one `kv_valid [max_batch, max_len]` bool mask shared by all layers that says which slots
hold a real token of each sequence (left padding and unwritten slots are False), `seq_start [max_batch]`
(each sequence's first real slot) and the number of slots in use, as device tensors.

Prefill uses torch's SDPA. Decode has two implementations: a Triton split-KV ("flash decoding") kernel
that reads only each sequence's valid range, and masked SDPA over the whole cache as the reference.
"""

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


def prefill_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Causal attention of `L` new queries over `S >= L` keys whose last `L` are the new tokens.

    q: [B, L, Hq, D]; k, v: [B, S, Hkv, D]; key_valid: [B, S] bool or None (no padding) -> [B, L, Hq * D].
    """
    batch, q_len, n_heads, head_dim = q.shape
    offset = k.shape[1] - q_len
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if key_valid is None and offset == 0:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=True)
    else:
        query_pos = torch.arange(q_len, device=q.device)[:, None] + offset
        key_pos = torch.arange(k.shape[1], device=q.device)[None, :]
        mask = (key_pos <= query_pos)[None, None]  # [1, 1, L, S]
        blind = None
        if key_valid is not None:
            # As in HF: a query sees the real tokens up to its position (a right-padding query included). A query
            # that sees none (padding) gets zeros, as torch's SDPA gives it in HF; it attends to itself in the call,
            # so that no SDPA backend can produce a NaN that would reach the cache.
            mask = mask & key_valid[:, None, None, :]
            blind = ~mask.any(dim=-1, keepdim=True)  # [B, 1, L, 1]
            mask = mask | ((key_pos == query_pos)[None, None] & blind)
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale, enable_gqa=True)
        if blind is not None:
            out = out.masked_fill(blind, 0.0)
    return out.transpose(1, 2).reshape(batch, q_len, n_heads * head_dim)


@triton.jit
def query_group(q_ptr, batch, kv_head, q_batch_stride, q_head_stride, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                HEAD_DIM: tl.constexpr):
    """The GROUP query heads of one kv head for one sequence ([GROUP_PAD, HEAD_DIM], padding rows zero), with the
    lanes and an empty online-softmax state: (g, d, heads, q, m, l, acc)."""
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + g
    q = tl.load(q_ptr + batch * q_batch_stride + heads[:, None] * q_head_stride + d[None, :],
                mask=g[:, None] < GROUP, other=0.0)
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    return g, d, heads, q, m, l, acc


@triton.jit
def attend_block(q, k_ptrs, v_ptrs, in_range, visible, m, l, acc, scale, FP32_DOT: tl.constexpr):
    """One block of keys for a group of queries, online softmax: q [G, D]; k_ptrs / v_ptrs [N, D] (loaded where
    `in_range`); `visible` [G, N] (or [1, N]): which keys each query sees. Returns the updated running max m [G],
    sum l [G] and unnormalised output acc [G, D], fp32."""
    k = tl.load(k_ptrs, mask=in_range[:, None], other=0.0)
    if FP32_DOT:
        scores = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        scores = tl.dot(q, tl.trans(k))
    scores = tl.where(visible, scores * scale, float("-inf"))
    m_new = tl.maximum(m, tl.max(scores, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - m_safe)
    p = tl.exp(scores - m_safe[:, None])
    l = l * alpha + tl.sum(p, axis=1)
    v = tl.load(v_ptrs, mask=in_range[:, None], other=0.0)
    if FP32_DOT:
        acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l, acc


@triton.jit
def store_split(part_out_ptr, part_lse_ptr, row, d, heads_valid, m, l, acc, HEAD_DIM: tl.constexpr,
                NUM_SPLITS: tl.constexpr):
    """A split's normalised output at `row` [G] of part_out (its log-sum-exp too, when there are splits to merge);
    queries that saw no key get zeros."""
    has_keys = l > 0
    out = acc / tl.where(has_keys, l, 1.0)[:, None]
    tl.store(part_out_ptr + row[:, None] * HEAD_DIM + d[None, :], out.to(part_out_ptr.dtype.element_ty),
             mask=heads_valid[:, None])
    if NUM_SPLITS > 1:
        lse = tl.where(has_keys, m + tl.log(tl.where(has_keys, l, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + row, lse, mask=heads_valid)


@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, kv_valid_ptr, seq_start_ptr, seq_end_ptr, part_out_ptr, part_lse_ptr,
    q_batch_stride, q_head_stride,
    kv_batch_stride, kv_slot_stride, kv_head_stride, valid_batch_stride,
    n_q_heads, scale,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr, FP32_DOT: tl.constexpr,
):
    # q: [B, Hq, D]; k, v: [B, T, Hkv, D]; part_out: [B, Hq, S, D] fp32; part_lse: [B, Hq, S] fp32.
    # Grid: (B, Hkv, S). One program reads each K/V block once for all GROUP query heads of its kv head,
    # over its share of the sequence's valid range [seq_start[b], seq_end). With one split there is nothing to
    # merge: part_out is the final [B, Hq, D] output, in its own dtype, and part_lse is not written.
    batch = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    start = tl.load(seq_start_ptr + batch).to(tl.int32)
    end = tl.load(seq_end_ptr).to(tl.int32)
    per_split = tl.cdiv(tl.maximum(end - start, 0), NUM_SPLITS)
    lo = start + split * per_split
    hi = tl.minimum(lo + per_split, end)

    g, d, heads, q, m, l, acc = query_group(q_ptr, batch, kv_head, q_batch_stride, q_head_stride, GROUP, GROUP_PAD,
                                            HEAD_DIM)
    kv_base = batch * kv_batch_stride + kv_head * kv_head_stride
    for block_lo in range(lo, hi, BLOCK_N):
        n = block_lo + tl.arange(0, BLOCK_N)
        in_range = n < hi
        valid = in_range & (tl.load(kv_valid_ptr + batch * valid_batch_stride + n, mask=in_range, other=0) != 0)
        offs = kv_base + n[:, None].to(tl.int64) * kv_slot_stride + d[None, :]
        m, l, acc = attend_block(q, k_ptr + offs, v_ptr + offs, in_range, valid[None, :], m, l, acc, scale,
                                 FP32_DOT)
    row = (batch * n_q_heads + heads) * NUM_SPLITS + split
    store_split(part_out_ptr, part_lse_ptr, row, d, g < GROUP, m, l, acc, HEAD_DIM, NUM_SPLITS)


@triton.jit
def _decode_combine_kernel(part_out_ptr, part_lse_ptr, out_ptr, NUM_SPLITS: tl.constexpr,
                           SPLITS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr):
    # part_out: [B * Hq, S, D], part_lse: [B * Hq, S] -> out: [B * Hq, D]. Grid: (B * Hq,).
    row = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, HEAD_DIM)
    lse = tl.load(part_lse_ptr + row * NUM_SPLITS + s, mask=s < NUM_SPLITS, other=float("-inf"))
    top = tl.max(lse, axis=0)
    top = tl.where(top == float("-inf"), 0.0, top)
    weight = tl.exp(lse - top)  # log-sum-exp merge of the splits
    parts = tl.load(part_out_ptr + (row * NUM_SPLITS + s[:, None]) * HEAD_DIM + d[None, :],
                    mask=s[:, None] < NUM_SPLITS, other=0.0)
    total = tl.sum(weight, axis=0)
    out = tl.sum(parts * weight[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + row * HEAD_DIM + d, out.to(out_ptr.dtype.element_ty))


@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8


def num_kv_splits(batch: int, num_kv_heads: int, max_len: int, num_sms: int) -> int:
    """Splits per sequence from static bounds only (no host sync): fill ~2 waves of SMs, >= 256 slots each."""
    by_length = triton.cdiv(max_len, 256)
    by_occupancy = max(1, (2 * num_sms) // (batch * num_kv_heads))
    return max(1, min(by_length, by_occupancy, 64))


def decode_attention_triton(q, key_cache, value_cache, kv_valid, seq_start, seq_end, scale: float):
    batch, n_q_heads, head_dim = q.shape
    n_kv_heads = key_cache.shape[2]
    assert n_q_heads % n_kv_heads == 0, "query heads must be a multiple of kv heads"
    assert key_cache.shape == value_cache.shape and key_cache.stride() == value_cache.stride()
    assert key_cache.shape[0] >= batch and key_cache.stride(-1) == 1 and q.stride(-1) == 1
    assert kv_valid.dtype == torch.bool and kv_valid.stride(-1) == 1 and seq_end.numel() == 1
    assert head_dim == triton.next_power_of_2(head_dim), "head_dim must be a power of two"
    group = n_q_heads // n_kv_heads
    splits = num_kv_splits(batch, n_kv_heads, key_cache.shape[1], _num_sms(q.device))
    out = q.new_empty((batch, n_q_heads, head_dim))
    # One split (short caches) writes the output itself: one launch instead of two.
    part_out = out if splits == 1 else q.new_empty((batch, n_q_heads, splits, head_dim), dtype=torch.float32)
    part_lse = out if splits == 1 else q.new_empty((batch, n_q_heads, splits), dtype=torch.float32)
    _decode_split_kernel[(batch, n_kv_heads, splits)](
        q, key_cache, value_cache, kv_valid.view(torch.uint8), seq_start, seq_end, part_out, part_lse,
        q.stride(0), q.stride(1), key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), kv_valid.stride(0),
        n_q_heads, float(scale),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_N=64, NUM_SPLITS=splits, FP32_DOT=q.dtype == torch.float32, num_warps=4, num_stages=2,
    )
    if splits > 1:
        _decode_combine_kernel[(batch * n_q_heads,)](
            part_out, part_lse, out, NUM_SPLITS=splits, SPLITS_PAD=triton.next_power_of_2(splits), HEAD_DIM=head_dim,
        )
    return out


def decode_attention_reference(q, key_cache, value_cache, kv_valid, seq_start, seq_end, scale: float):
    """Masked SDPA over the first B cache rows: slots in [seq_start[b], seq_end) that kv_valid marks."""
    batch, n_heads, head_dim = q.shape
    slots = torch.arange(key_cache.shape[1], device=q.device)
    valid = kv_valid[:batch] & (slots[None] >= seq_start[:batch, None]) & (slots[None] < seq_end)
    out = F.scaled_dot_product_attention(
        q[:, :, None, :], key_cache[:batch].transpose(1, 2), value_cache[:batch].transpose(1, 2),
        attn_mask=valid[:, None, None, :], scale=scale, enable_gqa=True,
    )
    return out.reshape(batch, n_heads, head_dim)


@torch.library.custom_op("qwen3_accel::decode_attention", mutates_args=())
def decode_attention(
    q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, kv_valid: torch.Tensor,
    seq_start: torch.Tensor, seq_end: torch.Tensor, scale: float,
) -> torch.Tensor:
    """One query per sequence, q [B, Hq, D], over cache rows [:B] -> [B, Hq, D]. Triton on CUDA."""
    if q.is_cuda:
        return decode_attention_triton(q, key_cache, value_cache, kv_valid, seq_start, seq_end, scale)
    return decode_attention_reference(q, key_cache, value_cache, kv_valid, seq_start, seq_end, scale)


@decode_attention.register_fake
def _(q, key_cache, value_cache, kv_valid, seq_start, seq_end, scale):
    return q.new_empty(q.shape)
