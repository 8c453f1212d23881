"""The continuous-batching engine (serving/): many requests at once on our kernels give HF's greedy tokens for each,
whatever the batching, chunking, prefix sharing and preemption did."""

import random

import pytest
import torch

from conftest import model_pair
from qwen3_accel.serving.engine import Engine
from qwen3_accel.serving.scheduler import Status


def hf_tokens(reference, prompt, max_new_tokens, eos_token_id=None):
    ids = torch.tensor([prompt])
    out = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=0, eos_token_id=eos_token_id)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module", params=["tiny", "tiny-moe"])
def pair(request):
    return model_pair(request.param, compile=False)


@pytest.fixture(params=[False, True], ids=["in-order", "overlap"])
def overlap(request):
    """Each step's tokens read at once, or (the CUDA default) after the next step is launched."""
    return request.param


def test_many_prompts_with_preemption_equal_hf(pair, overlap):
    """36 prompts of 1-300 tokens (a shared system prompt in some) through a pool too small for all of them:
    prompts are chunked, blocks shared, sequences preempted and recomputed; every output is HF's."""
    reference, optimized = pair
    rng = random.Random(0)
    system = [rng.randrange(3, 500) for _ in range(40)]
    prompts = [([] if i % 3 else system) + [rng.randrange(3, 500) for _ in range(rng.randint(1, 260))]
               for i in range(36)]
    prompts[0] = [7]  # one token
    engine = Engine(optimized, num_blocks=32, block_size=16, max_batch_tokens=128, max_batch_size=16, overlap=overlap)
    seqs = [engine.add_request(p, 16) for p in prompts]
    while engine.has_work():
        engine.step()
    assert [s.generated for s in seqs] == [hf_tokens(reference, p, 16) for p in prompts]
    assert not engine.requests  # finished requests are forgotten
    assert sum(s.preemptions for s in seqs) > 0, "the pool was meant to be too small to run every request at once"
    assert engine.block_manager.num_free == 32  # every block back


def test_eos_stops_a_request_where_hf_stops(pair, overlap):
    reference, optimized = pair
    prompt = [5, 9, 13, 2, 77]
    free_run = hf_tokens(reference, prompt, 12)
    eos = free_run[4]
    expected = hf_tokens(reference, prompt, 12, eos_token_id=eos)
    engine = Engine(optimized, num_blocks=16, block_size=16, overlap=overlap)
    (out,) = engine.generate([prompt], max_new_tokens=12, eos_token_id=eos)
    assert out == expected and out[-1] == eos


def test_overlap_reads_each_token_a_step_late_and_drops_the_one_after_eos(pair):
    """With overlap a step's token reaches the host after the next step is launched (that step read it on the
    device); a request that stops at eos computed one token too many, which nobody sees; a request cancelled with a
    token in flight gets no more tokens; the pool ends whole."""
    reference, optimized = pair
    prompt = [5, 9, 13, 2, 77]
    eos = hf_tokens(reference, prompt, 12)[3]
    expected = hf_tokens(reference, prompt, 12, eos_token_id=eos)
    engine = Engine(optimized, num_blocks=16, block_size=16, overlap=True)
    seq = engine.add_request(prompt, 12, eos_token_id=eos)
    cancelled = engine.add_request([7, 8, 9], 12)
    assert engine.step() == [] and seq.pending == 1 and seq.generated == []  # the prompts; their tokens in flight
    assert engine.step() == [seq, cancelled] and seq.pending == 1 and len(seq.generated) == 1
    engine.cancel(cancelled.request_id)
    seen = list(cancelled.generated)
    steps = 2
    while engine.has_work():
        stepped = engine.step()
        steps += 1
        assert cancelled not in stepped
    assert seq.generated == expected and seq.generated[-1] == eos and cancelled.generated == seen
    assert steps == len(expected) + 2  # the prompt's, one per token, and the last: it read the dropped token
    assert engine.in_flight is None and seq.pending == 0
    assert engine.block_manager.num_free == 16 and not engine.requests


def test_overlap_preempts_a_sequence_whose_last_token_is_in_flight(pair):
    """Two blocks for two requests. The first's first decode needs a second block: it waits one step while its
    token is in flight (it might be an eos), then preempts the second, whose last token is in flight by then; that
    token is read and finishes the second in the queue (no restart), and the first runs on with HF's tokens."""
    reference, optimized = pair
    first, second = list(range(20, 36)), [5, 9, 13, 2, 77]  # 16 tokens: its next token needs a second block
    engine = Engine(optimized, num_blocks=2, block_size=16, overlap=True)
    a, b = engine.add_request(first, 3), engine.add_request(second, 2)
    engine.step()  # both prompts; their tokens in flight
    engine.step()  # a waits for its token; b decodes its last token
    assert a.pending == 0 and b.pending == 1 and b.preemptions == 0
    engine.step()  # a's decode takes b's block: b preempted; b's last token is read and finishes it
    assert b.preemptions == 1 and b.status is Status.FINISHED and b not in engine.scheduler.waiting
    while engine.has_work():
        engine.step()
    assert a.generated == hf_tokens(reference, first, 3) and b.generated == hf_tokens(reference, second, 2)
    assert engine.block_manager.num_free == 2


def test_an_eos_at_a_block_boundary_neither_fails_nor_preempts(pair, overlap):
    """A request whose eos is its 17th token (the first of a second block): with that eos still in flight its next
    decode would need a block. Alone on a one-block pool it finishes at the eos (not "too long for the pool"); beside
    another request on two blocks, neither is preempted: as in order, where the eos is read first."""
    reference, optimized = pair
    rng = random.Random(5)
    for _ in range(50):  # a prompt whose 7th greedy token appears there first: an eos that stops it there
        prompt = [rng.randrange(3, 500) for _ in range(10)]
        free_run = hf_tokens(reference, prompt, 7)
        if free_run[6] not in free_run[:6]:
            break
    eos = free_run[6]
    alone = Engine(optimized, num_blocks=1, block_size=16, overlap=overlap)
    seq = alone.add_request(prompt, 10, eos_token_id=eos)
    while alone.has_work():
        alone.step()
    assert seq.status is Status.FINISHED and seq.generated == free_run
    engine = Engine(optimized, num_blocks=2, block_size=16, overlap=overlap)
    seq, other = engine.add_request(prompt, 10, eos_token_id=eos), engine.add_request([3, 4, 5], 10)
    while engine.has_work():
        engine.step()
    assert seq.generated == free_run and other.generated == hf_tokens(reference, [3, 4, 5], 10)
    assert seq.preemptions == other.preemptions == 0


def test_a_request_too_long_for_the_pool_fails_alone(pair):
    reference, optimized = pair
    engine = Engine(optimized, num_blocks=4, block_size=16, max_batch_tokens=64)  # 64 slots in all
    short = engine.add_request([3, 4, 5], max_new_tokens=4)
    long = engine.add_request(list(range(3, 83)), max_new_tokens=4)  # 80 prompt tokens: never fits
    while engine.has_work():
        engine.step()
    assert long.status is Status.FAILED and "more than the whole pool" in long.error
    assert short.status is Status.FINISHED and short.generated == hf_tokens(reference, [3, 4, 5], 4)
    with pytest.raises(RuntimeError, match="1 of 2 requests failed"):
        engine.generate([[3, 4], list(range(3, 83))], max_new_tokens=2)


def test_random_stream_of_adds_cancels_and_steps(pair, overlap):
    """Requests join and leave (cancelled mid-prompt or mid-decode) between steps; the ones that finish have HF's
    tokens, cancelled ones free their blocks, and the pool ends empty."""
    reference, optimized = pair
    rng = random.Random(1)
    engine = Engine(optimized, num_blocks=20, block_size=16, max_batch_tokens=48, max_batch_size=6, overlap=overlap)
    live, done = [], []
    for step in range(120):
        if rng.random() < 0.3:
            prompt = [rng.randrange(3, 500) for _ in range(rng.randint(1, 90))]
            live.append((engine.add_request(prompt, max_new_tokens=rng.randint(1, 8)), prompt))
        if live and rng.random() < 0.08:
            seq, _ = live.pop(rng.randrange(len(live)))
            engine.cancel(seq.request_id)
            assert seq.status is Status.FAILED and seq.blocks is None
        engine.step()
        done += [(s, p) for s, p in live if s.finished]
        live = [(s, p) for s, p in live if not s.finished]
    while engine.has_work():
        engine.step()
    done += live
    assert len(done) > 10
    for seq, prompt in done:
        assert seq.status is Status.FINISHED
        assert seq.generated == hf_tokens(reference, prompt, seq.params.max_new_tokens)
    assert engine.block_manager.num_free == 20


def test_bad_requests_are_clear_errors(pair):
    _, optimized = pair
    engine = Engine(optimized, num_blocks=4)
    with pytest.raises(ValueError, match="at least one prompt token"):
        engine.add_request([], max_new_tokens=3)
    with pytest.raises(ValueError, match="at least one token"):
        engine.add_request([1], max_new_tokens=0)
    with pytest.raises(ValueError, match="exceeds the model's"):
        engine.add_request([1] * 10, max_new_tokens=optimized.config.max_position_embeddings)
    with pytest.raises(TypeError, match="optimize"):
        Engine(torch.nn.Linear(2, 2))


def test_the_triton_paged_kernels_serve_the_engine():
    """The engine on the Triton kernels (interpreted): paged K/V stores, decode and prefill attention over blocks,
    chunked and preempted prompts; HF's greedy tokens."""
    reference, optimized = model_pair("tiny", compile=False, kernels="triton")
    rng = random.Random(2)
    prompts = [[rng.randrange(3, 500) for _ in range(rng.randint(1, 70))] for _ in range(6)]
    engine = Engine(optimized, num_blocks=10, block_size=16, max_batch_tokens=48, max_batch_size=4)
    seqs = [engine.add_request(p, 8) for p in prompts]
    while engine.has_work():
        engine.step()
    assert [s.generated for s in seqs] == [hf_tokens(reference, p, 8) for p in prompts]
    assert sum(s.preemptions for s in seqs) > 0


def test_decode_steps_replay_one_graph_per_bucket(overlap):
    """optimize(compile=True): decode-only steps run compiled, one graph per (row bucket, table width) key and
    no recompile, while sequences finish (4 -> 3 -> 1 rows) and one grows past 64 blocks; HF's tokens."""
    reference, optimized = model_pair("tiny")
    engine = Engine(optimized, num_blocks=128, block_size=16, max_batch_tokens=2048, max_batch_size=8, overlap=overlap)
    rng = random.Random(4)
    prompts = [[rng.randrange(3, 500) for _ in range(n)] for n in (5, 9, 17, 1020)]
    with torch._dynamo.config.patch(error_on_recompile=True):
        seqs = [engine.add_request(p, n) for p, n in zip(prompts, (2, 6, 6, 8))]
        while engine.has_work():
            engine.step()
    assert [s.generated for s in seqs] == [hf_tokens(reference, p, s.params.max_new_tokens)
                                           for p, s in zip(prompts, seqs)]
    graphs = engine.decode_graphs
    assert not graphs.eager_keys
    # 4 rows at width 64; the long one passes 1024 tokens (65 blocks: width 128) with 3 rows left (bucket 4);
    # then it decodes alone. Each key compiled once.
    assert set(graphs.compiled) == {("paged decode", 4, 64), ("paged decode", 4, 128), ("paged decode", 1, 128)}


@pytest.mark.parametrize("name", ["tiny", "tiny-moe"])
def test_steps_with_prompt_chunks_replay_one_graph_per_token_bucket(monkeypatch, name, overlap):
    """Chunk graphs on (the CUDA default; on the CPU when asked): requests arriving while others decode make steps of
    prompt chunks beside decodes, some sharing a system prompt (a one-token chunk after the shared blocks); each
    runs the graph of its token bucket (every chunk through the chunk kernel, padded to the bucket) with no
    recompile, steps over the largest graphed bucket or with a sequence over the context bound run eagerly, and
    every output is HF's; dense and MoE (padding tokens go through the experts too)."""
    from qwen3_accel.serving import engine as engine_module

    monkeypatch.setattr(engine_module, "CHUNK_GRAPH_MAX_TOKENS", 32)
    monkeypatch.setattr(engine_module, "CHUNK_GRAPH_MAX_CONTEXT", 64)  # 4 blocks: width 8 runs eagerly
    reference, optimized = model_pair(name)
    engine = Engine(optimized, num_blocks=64, block_size=16, max_batch_tokens=48, max_batch_size=8, overlap=overlap,
                    chunk_graphs=True)
    eager = []
    pack = engine._pack
    monkeypatch.setattr(engine, "_pack", lambda chunks: eager.append(len(chunks)) or pack(chunks))
    rng = random.Random(5)
    system = [rng.randrange(3, 500) for _ in range(32)]
    prompts = [system + [rng.randrange(3, 500) for _ in range(n)] if n % 2 else [rng.randrange(3, 500)
               for _ in range(n)] for n in (3, 40, 7, 1, 20, 9, 33, 2)]
    arrivals = {0: prompts[:2], 3: prompts[2:5], 6: prompts[5:7], 9: prompts[7:]}  # at these steps
    seqs, step = [], 0
    with torch._dynamo.config.patch(error_on_recompile=True):
        while step in arrivals or engine.has_work():
            seqs += [engine.add_request(p, 6) for p in arrivals.get(step, [])]
            engine.step()
            step += 1
    assert [s.generated for s in seqs] == [hf_tokens(reference, p, 6) for p in prompts]
    graphs = engine.chunk_graphs
    assert not graphs.eager_keys and graphs.calls and eager, "both graphed and eager chunk steps"
    assert set(graphs.compiled) <= {("paged chunks", tokens, 8, 4) for tokens in (16, 32)}
    assert engine.block_manager.num_free == 64


def test_captured_graphs_serve_later_steps_without_compiling():
    """capture_graphs (the manager's warmup) compiles every row bucket at every width a sequence of the
    given length reaches, on the scratch block only: later steps replay them, the pool untouched by it."""
    reference, optimized = model_pair("tiny")
    engine = Engine(optimized, num_blocks=64, block_size=16, max_batch_tokens=256, max_batch_size=8)
    keys = engine.capture_graphs(max_tokens=100)  # 7 blocks: widths 4 and 8 on the CPU
    assert set(keys) == {("paged decode", rows, width) for rows in (1, 2, 4, 8) for width in (4, 8)}
    assert engine.graph_chunks is False  # off on the CPU (see the test above with them on)
    assert engine.block_manager.num_free == 64 and not engine.requests
    prompts = [[3 + i, 7, 11] * 10 for i in range(5)]
    with torch._dynamo.config.patch(error_on_recompile=True):
        outputs = engine.generate(prompts, max_new_tokens=20)
    assert outputs == [hf_tokens(reference, p, 20) for p in prompts]
    assert set(engine.decode_graphs.compiled) == set(keys)  # nothing compiled after the capture
    # With chunk graphs (another pool shape: graphs of its own), the capture covers the steps with prompt chunks too.
    engine = Engine(optimized, num_blocks=32, block_size=16, max_batch_tokens=64, max_batch_size=4, chunk_graphs=True)
    keys = engine.capture_graphs(max_tokens=100)
    chunk_keys = {("paged chunks", tokens, 4, width) for tokens in (16, 32, 64) for width in (4, 8)}
    assert set(keys) == {("paged decode", rows, width) for rows in (1, 2, 4) for width in (4, 8)} | chunk_keys
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert engine.generate(prompts[:3], max_new_tokens=20) == [hf_tokens(reference, p, 20) for p in prompts[:3]]
    assert set(engine.chunk_graphs.compiled) == chunk_keys and sum(engine.chunk_graphs.calls.values()) > 6


def test_a_later_engine_of_the_same_pool_shape_compiles_nothing():
    """Each HF generate_batch builds an engine: the model's decode graphs for that pool shape are kept, so the
    next engine replays them (on CUDA re-recorded over its own pool) instead of compiling again."""
    reference, optimized = model_pair("tiny")
    prompts = [[5, 6, 7], [8, 9]]
    first = Engine(optimized, num_blocks=32, max_batch_size=4)
    first.generate(prompts, max_new_tokens=6)
    compiled = set(first.decode_graphs.compiled)
    del first
    second = Engine(optimized, num_blocks=32, max_batch_size=4)
    with torch._dynamo.config.patch(error_on_recompile=True):
        outputs = second.generate(prompts, max_new_tokens=6)
    assert outputs == [hf_tokens(reference, p, 6) for p in prompts]
    assert set(second.decode_graphs.compiled) == compiled
    assert Engine(optimized, num_blocks=16).decode_graphs is not second.decode_graphs  # another shape: its own


def test_a_weight_replaced_between_requests_is_picked_up():
    """Replacing an HF parameter after optimize (as a user loading an adapter would): the next request the engine
    admits runs on the new weight, as generate() would."""
    reference, optimized = model_pair("tiny", compile=False)
    engine = Engine(optimized, num_blocks=32)
    prompt = [5, 6, 7, 8]
    assert engine.generate([prompt], max_new_tokens=6) == [hf_tokens(reference, prompt, 6)]
    new = torch.randn_like(reference.model.layers[0].self_attn.o_proj.weight) * 0.2
    for model in (reference, optimized):
        model.model.layers[0].self_attn.o_proj.weight = torch.nn.Parameter(new.clone(), requires_grad=False)
    changed = hf_tokens(reference, prompt, 6)
    assert engine.generate([prompt], max_new_tokens=6) == [changed]


def test_pools_sized_by_free_memory_keep_one_shape_and_few_graph_sets(monkeypatch):
    """Engines sized by free memory reuse the last such pool's size when it fits (so its graphs serve them), and
    the model keeps the decode graphs of two pool shapes at most."""
    from qwen3_accel.runner import PAGED_GRAPH_POOLS

    from qwen3_accel.serving import engine as engine_module

    _, optimized = model_pair("tiny", compile=False)
    runner = optimized.qwen3_accel.runner
    sizes = []
    for free_blocks in (100, 104, 97):  # what free memory would hold at each engine's start
        monkeypatch.setattr(engine_module, "blocks_for_memory", lambda *args, n=free_blocks: n)
        sizes.append(len(Engine(optimized).block_manager.blocks))
    assert sizes == [100, 100, 97]  # the last size while it fits; less when memory got short
    first, second = Engine(optimized), Engine(optimized)
    assert first.decode_graphs is second.decode_graphs
    for blocks in (8, 16, 24):
        Engine(optimized, num_blocks=blocks)
    assert len(runner.paged_graphs) == PAGED_GRAPH_POOLS


@pytest.mark.parametrize("rows,width", [(3, 4), (3, 128), (128, 64)], ids=["list", "mask-wide", "mask-many-rows"])
def test_block_tables_pad_every_row_with_fill(rows, width):
    """The engine's block tables, built as a padded list (small) or through a mask (large): each chunk's table,
    then `fill` to the width, and rows past the chunks all `fill`."""
    from types import SimpleNamespace

    from qwen3_accel.serving.engine import block_tables

    tables = [[5], [1, 2, 3], []]
    chunks = [SimpleNamespace(sequence=SimpleNamespace(blocks=SimpleNamespace(table=t))) for t in tables]
    out = block_tables(chunks, torch.device("cpu"), width, fill=7, rows=rows)
    expected = torch.full((rows, width), 7, dtype=torch.int32)
    for row, table in enumerate(tables):
        expected[row, : len(table)] = torch.tensor(table, dtype=torch.int32)
    assert out.dtype == torch.int32 and torch.equal(out, expected)
