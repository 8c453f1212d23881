"""Continuous batching on an optimized model's kernels: a paged KV cache, the scheduler, one packed step at a time.

    engine = Engine(qwen3_accel.optimize(model), num_blocks=512)
    outputs = engine.generate([[1, 2, 3], [4, 5]], max_new_tokens=32)   # or add_request() + step()

Each `step()` asks the scheduler for its chunks (a token per decoding sequence, then prompt chunks), packs them
into one token row with their positions, cache slots and block tables, runs the model once over it
(`ModelRunner.paged_step`: our kernels, `decoder.PagedAttention`), and picks a token for every sequence whose chunk
ended at its last token. Requests join and leave between any two steps.

Overlap (on CUDA by default): a step is launched before the host reads the tokens of the step before it, so that
the host's work for the next step (reading tokens, finishing requests, scheduling, packing) runs while the device
computes this one. The tokens still in flight are `Sequence.pending`; the step that decodes after them takes them
from the device (`InFlight.tokens`). A sequence whose in-flight token turns out to be an eos has computed one step
too many: that token is dropped. On the CPU the ops run as they are called, so there is nothing to hide and each
step's tokens are read at once.
"""

import itertools
from dataclasses import dataclass, field

import torch

from ..decoder import PagedBatch
from ..fast_generate import select_tokens
from ..graphs import outside_inference_mode
from .blocks import BlockManager
from .scheduler import Chunk, SamplingParams, Scheduler, Sequence, Status

DEFAULT_CPU_BLOCKS = 1024  # without a device to measure, a pool of 1024 blocks (16k tokens at 16 per block)
# Decode-only steps replay a graph per (row bucket, block-table width) key: rows padded to a power of two up to
# max_batch_size, table widths to a power of two from this many blocks up to the model's positions. On CUDA 64
# (1024 tokens at 16 per block): the Triton kernel stops at each sequence's length, so a wider table costs little
# and a serving mix of short requests uses one width. On the CPU the torch reference attends over the whole width
# (it gathers every block), so tables stay as narrow as the longest sequence: at 32 rows of ~100 tokens a width
# of 64 made each step 2.3x slower than the fast loop's (tiny model, 2026-12-02).
MIN_GRAPH_TABLE_BLOCKS = {"cuda": 64, "cpu": 4}
# Steps with prompt chunks replay a graph per (token bucket, table width) key on these devices when their tokens,
# padded to a power of two from CHUNK_GRAPH_MIN_TOKENS, are at most CHUNK_GRAPH_MAX_TOKENS: every sequence's chunk,
# a decode's one token too, goes through the chunk kernel (paged_prefill_attention, whose grid needs nothing known
# on the host), chunks padded to max_batch_size. Eagerly such a step launches ~12 ops per layer from Python, ~430
# for Qwen3-8B's 36 layers; under serving load most steps carry a prompt chunk (at 64 users each finishing within
# ~128 steps, a new prompt every other step). 512 is vLLM's default largest captured size; a bigger step's device
# time covers its launches. Both bounds wait for a GPU run (docs/BENCHMARKS.md; bench-serve's
# qwen3_accel_eager_chunks contender measures it). Not on the CPU: there the chunk attention's torch reference loops
# over the chunks, a decode's too, and an engine step of 8 decodes and an 8-token prompt on a tiny 36-layer model
# took 24.6 ms through its graph against 21.5 ms eagerly (scripts/host_overhead.py, 2026-12-02).
# And only while every sequence in the step is at most CHUNK_GRAPH_MAX_CONTEXT tokens long: the chunk kernel has no
# split-KV, so a decode over a long context is one program per kv head walking all its keys, where the decode
# kernel of an eager step splits them (1024 tokens: one table width on CUDA, the decode graphs' narrowest).
CHUNK_GRAPH_DEVICES = ("cuda",)
CHUNK_GRAPH_MIN_TOKENS = 16
CHUNK_GRAPH_MAX_TOKENS = 512
CHUNK_GRAPH_MAX_CONTEXT = 1024
# Devices whose engines overlap steps by default (see the module docstring). The host's work per decode step is
# 0.03 / 0.10 / 0.30 ms at 1 / 16 / 64 rows (scripts/host_overhead.py, the model's step left out, CPU, 2026-12-02),
# against bandwidth-bound steps at 64 rows on an H200 of ~3.5 ms for Qwen3-8B (16 GB of weights at 4.8 TB/s) and
# well under 1 ms for Qwen3-0.6B: from a tenth of the step to a third or more, hidden. Not on the CPU: its ops run
# as they are called, so overlap would only hand out every token a step later.
OVERLAP_DEVICES = ("cuda",)


@dataclass
class InFlight:
    """A launched step whose tokens the host has not read: `tokens[i]` is the token picked for `sequences[i]`.

    On CUDA the tokens' copy to the host is queued right behind the step: a plain `.tolist()` later would queue
    behind the next step too, and wait for it."""

    sequences: list[Sequence]
    tokens: torch.Tensor
    rows: dict[int, int] = field(init=False)  # id(sequence) -> its row in `tokens`
    host: torch.Tensor = field(init=False)
    copied: torch.cuda.Event | None = field(init=False, default=None)

    def __post_init__(self):
        self.rows = {id(seq): row for row, seq in enumerate(self.sequences)}
        if self.tokens.is_cuda:
            self.host = self.tokens.to("cpu", non_blocking=True)  # (into pinned memory)
            self.copied = torch.cuda.Event()
            self.copied.record()
        else:
            self.host = self.tokens

    def values(self) -> list[int]:
        """The tokens, once the step has picked them."""
        if self.copied is not None:
            self.copied.synchronize()
        return self.host.tolist()


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list (of lists) as a tensor on `device`, without waiting for the device: on CUDA through pinned
    memory and a copy queued on the stream (`torch.tensor(values, device="cuda")` copies from pageable memory and
    waits for every kernel queued before it, which would undo the overlap)."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def block_tables(chunks: list[Chunk], device: torch.device, width: int | None = None, fill: int = 0,
                 rows: int | None = None) -> torch.Tensor:
    """The chunks' sequences' block tables as one [rows, width] int32 tensor (default: one row per chunk, the
    longest table's width), the rest `fill`. Small tables as one padded list; larger ones filled through a mask
    from one flat list: at 1 x 4 the list took 4 us against 15, at 16 x 64 54 us against 25, at 128 x 64 0.37 ms
    against 0.02-0.08 (CPU, 2026-12-02)."""
    tables = [c.sequence.blocks.table for c in chunks]
    width = width or max(map(len, tables), default=1)
    rows = len(chunks) if rows is None else rows
    if rows * width <= 256:
        padded = [table + [fill] * (width - len(table)) for table in tables] + [[fill] * width] * (rows - len(tables))
        return to_device(padded, torch.int32, device).reshape(rows, width)
    host = torch.full((rows, width), fill, dtype=torch.int32, pin_memory=device.type == "cuda")
    filled = torch.arange(width)[None] < torch.tensor([len(table) for table in tables], dtype=torch.long)[:, None]
    host[: len(tables)][filled] = torch.tensor(list(itertools.chain.from_iterable(tables)), dtype=torch.int32)
    return host.to(device, non_blocking=True)


class PagedKVCache:
    """Per layer keys and values [num_blocks + 1, block_size, kv_heads, head_dim] in the model dtype. The last
    block (`scratch`) belongs to no sequence: the padding rows of a graph-bucketed step write and read there."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (num_blocks + 1, block_size, num_kv_heads, head_dim)
        self.scratch = num_blocks
        with outside_inference_mode():
            self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
            self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        for t in (*self.keys, *self.values):
            torch._dynamo.mark_static_address(t)  # the graphs read the pool in place


def blocks_for_memory(bytes_per_block: int, device: torch.device, fraction: float) -> int:
    """How many blocks `fraction` of the device's free memory holds (a fixed default on the CPU)."""
    if device.type != "cuda":
        return DEFAULT_CPU_BLOCKS
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # cached by the allocator
    return max(1, int(free * fraction) // bytes_per_block)


class Engine:
    """Serves many requests at once on one optimized model (see the module docstring).

    num_blocks: KV blocks in the pool (default: `kv_memory_fraction` of the free device memory; on the CPU 1024);
    block_size: token slots per block; max_batch_tokens: tokens one step computes at most (decodes + prompt
    chunks); max_batch_size: sequences running at once; overlap: launch each step before reading the previous
    one's tokens (see the module docstring; default: on CUDA); chunk_graphs: steps with prompt chunks of up to
    CHUNK_GRAPH_MAX_TOKENS tokens replay a graph per token bucket (default: on CUDA; needs optimize(compile=True)
    and the registered ops, not kernels="torch", whose chunk attention loops over the chunks on the host).
    """

    def __init__(self, model: torch.nn.Module, *, num_blocks: int | None = None, block_size: int = 16,
                 max_batch_tokens: int = 256, max_batch_size: int = 64, kv_memory_fraction: float = 0.5,
                 overlap: bool | None = None, chunk_graphs: bool | None = None):
        acc = getattr(model, "qwen3_accel", None)
        if acc is None:
            raise TypeError("Engine serves a model optimized by qwen3_accel.optimize(model) first")
        acc._ensure_ready()
        self.model, self.acc, self.runner = model, acc, acc.runner
        if acc.tp.world_size > 1:
            raise ValueError("the continuous-batching engine runs on one device in this version")
        shape, dtype = self.runner.weights.shape, model.lm_head.weight.dtype
        bytes_per_block = 2 * shape.num_layers * block_size * shape.num_kv_heads * shape.head_dim * dtype.itemsize
        if num_blocks is None:
            # A share of free memory; the last such pool's size again if it still fits, so that the graphs kept
            # for that pool shape serve this engine too (free memory varies a little from one engine to the next).
            fit = blocks_for_memory(bytes_per_block, self.runner.device, kv_memory_fraction)
            previous = self.runner.default_pool_blocks
            num_blocks = previous if previous is not None and previous <= fit else fit
            self.runner.default_pool_blocks = num_blocks
        self.cache = PagedKVCache(shape.num_layers, num_blocks, block_size, shape.num_kv_heads, shape.head_dim, dtype,
                                  self.runner.device)
        self.block_manager = BlockManager(num_blocks, block_size)
        self.scheduler = Scheduler(self.block_manager, max_batch_tokens, max_batch_size)
        self.max_positions = model.config.max_position_embeddings
        self.requests: dict[str, Sequence] = {}  # the requests not finished yet (a server's never grows)
        self.max_table_blocks = self.block_manager.blocks_for(self.max_positions)
        self.min_table_blocks = MIN_GRAPH_TABLE_BLOCKS.get(self.runner.device.type, 64)
        # One graph per key; off CUDA shared with the model's earlier engines of this pool shape (see
        # ModelRunner.paged_graphs_for); eager with compile=False.
        graphs = self.runner.paged_graphs_for(tuple(self.cache.keys[0].shape))
        self.decode_graphs, self.chunk_graphs = graphs.decode, graphs.chunks
        if chunk_graphs is None:
            chunk_graphs = self.runner.device.type in CHUNK_GRAPH_DEVICES
        self.graph_chunks = chunk_graphs and self.runner.compile and self.runner.kernels.mode != "torch"
        self.warmed = False
        self.overlap = self.runner.device.type in OVERLAP_DEVICES if overlap is None else overlap
        self.in_flight: InFlight | None = None

    # ------------------------------------------------------------------------------------------ requests
    def add_request(self, prompt: list[int], max_new_tokens: int, *, eos_token_id: int | list[int] | None = None,
                    do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                    request_id: str | None = None) -> Sequence:
        """Queue a request; it joins the running batch at the next step with room for it."""
        if request_id is not None and request_id in self.requests:
            raise ValueError(f"request {request_id!r} is already running")
        if len(prompt) + max_new_tokens > self.max_positions:
            raise ValueError(f"prompt + new tokens = {len(prompt) + max_new_tokens} exceeds the model's "
                             f"{self.max_positions} positions")
        eos = () if eos_token_id is None else (eos_token_id,) if isinstance(eos_token_id, int) else eos_token_id
        params = SamplingParams(max_new_tokens, frozenset(eos), do_sample, temperature, top_k, top_p)
        seq = self.scheduler.add(prompt, params, request_id)
        self.requests[seq.request_id] = seq
        return seq

    def cancel(self, request_id: str) -> bool:
        """Stop a request (e.g. its client went away); its blocks are free for the others at once. False when no
        such request is running (unknown, or finished already)."""
        seq = self.requests.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.cancel(seq)
        return True

    def has_work(self) -> bool:
        return self.scheduler.has_work() or self.in_flight is not None

    def generate(self, prompts: list[list[int]], max_new_tokens: int, **settings) -> list[list[int]]:
        """Every prompt's generated tokens (eos included, as HF returns them), in order; a request that failed
        raises after the others finished."""
        seqs = [self.add_request(prompt, max_new_tokens, **settings) for prompt in prompts]
        while self.has_work():
            self.step()
        failed = [seq for seq in seqs if seq.status is Status.FAILED]
        if failed:
            raise RuntimeError(f"{len(failed)} of {len(seqs)} requests failed: {failed[0].error}")
        return [seq.generated for seq in seqs]

    # ---------------------------------------------------------------------------------------------- step
    def step(self) -> list[Sequence]:
        """Run one scheduled step; returns the sequences whose new token the host read in it: this step's, or with
        overlap the step before's (a request the scheduler failed, e.g. one too long for the whole pool, has status
        FAILED and its error). Finished requests leave `requests`."""
        chunks = self.scheduler.schedule()
        launched = self._launch(chunks) if chunks else None  # (reads the step before's tokens on the device)
        stepped = self.drain()  # the step before's, on the host
        self.in_flight = launched
        return stepped if self.overlap else self.drain()

    def drain(self) -> list[Sequence]:
        """Read the step in flight and launch nothing: after it the device runs nothing of this engine's and every
        token picked is in its sequence (a pause, a stop). Returns the sequences that got a token."""
        step, self.in_flight = self.in_flight, None
        stepped = self._read_tokens(step) if step is not None else []
        self._forget_finished()
        return stepped

    def _forget_finished(self) -> None:
        for request_id in [rid for rid, seq in self.requests.items() if seq.finished]:
            del self.requests[request_id]

    def _read_tokens(self, step: InFlight) -> list[Sequence]:
        """Wait for a launched step's tokens; append each to its sequence and finish the ones done (a sequence
        finished or cancelled meanwhile drops its token)."""
        stepped = []
        for seq, token in zip(step.sequences, step.values()):
            if seq.finished:
                continue
            seq.pending -= 1
            seq.generated.append(token)
            stepped.append(seq)
            if token in seq.params.eos_ids or len(seq.generated) >= seq.params.max_new_tokens:
                self.scheduler.finish(seq)
        return stepped

    def _launch(self, chunks: list[Chunk]) -> InFlight | None:
        """Run the step's model call and pick its tokens on the device; the host does not wait for them."""
        with self.acc._lock, torch.no_grad():
            # A weight replaced since optimize is picked up before each sequence starts, as generate() does;
            # checked at every step it cost 0.43 ms on Qwen3-0.6B's 28 layers (CPU), a tenth of a GPU step.
            if self.scheduler.admitted:
                self.acc.check_weights_shared()
            tokens = sum(chunk.end - chunk.start for chunk in chunks)
            table_blocks = max(len(chunk.sequence.blocks.table) for chunk in chunks)
            if tokens == len(chunks):
                logits = self._decode(chunks, table_blocks)
            elif (key := self.chunk_graph_key(tokens, table_blocks)) is not None:
                logits = self._chunks(chunks, key)
            else:  # a step too big for the chunk graphs (or without them): eager
                logits = self.runner.paged_step(self.cache.keys, self.cache.values, self._pack(chunks))
        sampling = [chunk.sequence for chunk in chunks if chunk.samples]
        self.scheduler.completed(chunks)
        if not sampling:
            return None
        for seq in sampling:
            seq.pending += 1
        return InFlight(sampling, self._pick(logits.float(), sampling))

    def _input_tokens(self, chunks: list[Chunk], device: torch.device, pad: int = 0) -> torch.Tensor:
        """The chunks' tokens in one row (then `pad` zeros); a decode after a token still in flight reads it from
        the device."""
        tokens, in_flight = [], []
        for chunk in chunks:
            seq = chunk.sequence
            if seq.pending:  # only a decode's one token can be in flight (the scheduler's invariant)
                in_flight.append((len(tokens), self.in_flight.rows[id(seq)]))
                tokens.append(0)
            else:
                tokens += seq.tokens_between(chunk.start, chunk.end)
        row = to_device(tokens + [0] * pad, torch.long, device)
        if in_flight:
            at, source = to_device(in_flight, torch.long, device).unbind(1)
            row[at] = self.in_flight.tokens[source]
        return row

    def _positions_and_slots(self, chunks: list[Chunk]) -> tuple[list[int], list[int]]:
        """Each token's position and flat cache slot, the chunks' tokens in order."""
        positions, slots = [], []
        for chunk in chunks:
            table = chunk.sequence.blocks
            for position in range(chunk.start, chunk.end):
                positions.append(position)
                slots.append(self.block_manager.slot(table, position))
        return positions, slots

    def _pack(self, chunks: list[Chunk]) -> PagedBatch:
        """An eager step's inputs: one-token chunks (decodes, and a prompt's last token after a shared prefix)
        attend through the paged decode kernel over their sequence's first `end` tokens; longer chunks as prompts."""
        device = self.runner.device
        decodes = [c for c in chunks if c.end - c.start == 1]
        prefills = [c for c in chunks if c.end - c.start > 1]
        positions, slots = self._positions_and_slots(decodes + prefills)
        ends = list(itertools.accumulate((c.end - c.start for c in decodes + prefills)))
        last = {id(chunk): end - 1 for chunk, end in zip(decodes + prefills, ends)}
        logit_index = [last[id(c)] for c in chunks if c.samples]  # in the scheduler's order, as `step` reads them
        starts = list(itertools.accumulate((c.end - c.start for c in prefills), initial=0))
        long, int32 = torch.long, torch.int32
        return PagedBatch(
            self._input_tokens(decodes + prefills, device), to_device(positions, long, device),
            to_device(slots, long, device),
            block_tables(decodes, device), to_device([c.end for c in decodes], int32, device),
            block_tables(prefills, device), to_device(starts, int32, device),
            to_device([c.end for c in prefills], int32, device), to_device(logit_index, long, device),
        )

    def graph_key(self, num_sequences: int, table_blocks: int) -> tuple[int, int]:
        """(rows, table width) of the graph a decode-only step of these sizes replays."""
        rows = min(1 << (num_sequences - 1).bit_length(), max(self.scheduler.max_batch_size, num_sequences))
        return rows, self._table_width(table_blocks)

    def _table_width(self, table_blocks: int) -> int:
        width = max(self.min_table_blocks, 1 << (table_blocks - 1).bit_length())
        return min(width, max(self.max_table_blocks, table_blocks))

    def chunk_graph_key(self, num_tokens: int, table_blocks: int) -> tuple[str, int, int, int] | None:
        """The key (tokens, chunk rows, table width) of the graph a step of `num_tokens` tokens with prompt chunks
        replays, or None when it runs eagerly: chunk graphs off, more tokens than CHUNK_GRAPH_MAX_TOKENS, or a
        sequence longer than CHUNK_GRAPH_MAX_CONTEXT."""
        tokens = max(CHUNK_GRAPH_MIN_TOKENS, 1 << (num_tokens - 1).bit_length())
        too_long = table_blocks * self.block_manager.block_size > CHUNK_GRAPH_MAX_CONTEXT
        if not self.graph_chunks or tokens > CHUNK_GRAPH_MAX_TOKENS or too_long:
            return None
        return "paged chunks", tokens, self.scheduler.max_batch_size, self._table_width(table_blocks)

    def warm_up(self, max_tokens: int = 1) -> None:
        """Once per engine: its graphs (capture_graphs) and one token through it, before requests."""
        if not self.warmed:
            self.capture_graphs(max_tokens)
            self.generate([[0]], max_new_tokens=1)
            self.warmed = True

    def capture_graphs(self, max_tokens: int = 1) -> list[tuple]:
        """Compile (on a GPU: capture) the graph of every decode row bucket up to max_batch_size and of every chunk
        token bucket up to max_batch_tokens, at every table width a sequence of up to `max_tokens` tokens reaches,
        on the scratch block only (no sequence is touched); returns the keys. What serving engines do at start, so
        no request waits for a compilation."""
        if not self.runner.compile:
            return []
        widths = sorted({self._table_width(blocks) for blocks in range(1, self.block_manager.blocks_for(
            max(1, max_tokens)) + 1)})
        rows_buckets = sorted({self.graph_key(n, 1)[0] for n in range(1, self.scheduler.max_batch_size + 1)})
        chunk_keys = sorted({key for n in range(2, self.scheduler.max_batch_tokens + 1) for width in widths
                             if (key := self.chunk_graph_key(n, width)) is not None})
        scratch_slot = self.cache.scratch * self.block_manager.block_size
        device = self.runner.device
        # On CUDA, a reduce-overhead key's first call warms up and the second records its graph.
        calls = 2 if device.type == "cuda" else 1

        def scratch_tables(rows: int, width: int) -> torch.Tensor:
            return torch.full((rows, width), self.cache.scratch, dtype=torch.int32, device=device)

        def fresh(n: int, dtype=torch.long, value=0):  # distinct tensors: aliased inputs are a guard of their own
            return torch.full((n,), value, dtype=dtype, device=device)

        with self.acc._lock, torch.no_grad():
            for width, rows, _ in itertools.product(widths, rows_buckets, range(calls)):
                self.decode_graphs(("paged decode", rows, width), fresh(rows), fresh(rows),
                                   fresh(rows, value=scratch_slot), scratch_tables(rows, width),
                                   fresh(rows, torch.int32, 1), self.cache.keys, self.cache.values)
            for key, _ in itertools.product(chunk_keys, range(calls)):
                _, tokens, rows, width = key  # every chunk empty: the step computes nothing but its shapes
                self.chunk_graphs(key, fresh(tokens), fresh(tokens), fresh(tokens, value=-1),
                                  scratch_tables(rows, width), fresh(rows + 1, torch.int32), fresh(rows, torch.int32),
                                  fresh(rows), self.cache.keys, self.cache.values)
        return [("paged decode", rows, width) for width in widths for rows in rows_buckets] + chunk_keys

    def _decode(self, chunks: list[Chunk], table_blocks: int) -> torch.Tensor:
        """A step of one token per sequence through the graph of its bucket: padding rows attend to, and write
        into, the scratch block only. Logits of the sampling rows, in the chunks' order."""
        scratch = self.cache.scratch
        rows, width = self.graph_key(len(chunks), table_blocks)
        pad = rows - len(chunks)
        positions, slots = self._positions_and_slots(chunks)
        seq_lens = [c.end for c in chunks] + [1] * pad
        device = self.runner.device
        logits = self.decode_graphs(
            ("paged decode", rows, width), self._input_tokens(chunks, device, pad),
            to_device(positions + [0] * pad, torch.long, device),
            to_device(slots + [scratch * self.block_manager.block_size] * pad, torch.long, device),
            block_tables(chunks, device, width, scratch, rows), to_device(seq_lens, torch.int32, device),
            self.cache.keys, self.cache.values)
        return self._sampling_rows(logits, chunks)

    def _sampling_rows(self, logits: torch.Tensor, chunks: list[Chunk]) -> torch.Tensor:
        """The logits of the chunks that sample, from a graph's output whose row i is chunk i's, copied: a graph's
        output is overwritten by its next replay. (A prompt's chunk that does not end it samples nothing.)"""
        sampling = [row for row, chunk in enumerate(chunks) if chunk.samples]
        if len(sampling) == len(chunks):
            return logits[: len(chunks)].clone()
        return logits.index_select(0, to_device(sampling, torch.long, logits.device))

    def _chunks(self, chunks: list[Chunk], key: tuple[str, int, int, int]) -> torch.Tensor:
        """A step with prompt chunks through the graph of its token bucket: every chunk through the chunk kernel,
        the chunks padded to max_batch_size with empty ones (over the scratch block), the tokens with padding that
        no chunk covers and that writes nothing. Logits of the sampling rows, in the chunks' order."""
        _, num_tokens, rows, width = key
        scratch, device = self.cache.scratch, self.runner.device
        positions, slots = self._positions_and_slots(chunks)
        pad = num_tokens - len(positions)
        starts = list(itertools.accumulate((c.end - c.start for c in chunks), initial=0))
        empty = rows - len(chunks)
        long, int32 = torch.long, torch.int32
        logits = self.chunk_graphs(
            key, self._input_tokens(chunks, device, pad), to_device(positions + [0] * pad, long, device),
            to_device(slots + [-1] * pad, long, device), block_tables(chunks, device, width, scratch, rows),
            to_device(starts + [starts[-1]] * empty, int32, device),
            to_device([c.end for c in chunks] + [0] * empty, int32, device),
            to_device([end - 1 for end in starts[1:]] + [0] * empty, long, device), self.cache.keys, self.cache.values)
        return self._sampling_rows(logits, chunks)

    def _pick(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """The next token of each sampling sequence: greedy rows by one argmax, sampled rows with their own
        temperature / top-k / top-p (HF's warpers, as the fast loop applies them), one call per distinct setting
        (a manager's requests share one)."""
        tokens = logits.argmax(dim=-1)
        groups: dict[tuple[float, int, float], list[int]] = {}
        for row, seq in enumerate(seqs):
            p = seq.params
            if p.do_sample:
                groups.setdefault((p.temperature, p.top_k, p.top_p), []).append(row)
        device = logits.device
        for (temperature, top_k, top_p), rows in groups.items():
            index = to_device(rows, torch.long, device)
            settings = (to_device([temperature], torch.float32, device), to_device([top_k], torch.long, device),
                        to_device([top_p], torch.float32, device))
            tokens[index] = select_tokens(logits[index], True, *settings)
        return tokens
