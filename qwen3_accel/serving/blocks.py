"""The paged KV cache's books: which blocks each sequence owns, and prompt prefixes shared between sequences.

The pool holds `num_blocks` blocks of `block_size` token slots (the tensors live with the model runner; this
module only counts). A sequence's block table lists its blocks in token order: its token t is in block
`table[t // block_size]`, slot `t % block_size` (custom_ops/paged_attention.py reads that layout).

Prefix sharing: a block filled with prompt tokens is named by its tokens and the block before it (exactly, no
hash to collide), so two sequences whose prompts agree on their first k full blocks map them to the same k
blocks (reference-counted, never written again: a sequence appends only into its last, partly filled block or a
fresh one; a prompt made only of shared blocks recomputes its last block in a fresh one, which its logits need).
A freed block keeps its contents and name until it is handed out again, so a later request with the same prefix
(a system prompt, a chat history) finds it; free blocks are reused least recently freed first.
"""

from collections import OrderedDict
from dataclasses import dataclass, field


ROOT = -1  # the "block before" a sequence's first block


@dataclass
class Block:
    index: int
    refs: int = 0
    uid: int = ROOT  # new each time the block is handed out fresh: names its contents for the blocks after it
    key: tuple | None = None  # (uid of the block before, its tokens) for a full prompt block, else None


@dataclass
class SequenceBlocks:
    """One sequence's share of the pool: its block table, how many tokens it has, and how many of its first
    tokens were found in shared blocks (their keys and values need not be computed again)."""

    table: list[int] = field(default_factory=list)
    num_tokens: int = 0
    cached_tokens: int = 0


class OutOfBlocks(RuntimeError):
    """The pool has too few free blocks for the request (the scheduler preempts or waits)."""


class BlockManager:
    """Hands out blocks to sequences, shares full prompt blocks, and takes them back."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"a paged cache needs at least one block of one slot; got {num_blocks} x {block_size}")
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # oldest freed first
        self.named: dict[tuple, int] = {}  # Block.key -> block index (in use or free) of published prompt blocks
        self._uids = 0
        self.peak_used = 0  # the most blocks in use at once (the KV memory a workload really took)

    @property
    def num_free(self) -> int:
        return len(self.free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _take(self, index: int) -> Block:
        block = self.blocks[index]
        if block.refs == 0:
            del self.free[index]
            self.peak_used = max(self.peak_used, len(self.blocks) - len(self.free))
        block.refs += 1
        return block

    def _fresh(self) -> Block:
        index = next(iter(self.free))
        block = self.blocks[index]
        if block.key is not None and self.named.get(block.key) == index:
            del self.named[block.key]  # its old contents are overwritten now
        self._uids += 1
        block.uid, block.key = self._uids, None
        return self._take(index)

    def _prompt_blocks(self, tokens: list[int]) -> list[tuple]:
        return [tuple(tokens[i : i + self.block_size]) for i in range(0, len(tokens), self.block_size)]

    def _shared_prefix(self, tokens: list[int]) -> list[int]:
        """The blocks holding this prompt's leading full blocks, as far as they are found; never the block with
        its last token."""
        shared, parent = [], ROOT
        for chunk in self._prompt_blocks(tokens[:-1])[: (len(tokens) - 1) // self.block_size]:
            index = self.named.get((parent, chunk))
            if index is None:
                break
            shared.append(index)
            parent = self.blocks[index].uid
        return shared

    def can_allocate(self, tokens: list[int]) -> bool:
        """Whether a prompt of `tokens` fits now, counting the blocks it would share."""
        shared = self._shared_prefix(tokens)
        new = self.blocks_for(len(tokens)) - len(shared)
        shared_free = sum(self.blocks[i].refs == 0 for i in shared)
        return new + shared_free <= self.num_free

    def allocate(self, tokens: list[int]) -> SequenceBlocks:
        """Blocks for a new prompt (at least one token): its leading full blocks shared where another prompt left
        them, fresh ones after. Raises OutOfBlocks (and takes nothing) when it does not fit."""
        if not tokens:
            raise ValueError("a sequence needs at least one token")
        if not self.can_allocate(tokens):
            raise OutOfBlocks(f"{self.blocks_for(len(tokens))} blocks needed, {self.num_free} free")
        shared = self._shared_prefix(tokens)
        seq = SequenceBlocks(num_tokens=len(tokens), cached_tokens=len(shared) * self.block_size)
        parent = ROOT
        for index in shared:
            parent = self._take(index).uid
            seq.table.append(index)
        for chunk in self._prompt_blocks(tokens)[len(shared) :]:
            block = self._fresh()
            if len(chunk) == self.block_size:  # a full prompt block: shared once its keys are written (`publish`)
                block.key = (parent, chunk)
            parent = block.uid
            seq.table.append(block.index)
        return seq

    def publish(self, seq: SequenceBlocks) -> None:
        """The sequence's prompt blocks hold their keys now: later prompts may share them."""
        for index in seq.table:
            block = self.blocks[index]
            if block.key is not None:
                self.named.setdefault(block.key, index)

    def can_append(self, seq: SequenceBlocks) -> bool:
        """Whether one more token fits (it needs a fresh block only when the last one is full)."""
        return seq.num_tokens % self.block_size != 0 or self.num_free > 0

    def append(self, seq: SequenceBlocks) -> None:
        """Room for one more token at the end of the sequence."""
        if seq.num_tokens % self.block_size == 0:
            if not self.free:
                raise OutOfBlocks("no free block for the next token")
            seq.table.append(self._fresh().index)
        seq.num_tokens += 1

    def free_sequence(self, seq: SequenceBlocks) -> None:
        """Give the sequence's blocks back (a finished, cancelled or preempted request)."""
        for index in reversed(seq.table):  # its last blocks are the least likely to be shared: reused first
            block = self.blocks[index]
            block.refs -= 1
            if block.refs == 0:
                self.free[index] = None
        seq.table.clear()
        seq.num_tokens = seq.cached_tokens = 0

    def slot(self, seq: SequenceBlocks, position: int) -> int:
        """The flat slot (block * block_size + offset) of the sequence's token at `position`."""
        return seq.table[position // self.block_size] * self.block_size + position % self.block_size
