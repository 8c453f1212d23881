"""Which requests run in the next step of the continuous-batching engine.

Every step runs, within a token budget: one token for each running sequence whose prompt is in the cache
(decode), then chunks of prompts (prefill: the unfinished prompts of running sequences first, then waiting
requests in arrival order), so that a long prompt is cut into chunks and never stalls the running decodes.

A request is admitted when the pool has blocks for its whole prompt (shared prompt blocks count once). When a
running sequence needs a block for its next token and none is free, the most recently admitted other sequence is
preempted: its blocks are freed and it goes back to the front of the queue with the tokens it generated, to be
recomputed later (never dropped, truncated or mixed with another). A request that cannot fit even alone fails by
itself with a clear error.
"""

import enum
import itertools
from collections import deque
from dataclasses import dataclass, field

from .blocks import BlockManager, SequenceBlocks


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"


@dataclass(frozen=True)
class SamplingParams:
    """What a request asks for: its length, its stop tokens and how to pick each token."""

    max_new_tokens: int
    eos_ids: frozenset = frozenset()
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


@dataclass(eq=False)  # compared by identity: two requests are never the same (and field-by-field `==` over
class Sequence:       # their token lists made every `in` / `remove` on the running list slow, ~1 ms a step at 64)
    """One request's tokens and where it stands. `computed`: how many of its tokens have keys and values in the
    cache; the next step computes from there (the last token is always computed by the step that samples after
    it). `pending`: tokens picked by a step still in flight, whose values the host has not read yet (the engine's
    overlap: the next step is scheduled before they are known, and reads them on the device); they count in
    `num_tokens`, not in `generated` or `tokens`."""

    request_id: str
    prompt: list[int]
    params: SamplingParams
    generated: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    blocks: SequenceBlocks | None = None
    computed: int = 0
    preemptions: int = 0
    published: bool = False  # its prompt blocks may be shared (their keys are in the cache)
    error: str | None = None
    pending: int = 0

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.generated

    @property
    def num_tokens(self) -> int:
        """len(tokens) + pending, without building the list (the scheduler asks every step, for every sequence)."""
        return len(self.prompt) + len(self.generated) + self.pending

    @property
    def has_all_tokens(self) -> bool:
        """Its last token is picked (maybe still in flight): no step computes for it any more."""
        return len(self.generated) + self.pending >= self.params.max_new_tokens

    def tokens_between(self, start: int, end: int) -> list[int]:
        """tokens[start:end], without building the whole list (pending tokens are not in it)."""
        prompt_len = len(self.prompt)
        return self.prompt[start:end] + self.generated[max(0, start - prompt_len) : max(0, end - prompt_len)]

    @property
    def finished(self) -> bool:
        return self.status in (Status.FINISHED, Status.FAILED)


@dataclass(frozen=True)
class Chunk:
    """Tokens [start, end) of a sequence computed in this step; `samples`: the step ends its prompt (or it is a
    decode), so the next token is picked from the logits of its last position."""

    sequence: Sequence
    start: int
    end: int

    @property
    def samples(self) -> bool:
        return self.end == self.sequence.num_tokens


class Scheduler:
    def __init__(self, blocks: BlockManager, max_batch_tokens: int, max_batch_size: int):
        if max_batch_tokens < 1 or max_batch_size < 1:
            raise ValueError(f"max_batch_tokens={max_batch_tokens} and max_batch_size={max_batch_size} must be >= 1")
        self.blocks = blocks
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.preemptions = 0  # since the engine started (a sign the pool is too small for the load)
        self.admitted = 0  # by the last schedule()
        self._ids = itertools.count()

    def add(self, prompt: list[int], params: SamplingParams, request_id: str | None = None) -> Sequence:
        if not prompt:
            raise ValueError("a request needs at least one prompt token")
        if params.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={params.max_new_tokens}: a request must ask for at least one token")
        seq = Sequence(request_id if request_id is not None else f"req_{next(self._ids)}", list(prompt), params)
        self.waiting.append(seq)
        return seq

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def cancel(self, seq: Sequence) -> None:
        """Stop a request now (a client that went away): its blocks go back to the pool."""
        if seq.finished:
            return
        self.finish(seq, Status.FAILED, "cancelled")

    def finish(self, seq: Sequence, status: Status = Status.FINISHED, error: str | None = None) -> None:
        """It leaves the engine: running, or waiting after a preemption (its last token was still in flight)."""
        self._release(seq)
        if seq.status is Status.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        seq.status, seq.error, seq.pending = status, error, 0

    def _release(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        if seq.blocks is not None:
            self.blocks.free_sequence(seq.blocks)
            seq.blocks = None
        seq.computed = 0
        seq.published = False

    def _preempt(self, seq: Sequence) -> None:
        self._release(seq)
        seq.status = Status.WAITING
        seq.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)

    def schedule(self) -> list[Chunk]:
        """The next step's work: decodes first, then prefill chunks, within the budgets."""
        chunks: list[Chunk] = []
        budget = self.max_batch_tokens
        preempted = False
        self.admitted = 0  # sequences this step starts (or restarts after a preemption)
        victims: set[int] = set()  # ids of the sequences preempted in this step
        for seq in list(self.running):
            if id(seq) in victims or seq.computed < seq.num_tokens - 1 or seq.has_all_tokens or budget == 0:
                continue  # preempted by an earlier one this step, still in its prompt, or done
            if seq.pending and self._short_of_a_block(seq):
                continue  # its token in flight may be its eos: read it before preempting or failing for a block
            while self._short_of_a_block(seq):
                victim = next((s for s in reversed(self.running) if s is not seq), None)
                if victim is None:
                    self.finish(seq, Status.FAILED, self._too_long(seq.num_tokens))
                    break
                self._preempt(victim)
                victims.add(id(victim))
                preempted = True
                chunks = [c for c in chunks if c.sequence is not victim]
                budget = self.max_batch_tokens - sum(c.end - c.start for c in chunks)
            if seq.finished:
                continue
            if seq.blocks.num_tokens < seq.num_tokens:
                self.blocks.append(seq.blocks)
            chunks.append(Chunk(seq, seq.num_tokens - 1, seq.num_tokens))
            budget -= 1
        for seq in self.running:  # prompts being prefilled in chunks
            if budget == 0:
                break
            if seq.computed < seq.num_tokens - 1:
                end = min(seq.num_tokens, seq.computed + budget)
                chunks.append(Chunk(seq, seq.computed, end))
                budget -= end - seq.computed
        # No admission right after a preemption: the freed blocks would be taken again at once.
        while self.waiting and budget > 0 and len(self.running) < self.max_batch_size and not preempted:
            seq = self.waiting[0]
            if seq.pending:
                break  # preempted with its last token in flight: it restarts once that token is known
            tokens = seq.tokens
            if self.blocks.blocks_for(len(tokens)) > len(self.blocks.blocks):
                self.waiting.popleft()
                seq.status, seq.error = Status.FAILED, self._too_long(len(tokens))
                continue
            if not self.blocks.can_allocate(tokens):
                break  # first come, first served: wait for blocks to free up
            self.waiting.popleft()
            seq.blocks = self.blocks.allocate(tokens)
            seq.computed = seq.blocks.cached_tokens
            seq.status = Status.RUNNING
            self.running.append(seq)
            self.admitted += 1
            end = min(len(tokens), seq.computed + budget)
            chunks.append(Chunk(seq, seq.computed, end))
            budget -= end - seq.computed
        return chunks

    def _short_of_a_block(self, seq: Sequence) -> bool:
        """Its next token needs a fresh block and none is free."""
        return seq.blocks.num_tokens < seq.num_tokens and not self.blocks.can_append(seq.blocks)

    def _too_long(self, num_tokens: int) -> str:
        pool = len(self.blocks.blocks) * self.blocks.block_size
        return (f"this request needs {num_tokens} tokens of KV cache, more than the whole pool holds ({pool}); "
                "give the engine more KV blocks or ask for fewer tokens")

    def completed(self, chunks: list[Chunk]) -> None:
        """The step ran: its chunks' keys and values are in the cache (full prompt blocks may now be shared)."""
        for chunk in chunks:
            seq = chunk.sequence
            if seq.finished or seq.blocks is None:
                continue
            seq.computed = chunk.end
            if chunk.samples and not seq.published:
                self.blocks.publish(seq.blocks)
                seq.published = True
