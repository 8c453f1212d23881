"""Attention over a paged KV cache (the continuous-batching engine's cache; vLLM's PagedAttention layout).

Cache layout, per layer: keys and values `[num_blocks, block_size, kv_heads, head_dim]`. A sequence owns a list
of blocks, its row of `block_tables [B, max_blocks]` (int32); its token t lives in block
`block_tables[b, t // block_size]`, slot `t % block_size`. `seq_lens [B]` (int32) counts its tokens, the new one
included. Nothing else marks which slots are real: a sequence reads exactly its first `seq_lens[b]` tokens.

  paged_store_kv          the new tokens' keys and values into their slots (`slot_mapping [T]`, -1: skip)
  paged_decode_attention  one query per sequence over its blocks: split-KV, the splits merged by log-sum-exp with
                          the static cache's combine kernel (attention.py)
  paged_prefill_attention chunks of prompts packed in one row of queries, each over its sequence's blocks, causal
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .attention import _decode_combine_kernel, _num_sms, attend_block, num_kv_splits, query_group, store_split


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, key_cache_ptr, value_cache_ptr, slot_ptr, k_token_stride, k_head_stride,
                     v_token_stride, v_head_stride, cache_slot_stride, cache_head_stride, HEAD_DIM: tl.constexpr):
    # k, v: [T, Hkv, D] -> the caches viewed as [num_blocks * block_size, Hkv, D] at slot_mapping[t]. Grid: (T, Hkv).
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    slot = tl.load(slot_ptr + token)
    if slot >= 0:
        d = tl.arange(0, HEAD_DIM)
        dst = slot * cache_slot_stride + head * cache_head_stride + d
        tl.store(key_cache_ptr + dst, tl.load(k_ptr + token * k_token_stride + head * k_head_stride + d))
        tl.store(value_cache_ptr + dst, tl.load(v_ptr + token * v_token_stride + head * v_head_stride + d))


def _check_store(k, v, key_cache, value_cache, slot_mapping) -> None:
    assert k.shape == v.shape and k.stride(-1) == 1 and v.stride(-1) == 1, "k and v: [T, Hkv, D] (any row strides)"
    assert key_cache.shape == value_cache.shape and key_cache.stride() == value_cache.stride()
    assert key_cache.is_contiguous(), "paged caches are contiguous [num_blocks, block_size, Hkv, D]"
    assert key_cache.shape[2:] == k.shape[1:] and key_cache.dtype == k.dtype
    assert slot_mapping.shape == (k.shape[0],) and slot_mapping.dtype == torch.int64


def paged_store_kv_triton(k, v, key_cache, value_cache, slot_mapping) -> None:
    _check_store(k, v, key_cache, value_cache, slot_mapping)
    tokens, kv_heads, head_dim = k.shape
    assert head_dim == triton.next_power_of_2(head_dim), "head_dim must be a power of two"
    if tokens == 0:
        return
    _store_kv_kernel[(tokens, kv_heads)](
        k, v, key_cache, value_cache, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        key_cache.stride(1), key_cache.stride(2), HEAD_DIM=head_dim,
    )


def paged_store_kv_reference(k, v, key_cache, value_cache, slot_mapping) -> None:
    _check_store(k, v, key_cache, value_cache, slot_mapping)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    key_cache.view(-1, *key_cache.shape[2:])[slots] = k[keep]
    value_cache.view(-1, *value_cache.shape[2:])[slots] = v[keep]


@torch.library.custom_op("qwen3_accel::paged_store_kv", mutates_args=("key_cache", "value_cache"))
def paged_store_kv(k: torch.Tensor, v: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Token t's key and value ([T, Hkv, D]) into flat slot `slot_mapping[t]` of the caches (block * block_size +
    offset); tokens with slot -1 (padding rows of a CUDA graph bucket) are skipped. Triton on CUDA."""
    if k.is_cuda:
        paged_store_kv_triton(k, v, key_cache, value_cache, slot_mapping)
    else:
        paged_store_kv_reference(k, v, key_cache, value_cache, slot_mapping)


@paged_store_kv.register_fake
def _(k, v, key_cache, value_cache, slot_mapping):
    return None


@triton.jit
def _paged_decode_split_kernel(
    q_ptr, k_ptr, v_ptr, block_table_ptr, seq_lens_ptr, part_out_ptr, part_lse_ptr,
    q_batch_stride, q_head_stride, table_stride,
    cache_block_stride, cache_slot_stride, cache_head_stride,
    n_q_heads, scale,
    BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, FP32_DOT: tl.constexpr,
):
    # q: [B, Hq, D]; caches: [num_blocks, BLOCK_SIZE, Hkv, D]; block_table: [B, max_blocks]; part_out: [B, Hq, S, D]
    # fp32 (or the [B, Hq, D] output with one split); part_lse: [B, Hq, S]. Grid: (B, Hkv, S): the number of splits
    # comes from the table's static bound (no host sync), each split takes an equal share of this sequence's
    # tokens, and one program reads each K/V row once for all GROUP query heads of its kv head. A sequence of no
    # tokens (a padding row) gets zeros.
    batch = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + batch)
    per_split = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = split * per_split
    hi = tl.minimum(lo + per_split, seq_len)

    g, d, heads, q, m, l, acc = query_group(q_ptr, batch, kv_head, q_batch_stride, q_head_stride, GROUP, GROUP_PAD,
                                            HEAD_DIM)
    for block_lo in range(lo, hi, BLOCK_N):
        n = block_lo + tl.arange(0, BLOCK_N)
        valid = n < hi
        block = tl.load(block_table_ptr + batch * table_stride + n // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        row = block * cache_block_stride + (n % BLOCK_SIZE).to(tl.int64) * cache_slot_stride
        offs = row[:, None] + kv_head * cache_head_stride + d[None, :]
        m, l, acc = attend_block(q, k_ptr + offs, v_ptr + offs, valid, valid[None, :], m, l, acc, scale, FP32_DOT)
    out_row = (batch * n_q_heads + heads) * NUM_SPLITS + split
    store_split(part_out_ptr, part_lse_ptr, out_row, d, g < GROUP, m, l, acc, HEAD_DIM, NUM_SPLITS)


def _check_decode(q, key_cache, value_cache, block_tables, seq_lens) -> None:
    assert q.dim() == 3 and q.stride(-1) == 1, "q: [B, Hq, D]"
    assert key_cache.shape == value_cache.shape and key_cache.stride() == value_cache.stride()
    assert key_cache.dim() == 4 and key_cache.stride(-1) == 1, "caches: [num_blocks, block_size, Hkv, D]"
    assert q.shape[1] % key_cache.shape[2] == 0, "query heads must be a multiple of kv heads"
    assert block_tables.dtype == torch.int32 and block_tables.shape[0] == q.shape[0] and block_tables.stride(-1) == 1
    assert seq_lens.dtype == torch.int32 and seq_lens.shape == (q.shape[0],)


def paged_decode_attention_triton(q, key_cache, value_cache, block_tables, seq_lens, scale: float):
    _check_decode(q, key_cache, value_cache, block_tables, seq_lens)
    batch, n_q_heads, head_dim = q.shape
    block_size, n_kv_heads = key_cache.shape[1], key_cache.shape[2]
    assert head_dim == triton.next_power_of_2(head_dim), "head_dim must be a power of two"
    max_len = block_tables.shape[1] * block_size  # the longest any sequence in the table can be
    splits = num_kv_splits(batch, n_kv_heads, max_len, _num_sms(q.device))
    out = q.new_empty((batch, n_q_heads, head_dim))
    part_out = out if splits == 1 else q.new_empty((batch, n_q_heads, splits, head_dim), dtype=torch.float32)
    part_lse = out if splits == 1 else q.new_empty((batch, n_q_heads, splits), dtype=torch.float32)
    group = n_q_heads // n_kv_heads
    _paged_decode_split_kernel[(batch, n_kv_heads, splits)](
        q, key_cache, value_cache, block_tables, seq_lens, part_out, part_lse,
        q.stride(0), q.stride(1), block_tables.stride(0),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        n_q_heads, float(scale),
        BLOCK_SIZE=block_size, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_N=64, NUM_SPLITS=splits, FP32_DOT=q.dtype == torch.float32, num_warps=4, num_stages=2,
    )
    if splits > 1:
        _decode_combine_kernel[(batch * n_q_heads,)](
            part_out, part_lse, out, NUM_SPLITS=splits, SPLITS_PAD=triton.next_power_of_2(splits), HEAD_DIM=head_dim,
        )
    return out


def gather_paged(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """Each sequence's blocks laid end to end: [B, max_blocks * block_size, Hkv, D]."""
    batch, max_blocks = block_tables.shape
    return cache[block_tables.long()].reshape(batch, max_blocks * cache.shape[1], *cache.shape[2:])


def paged_decode_attention_reference(q, key_cache, value_cache, block_tables, seq_lens, scale: float):
    """SDPA over each sequence's first seq_lens[b] tokens, gathered from its blocks (zeros for a sequence of none)."""
    _check_decode(q, key_cache, value_cache, block_tables, seq_lens)
    batch, n_heads, head_dim = q.shape
    keys, values = gather_paged(key_cache, block_tables), gather_paged(value_cache, block_tables)
    valid = torch.arange(keys.shape[1], device=q.device)[None] < seq_lens[:, None]  # [B, S]
    out = F.scaled_dot_product_attention(q[:, :, None, :], keys.transpose(1, 2), values.transpose(1, 2),
                                         attn_mask=valid[:, None, None, :], scale=scale, enable_gqa=True)
    return out.reshape(batch, n_heads, head_dim).masked_fill((seq_lens == 0)[:, None, None], 0.0)


@torch.library.custom_op("qwen3_accel::paged_decode_attention", mutates_args=())
def paged_decode_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """One query per sequence, q [B, Hq, D], over its first seq_lens[b] tokens in its blocks -> [B, Hq, D].
    Triton on CUDA."""
    if q.is_cuda:
        return paged_decode_attention_triton(q, key_cache, value_cache, block_tables, seq_lens, scale)
    return paged_decode_attention_reference(q, key_cache, value_cache, block_tables, seq_lens, scale)


@paged_decode_attention.register_fake
def _(q, key_cache, value_cache, block_tables, seq_lens, scale):
    return q.new_empty(q.shape)


@triton.jit
def _paged_prefill_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, block_table_ptr, chunk_starts_ptr, context_lens_ptr, num_chunks,
    q_token_stride, q_head_stride, out_token_stride, out_head_stride, table_stride,
    cache_block_stride, cache_slot_stride, cache_head_stride, scale,
    BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_Q: tl.constexpr, CHUNKS_PAD: tl.constexpr, BLOCK_N: tl.constexpr, FP32_DOT: tl.constexpr,
):
    # q, out: [T, Hq, D] packed chunks; chunk c is rows [chunk_starts[c], chunk_starts[c + 1]), the last tokens of
    # its sequence's context_lens[c] (whose keys are in the cache). Grid: (cdiv(T, BLOCK_Q) + chunks, Hkv), a bound
    # on the chunks' blocks of BLOCK_Q queries: program p takes the p-th such block, counting every chunk's blocks
    # in order (found from chunk_starts on the device, so the grid needs no host-known lengths and one launch shape
    # serves any mix of chunks: a CUDA graph can hold it), for the GROUP query heads of its kv head together
    # (BLOCK_Q * GROUP_PAD rows, so each K/V tile is read once for the group). Query i of a chunk sits at position
    # context - chunk_len + i and sees the keys at positions <= its own. Programs past the last block do nothing.
    program = tl.program_id(0)
    kv_head = tl.program_id(1)
    c = tl.arange(0, CHUNKS_PAD)
    c_valid = c < num_chunks
    c_lo = tl.load(chunk_starts_ptr + c, mask=c_valid, other=0)
    c_len = tl.load(chunk_starts_ptr + c + 1, mask=c_valid, other=0) - c_lo
    c_blocks = (c_len + BLOCK_Q - 1) // BLOCK_Q
    c_blocks_end = tl.cumsum(c_blocks, 0)
    chunk = tl.sum((c_blocks_end <= program).to(tl.int32), 0)  # the first chunk whose blocks reach past `program`
    if chunk < num_chunks:
        this = c == chunk
        q_lo = tl.sum(tl.where(this, c_lo, 0), 0)
        chunk_len = tl.sum(tl.where(this, c_len, 0), 0)
        q_block = program - tl.sum(tl.where(this, c_blocks_end - c_blocks, 0), 0)
        context = tl.load(context_lens_ptr + chunk)
        r = tl.arange(0, BLOCK_Q * GROUP_PAD)
        query = q_block * BLOCK_Q + r // GROUP_PAD
        g = r % GROUP_PAD
        row_valid = (query < chunk_len) & (g < GROUP)
        head = kv_head * GROUP + g
        positions = context - chunk_len + query
        d = tl.arange(0, HEAD_DIM)
        token = (q_lo + query).to(tl.int64)
        q = tl.load(q_ptr + token[:, None] * q_token_stride + head[:, None] * q_head_stride + d[None, :],
                    mask=row_valid[:, None], other=0.0)
        m = tl.full([BLOCK_Q * GROUP_PAD], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_Q * GROUP_PAD], tl.float32)
        acc = tl.zeros([BLOCK_Q * GROUP_PAD, HEAD_DIM], tl.float32)
        # Keys up to the block's last query's position.
        hi = tl.minimum(context, context - chunk_len + (q_block + 1) * BLOCK_Q)
        chunk64 = chunk.to(tl.int64)
        for block_lo in range(0, hi, BLOCK_N):
            n = block_lo + tl.arange(0, BLOCK_N)
            in_range = n < hi
            block = tl.load(block_table_ptr + chunk64 * table_stride + n // BLOCK_SIZE, mask=in_range,
                            other=0).to(tl.int64)
            row = block * cache_block_stride + (n % BLOCK_SIZE).to(tl.int64) * cache_slot_stride
            offs = row[:, None] + kv_head * cache_head_stride + d[None, :]
            visible = in_range[None, :] & (n[None, :] <= positions[:, None])
            m, l, acc = attend_block(q, k_ptr + offs, v_ptr + offs, in_range, visible, m, l, acc, scale, FP32_DOT)
        out = acc / tl.where(l > 0, l, 1.0)[:, None]
        tl.store(out_ptr + token[:, None] * out_token_stride + head[:, None] * out_head_stride + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None])


def _check_prefill(q, key_cache, value_cache, block_tables, chunk_starts, context_lens) -> None:
    assert q.dim() == 3 and q.stride(-1) == 1, "q: [T, Hq, D] packed chunks"
    assert key_cache.shape == value_cache.shape and key_cache.stride() == value_cache.stride()
    assert key_cache.dim() == 4 and key_cache.stride(-1) == 1, "caches: [num_blocks, block_size, Hkv, D]"
    assert q.shape[1] % key_cache.shape[2] == 0, "query heads must be a multiple of kv heads"
    chunks = block_tables.shape[0]
    assert block_tables.dtype == torch.int32 and block_tables.stride(-1) == 1
    assert chunk_starts.dtype == torch.int32 and chunk_starts.shape == (chunks + 1,)
    assert context_lens.dtype == torch.int32 and context_lens.shape == (chunks,)


def paged_prefill_attention_triton(q, key_cache, value_cache, block_tables, chunk_starts, context_lens,
                                   scale: float):
    _check_prefill(q, key_cache, value_cache, block_tables, chunk_starts, context_lens)
    tokens, n_q_heads, head_dim = q.shape
    block_size, n_kv_heads = key_cache.shape[1], key_cache.shape[2]
    assert head_dim == triton.next_power_of_2(head_dim), "head_dim must be a power of two"
    out = q.new_zeros(q.shape)  # rows no chunk covers (a graph bucket's padding tokens) stay zero
    chunks = block_tables.shape[0]
    if chunks == 0 or tokens == 0:
        return out
    group = n_q_heads // n_kv_heads
    group_pad = triton.next_power_of_2(group)
    # 16 rows (BLOCK_Q queries x the padded group), the smallest tl.dot tile; a first guess, like the decode
    # kernels' blocks, until a GPU run. A one-token chunk (a decode in a graphed step) fills group_pad of them.
    block_q = max(1, 16 // group_pad)
    _paged_prefill_kernel[(triton.cdiv(tokens, block_q) + chunks, n_kv_heads)](
        q, key_cache, value_cache, out, block_tables, chunk_starts, context_lens, chunks,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), float(scale),
        BLOCK_SIZE=block_size, GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim, BLOCK_Q=block_q,
        CHUNKS_PAD=triton.next_power_of_2(chunks), BLOCK_N=32, FP32_DOT=q.dtype == torch.float32, num_warps=4,
        num_stages=2,
    )
    return out


def paged_prefill_attention_reference(q, key_cache, value_cache, block_tables, chunk_starts, context_lens,
                                      scale: float):
    """Each chunk through SDPA over its sequence's first context_lens[c] keys, gathered from its blocks, causal;
    rows no chunk covers are zeros."""
    _check_prefill(q, key_cache, value_cache, block_tables, chunk_starts, context_lens)
    out = q.new_zeros(q.shape)
    starts, contexts = chunk_starts.tolist(), context_lens.tolist()
    keys, values = gather_paged(key_cache, block_tables), gather_paged(value_cache, block_tables)
    for c, context in enumerate(contexts):
        lo, hi = starts[c], starts[c + 1]
        if hi == lo:
            continue
        chunk_q = q[lo:hi].transpose(0, 1)[None]  # [1, Hq, L, D]
        k, v = keys[c, :context].transpose(0, 1)[None], values[c, :context].transpose(0, 1)[None]
        query_pos = torch.arange(context - (hi - lo), context, device=q.device)[:, None]
        mask = torch.arange(context, device=q.device)[None, :] <= query_pos  # [L, S]
        attended = F.scaled_dot_product_attention(chunk_q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        out[lo:hi] = attended[0].transpose(0, 1)
    return out


@torch.library.custom_op("qwen3_accel::paged_prefill_attention", mutates_args=())
def paged_prefill_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                            block_tables: torch.Tensor, chunk_starts: torch.Tensor, context_lens: torch.Tensor,
                            scale: float) -> torch.Tensor:
    """Prompt chunks packed in q [T, Hq, D] (chunk c: rows chunk_starts[c]..chunk_starts[c + 1], the last tokens of
    a sequence of context_lens[c] cached tokens, block table row c), each attending causally over its sequence's
    keys -> [T, Hq, D]; rows past the last chunk are zeros. Chunks may be empty, and nothing about them need be
    known on the host (a CUDA graph holds any mix of the same T and chunk count). Triton on CUDA."""
    args = (q, key_cache, value_cache, block_tables, chunk_starts, context_lens, scale)
    return paged_prefill_attention_triton(*args) if q.is_cuda else paged_prefill_attention_reference(*args)


@paged_prefill_attention.register_fake
def _(q, key_cache, value_cache, block_tables, chunk_starts, context_lens, scale):
    return q.new_empty(q.shape)

