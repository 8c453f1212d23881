"""The paged cache's block manager (serving/blocks.py): accounting, prefix sharing, reuse, and a random stream of
allocations, appends and frees that checks every invariant after each step."""

import random

import pytest

from qwen3_accel.serving.blocks import BlockManager, OutOfBlocks


def test_allocate_append_free_accounting():
    blocks = BlockManager(num_blocks=4, block_size=4)
    seq = blocks.allocate([1, 2, 3, 4, 5])  # two blocks, the second holding one token
    assert len(seq.table) == 2 and blocks.num_free == 2 and seq.cached_tokens == 0
    for _ in range(3):  # fills the second block: no new one
        blocks.append(seq)
    assert len(seq.table) == 2 and seq.num_tokens == 8
    blocks.append(seq)  # token 8 opens a third block
    assert len(seq.table) == 3 and blocks.num_free == 1
    assert blocks.slot(seq, 8) == seq.table[2] * 4 and blocks.slot(seq, 5) == seq.table[1] * 4 + 1
    blocks.free_sequence(seq)
    assert blocks.num_free == 4 and seq.table == []


def test_a_prompt_that_does_not_fit_takes_nothing():
    blocks = BlockManager(num_blocks=2, block_size=4)
    held = blocks.allocate([1] * 5)
    assert not blocks.can_allocate([2] * 5)
    with pytest.raises(OutOfBlocks):
        blocks.allocate([2] * 5)
    assert blocks.num_free == 0 and len(held.table) == 2
    assert not blocks.can_append(held) or held.num_tokens % 4
    with pytest.raises(ValueError, match="at least one token"):
        blocks.allocate([])


def test_published_prompt_blocks_are_shared_and_survive_their_owner():
    blocks = BlockManager(num_blocks=8, block_size=4)
    system = list(range(10, 18))  # two full blocks
    first = blocks.allocate(system + [1, 2, 3])
    blocks.publish(first)
    second = blocks.allocate(system + [7])
    assert second.table[:2] == first.table[:2] and second.cached_tokens == 8
    assert second.table[2] not in first.table
    assert blocks.blocks[first.table[0]].refs == 2
    system_blocks = second.table[:2]
    blocks.free_sequence(first)
    blocks.free_sequence(second)
    third = blocks.allocate(system + [9, 9])  # freed, but still holding the system prompt: found again
    assert third.table[:2] == system_blocks and third.cached_tokens == 8


def test_an_unpublished_or_different_prefix_is_not_shared():
    blocks = BlockManager(num_blocks=16, block_size=4)
    first = blocks.allocate([1, 2, 3, 4, 5])
    assert blocks.allocate([1, 2, 3, 4, 6]).cached_tokens == 0  # keys not written yet: nothing to share
    blocks.publish(first)
    assert blocks.allocate([1, 2, 3, 4, 6]).cached_tokens == 4
    assert blocks.allocate([9, 2, 3, 4, 5]).cached_tokens == 0
    # The same tokens after a different first block are a different prefix.
    a = blocks.allocate([7, 7, 7, 7, 1, 2, 3, 4, 0])
    blocks.publish(a)
    b = blocks.allocate([8, 8, 8, 8, 1, 2, 3, 4, 0])
    assert b.cached_tokens == 0 and not set(a.table) & set(b.table)


def test_a_prompt_of_shared_blocks_only_recomputes_its_last_block():
    blocks = BlockManager(num_blocks=6, block_size=4)
    first = blocks.allocate(list(range(8)))
    blocks.publish(first)
    again = blocks.allocate(list(range(8)))
    assert again.cached_tokens == 4 and again.table[0] == first.table[0] and again.table[1] != first.table[1]


def test_a_reused_block_loses_its_name():
    blocks = BlockManager(num_blocks=2, block_size=4)
    first = blocks.allocate([1, 2, 3, 4, 5])
    blocks.publish(first)
    blocks.free_sequence(first)
    other = blocks.allocate([9, 9, 9, 9, 9])  # both blocks handed out fresh, overwritten
    blocks.free_sequence(other)
    assert blocks.allocate([1, 2, 3, 4, 5]).cached_tokens == 0


def test_random_stream_keeps_every_invariant():
    rng = random.Random(0)
    blocks = BlockManager(num_blocks=24, block_size=4)
    prefixes = [[rng.randrange(50) for _ in range(rng.choice([4, 8, 9]))] for _ in range(3)]
    live = []  # (sequence, its tokens)
    for step in range(600):
        action = rng.random()
        if action < 0.35:
            tokens = rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randrange(1, 7))]
            if blocks.can_allocate(tokens):
                seq = blocks.allocate(tokens)
                cached = seq.cached_tokens
                assert cached % 4 == 0 and cached < len(tokens)
                blocks.publish(seq)
                live.append((seq, tokens))
            else:
                with pytest.raises(OutOfBlocks):
                    blocks.allocate(tokens)
        elif action < 0.8 and live:
            seq, tokens = rng.choice(live)
            if blocks.can_append(seq):
                blocks.append(seq)
                tokens.append(rng.randrange(50))
        elif live:
            seq, _ = live.pop(rng.randrange(len(live)))
            blocks.free_sequence(seq)
        # Invariants: every block is free xor referenced by exactly `refs` tables; a block in two tables is a full
        # prompt block both sequences hold the same tokens in, at the same position.
        refs = {}
        for seq, tokens in live:
            assert len(seq.table) == blocks.blocks_for(seq.num_tokens) and seq.num_tokens == len(tokens)
            for position, index in enumerate(seq.table):
                refs.setdefault(index, []).append(tuple(tokens[: (position + 1) * 4]))
        for block in blocks.blocks:
            holders = refs.get(block.index, [])
            assert block.refs == len(holders), step
            assert (block.refs == 0) == (block.index in blocks.free), step
            assert len(set(holders)) <= 1, f"step {step}: block {block.index} shared by different prefixes"
