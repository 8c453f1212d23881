"""Paged KV cache ops (custom_ops/paged_attention.py): the Triton kernels, interpreted, against their torch
references and against the static cache's decode attention on the same keys."""

import itertools

import pytest
import torch

from qwen3_accel.custom_ops import attention, paged_attention



def paged_setup(lengths, block_size, kv_heads, head_dim, dtype, seed=0):
    """Random keys/values for sequences of `lengths` tokens in shuffled blocks of a pool with spare blocks; also
    the same keys laid out contiguously, as the static cache holds them."""
    g = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-n // block_size) for n in lengths]
    max_blocks = max(blocks_per_seq) + 1  # a table wider than any sequence needs
    num_blocks = sum(blocks_per_seq) + 3
    order = torch.randperm(num_blocks, generator=g).int()
    key_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    value_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    tables = torch.full((len(lengths), max_blocks), num_blocks - 1, dtype=torch.int32)  # unused entries: any block
    start = 0
    for row, n in enumerate(blocks_per_seq):
        tables[row, :n] = order[start : start + n]
        start += n
    return key_cache, value_cache, tables, torch.tensor(lengths, dtype=torch.int32)


@pytest.mark.parametrize("q_heads,kv_heads", [(4, 4), (4, 2), (16, 2)], ids=["gqa1", "gqa2", "gqa8"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [16, 64])
def test_paged_decode_attention_matches_reference(q_heads, kv_heads, head_dim, block_size):
    lengths = [1, block_size, block_size + 1, 3 * block_size - 5, 0]  # one block, exact, one over, several, none
    key_cache, value_cache, tables, seq_lens = paged_setup(lengths, block_size, kv_heads, head_dim, torch.float32)
    q = torch.randn(len(lengths), q_heads, head_dim, generator=torch.Generator().manual_seed(1))
    scale = head_dim**-0.5
    expected = paged_attention.paged_decode_attention_reference(q, key_cache, value_cache, tables, seq_lens, scale)
    actual = paged_attention.paged_decode_attention_triton(q, key_cache, value_cache, tables, seq_lens, scale)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(actual[-1], torch.zeros_like(actual[-1]))  # a padding row of no tokens


def test_paged_decode_attention_equals_the_static_cache_kernel_with_many_splits():
    """Long sequences (several KV splits merged by the combine kernel) give what the static cache's kernel gives on
    the same keys laid out contiguously; bf16 within bf16's tolerance."""
    lengths, block_size = [700, 333, 1024], 16
    key_cache, value_cache, tables, seq_lens = paged_setup(lengths, block_size, 2, 64, torch.bfloat16, seed=3)
    q = torch.randn(3, 8, 64, generator=torch.Generator().manual_seed(4)).bfloat16()
    keys = paged_attention.gather_paged(key_cache, tables)
    values = paged_attention.gather_paged(value_cache, tables)
    kv_valid = torch.arange(keys.shape[1])[None] < seq_lens[:, None].long()
    seq_start = torch.zeros(3, dtype=torch.int32)
    seq_end = torch.tensor([keys.shape[1]])
    assert attention.num_kv_splits(3, 2, keys.shape[1], 8) > 1
    static = attention.decode_attention_triton(q, keys, values, kv_valid, seq_start, seq_end, 0.125)
    paged = paged_attention.paged_decode_attention_triton(q, key_cache, value_cache, tables, seq_lens, 0.125)
    torch.testing.assert_close(paged.float(), static.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_paged_store_kv_writes_exactly_the_mapped_slots(impl):
    key_cache = torch.zeros(5, 16, 2, 64)
    value_cache = torch.zeros(5, 16, 2, 64)
    k = torch.randn(4, 2, 64)
    v = torch.randn(4, 6, 64)[:, 4:]  # a strided view, as v is of the fused qkv projection
    slots = torch.tensor([17, -1, 79, 0])  # block 1 slot 1, a skipped padding token, block 4 slot 15, block 0 slot 0
    store = getattr(paged_attention, f"paged_store_kv_{impl}")
    store(k, v, key_cache, value_cache, slots)
    flat_k, flat_v = key_cache.view(-1, 2, 64), value_cache.view(-1, 2, 64)
    for token, slot in enumerate(slots.tolist()):
        if slot >= 0:
            assert torch.equal(flat_k[slot], k[token]) and torch.equal(flat_v[slot], v[token])
    written = torch.zeros(80, dtype=torch.bool)
    written[[17, 79, 0]] = True
    assert not flat_k[~written].any() and not flat_v[~written].any()


def test_registered_ops():
    key_cache, value_cache, tables, seq_lens = paged_setup([5, 20], 16, 2, 64, torch.float32)
    q = torch.randn(2, 4, 64)
    torch.library.opcheck(torch.ops.qwen3_accel.paged_decode_attention, (q, key_cache, value_cache, tables, seq_lens,
                                                                        0.125))
    k, v = torch.randn(3, 2, 64), torch.randn(3, 2, 64)
    torch.library.opcheck(torch.ops.qwen3_accel.paged_store_kv,
                          (k, v, key_cache.clone(), value_cache.clone(), torch.tensor([0, -1, 33])))


@pytest.mark.parametrize("q_heads,kv_heads", [(4, 4), (4, 2), (16, 2), (10, 2), (32, 1)],
                         ids=["gqa1", "gqa2", "gqa8", "gqa5", "gqa32"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [16, 64])
def test_paged_prefill_attention_matches_reference(q_heads, kv_heads, head_dim, block_size):
    """Packed chunks: a one-token prompt, a fresh prompt, a continuation after cached tokens (crossing a block), one
    longer than a query block, decodes (one token after many), empty chunks among them and after them, and padding
    tokens after the last chunk (as a graph bucket pads a step), which get zeros."""
    chunks = [(1, 1), (5, 5), (0, 0), (20, 37), (1, 70), (33, 40), (0, 0), (1, 2), (0, 0), (0, 0)]  # (tokens, so far)
    contexts = [max(context, 1) for _, context in chunks]
    key_cache, value_cache, tables, context_lens = paged_setup(contexts, block_size, kv_heads, head_dim,
                                                               torch.float32, seed=6)
    context_lens = torch.tensor([context for _, context in chunks], dtype=torch.int32)
    starts = torch.tensor([0] + list(itertools.accumulate(n for n, _ in chunks)), dtype=torch.int32)
    padding = 6
    q = torch.randn(int(starts[-1]) + padding, q_heads, head_dim, generator=torch.Generator().manual_seed(7))
    args = (q, key_cache, value_cache, tables, starts, context_lens, head_dim**-0.5)
    expected = paged_attention.paged_prefill_attention_reference(*args)
    torch.testing.assert_close(paged_attention.paged_prefill_attention_triton(*args), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(expected[-padding:], torch.zeros_like(expected[-padding:]))
    # The reference is HF's causal attention: the continuation chunk's last query over its whole sequence.
    keys = paged_attention.gather_paged(key_cache, tables)[3, :37]
    values = paged_attention.gather_paged(value_cache, tables)[3, :37]
    last = q[int(starts[4]) - 1]  # [Hq, D]
    group = q_heads // kv_heads
    weights = torch.softmax(torch.einsum("hd,shd->hs", last, keys.repeat_interleave(group, 1)) * head_dim**-0.5, -1)
    torch.testing.assert_close(expected[int(starts[4]) - 1],
                               torch.einsum("hs,shd->hd", weights, values.repeat_interleave(group, 1)),
                               rtol=1e-5, atol=1e-5)


def test_paged_prefill_attention_with_every_chunk_empty_computes_zeros():
    """A graph's capture step: padding tokens only, every chunk empty."""
    key_cache, value_cache, tables, _ = paged_setup([1, 1, 1], 16, 2, 64, torch.float32)
    q = torch.randn(16, 4, 64)
    starts, contexts = torch.zeros(4, dtype=torch.int32), torch.zeros(3, dtype=torch.int32)
    for impl in (paged_attention.paged_prefill_attention_triton, paged_attention.paged_prefill_attention_reference):
        assert torch.equal(impl(q, key_cache, value_cache, tables, starts, contexts, 0.125), torch.zeros_like(q))


def test_paged_prefill_attention_one_token_chunks_equal_paged_decode_attention():
    """A step of decodes packed as one-token chunks (how a graphed step with prompt chunks carries its decodes)
    gives what the decode kernel gives them, across more chunks than one power of two."""
    lengths = [1, 16, 17, 45, 3, 64, 30, 9, 100, 2, 5, 33, 8, 70, 12, 50, 7, 20]
    key_cache, value_cache, tables, seq_lens = paged_setup(lengths, 16, 2, 64, torch.float32, seed=8)
    q = torch.randn(len(lengths), 8, 64, generator=torch.Generator().manual_seed(9))
    decoded = paged_attention.paged_decode_attention_triton(q, key_cache, value_cache, tables, seq_lens, 0.125)
    starts = torch.arange(len(lengths) + 1, dtype=torch.int32)
    chunked = paged_attention.paged_prefill_attention_triton(q, key_cache, value_cache, tables, starts, seq_lens,
                                                             0.125)
    torch.testing.assert_close(chunked, decoded, rtol=1e-5, atol=1e-5)


def test_paged_prefill_op_registration():
    key_cache, value_cache, tables, context_lens = paged_setup([7, 20], 16, 2, 64, torch.float32)
    q = torch.randn(9, 4, 64)
    starts = torch.tensor([0, 3, 9], dtype=torch.int32)
    torch.library.opcheck(torch.ops.qwen3_accel.paged_prefill_attention,
                          (q, key_cache, value_cache, tables, starts, context_lens, 0.125))
