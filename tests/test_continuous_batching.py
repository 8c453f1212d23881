"""HF's continuous-batching API (`generate_batch`, `init_continuous_batching`: what `transformers serve
--continuous-batching` drives) on an optimized model runs our engine (serving/: paged cache, scheduler, our ops):
every request gets HF generate()'s tokens for its prompt alone, whatever the batching, preemption, cancels and
restarts did; what the engine does not implement goes to HF's continuous batching."""

import asyncio
import random
import threading
import time

import pytest
import torch
from transformers import ContinuousBatchingConfig, GenerationConfig
from transformers.generation.continuous_batching import ContinuousBatchingManager, RequestStatus
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper

from conftest import model_pair
from qwen3_accel.compat import CB_PAGE_FIELD
from qwen3_accel.custom_ops import paged_attention
from qwen3_accel.serving import engine as engine_module
from qwen3_accel.serving.manager import BatchingManager

GREEDY = dict(do_sample=False, pad_token_id=0)
# A pool of 512 tokens (32 of our 16-token blocks): too small for every request at once, so some are preempted.
SMALL_POOL = ContinuousBatchingConfig(num_blocks=2, max_batch_tokens=128, **{CB_PAGE_FIELD: 256})


def _prompts(count: int, vocab: int, seed: int, longest: int = 60) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, longest, (count,), generator=g).tolist()
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths]


def _alone(reference, prompt: list[int], new_tokens: int, eos=None) -> list[int]:
    out = reference.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, eos_token_id=eos, **GREEDY)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module", params=["tiny", "tiny-moe"])
def pair(request):
    return model_pair(request.param, compile=False)


@pytest.fixture(params=[False, True], ids=["in-order", "overlap"])
def overlap(request, monkeypatch):
    """The manager's engines read each step's tokens at once (the CPU default) or after launching the next step
    (the CUDA default)."""
    monkeypatch.setattr(engine_module, "OVERLAP_DEVICES", ("cuda", "cpu") if request.param else ())
    return request.param


def _count_calls(monkeypatch, module, name: str) -> list:
    calls, original = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


def test_generate_batch_runs_our_engine_and_gives_hfs_tokens(pair, overlap, monkeypatch):
    """36 prompts of 1-300 tokens, a pool that forces preemption: HF's tokens for each, on our paged ops, and
    none of HF's attention."""
    from transformers.models.qwen3 import modeling_qwen3
    from transformers.models.qwen3_moe import modeling_qwen3_moe

    reference, optimized = pair
    prompts = _prompts(36, reference.config.vocab_size, seed=1, longest=300)
    config = GenerationConfig(max_new_tokens=6, eos_token_id=None, **GREEDY)
    decode_calls = _count_calls(monkeypatch, paged_attention, "paged_decode_attention_reference")
    prefill_calls = _count_calls(monkeypatch, paged_attention, "paged_prefill_attention_reference")
    hf_attention = (_count_calls(monkeypatch, modeling_qwen3.Qwen3Attention, "forward")
                    + _count_calls(monkeypatch, modeling_qwen3_moe.Qwen3MoeAttention, "forward"))
    outputs = optimized.generate_batch(prompts, generation_config=config, continuous_batching_config=SMALL_POOL,
                                       persistent_manager=True)
    manager = optimized.qwen3_accel.kept_manager
    assert isinstance(manager, BatchingManager)
    preemptions = manager.engine.scheduler.preemptions
    assert manager.engine.overlap is overlap
    optimized.destroy_cached_continuous_batching_manager()
    assert list(outputs) == [f"req_{i}" for i in range(len(prompts))]
    assert decode_calls and prefill_calls and not hf_attention
    for prompt, output in zip(prompts, outputs.values()):
        assert output.error is None and output.status == RequestStatus.FINISHED
        assert output.prompt_ids == prompt
        assert output.generated_tokens == _alone(reference, prompt, 6), output.request_id
    assert preemptions > 0, "the pool was meant to be too small for all requests at once"
    ids = torch.tensor([prompts[0]])  # and generate() after it: our own path, HF's tokens
    assert torch.equal(optimized.generate(ids, max_new_tokens=4, **GREEDY),
                       reference.generate(ids, max_new_tokens=4, **GREEDY))


def test_a_randomized_stream_of_adds_cancels_streams_and_restarts(pair, overlap):
    """Requests with their own lengths and eos ids, streaming or not, some cancelled, through two sessions of
    one manager: every request not cancelled ends once with HF's tokens, every stream grows one token at a time
    and is a prefix of its answer, no output carries another request's prompt, and every block comes back."""
    reference, optimized = pair
    rng = random.Random(3)
    vocab = reference.config.vocab_size
    manager = optimized.init_continuous_batching(generation_config=GenerationConfig(eos_token_id=None, **GREEDY),
                                                 continuous_batching_config=SMALL_POOL)
    assert isinstance(manager, BatchingManager)
    requests, cancelled = {}, set()
    for session in range(2):
        manager.start()
        for i in range(20):
            prompt = [rng.randrange(1, vocab) for _ in range(rng.randint(1, 120))]
            new_tokens = rng.randint(1, 10)
            eos = rng.choice([None, _alone(reference, prompt, new_tokens)[rng.randrange(new_tokens)]])
            request_id = manager.add_request(prompt, request_id=f"s{session}-{i}", max_new_tokens=new_tokens,
                                             streaming=rng.random() < 0.5, eos_token_id=eos)
            requests[request_id] = (prompt, new_tokens, eos)
            if rng.random() < 0.2:
                manager.cancel_request(request_id)
                cancelled.add(request_id)
        manager.cancel_request("no-such-request")  # a no-op that harms no other request
        finals, streams = {}, {}
        while len(finals) < 20:  # one final output per request, cancelled ones included
            result = manager.get_result(timeout=120)
            assert result is not None, "a request was lost"
            prompt, new_tokens, eos = requests[result.request_id]
            assert result.prompt_ids == prompt  # never another request's output
            if result.is_finished():
                assert result.request_id not in finals, "two final outputs"
                finals[result.request_id] = result
            else:
                seen = streams.setdefault(result.request_id, [])
                seen.append(list(result.generated_tokens))
                assert len(seen[-1]) == len(seen), "a stream skipped or repeated a token"
        assert manager.get_result(timeout=0.5) is None
        assert not manager._requests, "the loop still tracks requests"
        assert manager.engine.block_manager.num_free == len(manager.engine.block_manager.blocks)
        manager.stop(block=True)
        assert not manager.is_running()
        for request_id, result in finals.items():
            if request_id in cancelled and result.error == "cancelled":
                continue  # (one cancelled after it finished has its whole answer)
            prompt, new_tokens, eos = requests[request_id]
            expected = _alone(reference, prompt, new_tokens, eos)
            assert result.error is None and result.generated_tokens == expected, request_id
            for stream in streams.get(request_id, []):
                assert expected[: len(stream)] == stream
        assert any(finals[r].error == "cancelled" for r in cancelled & set(finals))
    assert manager.engine is None  # stop() released the pool


def test_result_handlers_deliver_on_the_callers_event_loop(pair):
    """`register_result_handler` (what `transformers serve` uses): every token of a streaming request, the last
    output of a plain one, called on the registering asyncio loop."""
    reference, optimized = pair
    manager = optimized.init_continuous_batching(generation_config=GenerationConfig(eos_token_id=None, **GREEDY),
                                                 continuous_batching_config=SMALL_POOL)
    manager.start()

    async def serve(prompt, streaming):
        loop, done, seen = asyncio.get_running_loop(), asyncio.Event(), []

        def on_output(output):
            assert threading.current_thread() is threading.main_thread() and asyncio.get_running_loop() is loop
            seen.append(output)
            if output.is_finished():
                done.set()

        manager.register_result_handler(f"h-{streaming}", on_output)
        manager.add_request(prompt, request_id=f"h-{streaming}", max_new_tokens=5, streaming=streaming)
        await asyncio.wait_for(done.wait(), 120)
        return seen

    async def serve_registering_late(prompt):  # transformers serve's streaming order: add, then register
        done, seen = asyncio.Event(), []
        manager.add_request(prompt, request_id="late", max_new_tokens=5, streaming=True)
        await asyncio.sleep(0.5)  # outputs made before the registration must not be lost
        manager.register_result_handler("late", lambda o: (seen.append(o), o.is_finished() and done.set()))
        await asyncio.wait_for(done.wait(), 120)
        return seen

    try:
        prompt = [5, 6, 7, 8]
        streamed = asyncio.run(serve(prompt, True))
        plain = asyncio.run(serve(prompt, False))
        late = asyncio.run(serve_registering_late(prompt))
    finally:
        manager.stop(block=True)
    expected = _alone(reference, prompt, 5)
    assert [o.generated_tokens for o in streamed] == [expected[: n + 1] for n in range(5)]
    assert [o.status for o in streamed] == [RequestStatus.DECODING] * 4 + [RequestStatus.FINISHED]
    assert len(plain) == 1 and plain[0].generated_tokens == expected
    assert [o.generated_tokens for o in late] == [expected[: n + 1] for n in range(5)]


def test_bad_requests_fail_alone_with_clear_errors(pair, overlap):
    reference, optimized = pair
    positions = reference.config.max_position_embeddings
    manager = optimized.init_continuous_batching(generation_config=GenerationConfig(eos_token_id=None, **GREEDY),
                                                 continuous_batching_config=SMALL_POOL)
    manager.start()
    try:
        bad = {
            manager.add_request([], max_new_tokens=3): "at least one prompt token",
            manager.add_request([1, 2], max_new_tokens=positions): "exceeds the model's",
            manager.add_request(list(range(1, 600)), max_new_tokens=2): "more than the whole pool",
            manager.add_request([1, 2], max_new_tokens=2, repetition_penalty=1.2): "not supported",
        }
        good = manager.add_request([3, 4, 5], max_new_tokens=4)
        results = {}
        while len(results) < 5:
            result = manager.get_result(timeout=120)
            results[result.request_id] = result
        for request_id, message in bad.items():
            assert results[request_id].status == RequestStatus.FAILED and message in results[request_id].error
        assert results[good].error is None and results[good].generated_tokens == _alone(reference, [3, 4, 5], 4)
        # A second manager on the same model serves beside the first (steps take turns on the model).
        other = optimized.init_continuous_batching(generation_config=GenerationConfig(eos_token_id=None, **GREEDY),
                                                   continuous_batching_config=SMALL_POOL)
        other.start()
        first, second = manager.add_request([9, 8, 7], max_new_tokens=3), other.add_request([7, 8], max_new_tokens=3)
        assert next(manager.request_id_iter(first)).generated_tokens == _alone(reference, [9, 8, 7], 3)
        assert next(other.request_id_iter(second)).generated_tokens == _alone(reference, [7, 8], 3)
        other.stop(block=True)
        # stop() while requests run: answered first (HF's flush), or failed with a reason (hard_stop).
        ids = [manager.add_request([i + 1] * 20, max_new_tokens=8) for i in range(6)]
        manager.stop(block=True, timeout=120, keep_for_next_session=True)
        flushed = [manager.get_result(timeout=1) for _ in ids]
        assert all(r.error is None and len(r.generated_tokens) == 8 for r in flushed)
        manager.start()
        ids = [manager.add_request([i + 1] * 20, max_new_tokens=40) for i in range(6)]
        manager.stop(block=True, timeout=120, hard_stop=True, keep_for_next_session=True)
        stopped = [manager.get_result(timeout=1) for _ in ids]
        assert all(r.status == RequestStatus.FAILED and "stopped" in r.error for r in stopped)
        engine = manager.engine  # kept, and empty: nothing runs on for a request that was failed
        assert not engine.has_work() and engine.block_manager.num_free == len(engine.block_manager.blocks)
        assert manager.add_request([1], max_new_tokens=1) is None  # not accepted by a stopped manager
    finally:
        manager.stop(block=True)
    with pytest.raises(ValueError, match="top_p"):
        optimized.init_continuous_batching(generation_config=GenerationConfig(do_sample=True, top_p=1.5))


def test_sampled_requests_follow_hfs_distribution(pair):
    """The first token of 3000 sampled requests (temperature 1.5, top-k 6) against the distribution HF's warpers
    give the reference model's logits (chi-square)."""
    reference, optimized = pair
    prompt = [11, 12, 13]
    logits = reference(torch.tensor([prompt])).logits[:, -1].float()
    scores = TopKLogitsWarper(6)(None, TemperatureLogitsWarper(1.5)(None, logits))
    expected = scores.softmax(dim=-1)[0].double()
    config = GenerationConfig(do_sample=True, temperature=1.5, top_k=6, top_p=1.0, eos_token_id=None,
                              pad_token_id=0)
    torch.manual_seed(0)
    draws = 3000
    outputs = optimized.generate_batch([prompt] * draws, generation_config=config, max_new_tokens=1,
                                       continuous_batching_config=SMALL_POOL)
    counts = torch.bincount(torch.tensor([o.generated_tokens[0] for o in outputs.values()]),
                            minlength=expected.numel()).double()
    kept = expected > 0
    assert (counts[~kept] == 0).all(), "a token outside the top-k was drawn"
    chi2 = ((counts[kept] - draws * expected[kept]) ** 2 / (draws * expected[kept])).sum().item()
    dof = int(kept.sum()) - 1
    assert chi2 < dof + 6 * (2 * dof) ** 0.5 + 10, f"chi-square {chi2:.1f} with {dof} degrees of freedom"


def test_settings_our_engine_does_not_implement_go_to_hfs(pair):
    """A repetition penalty: HF's own continuous batching serves it (its tokens, as on the plain model), and our
    attention is back once it stops."""
    reference, optimized = pair
    config = GenerationConfig(max_new_tokens=5, eos_token_id=None, repetition_penalty=1.3, **GREEDY)
    prompts = _prompts(4, reference.config.vocab_size, seed=4)
    manager = optimized.init_continuous_batching(generation_config=config, continuous_batching_config=SMALL_POOL)
    assert isinstance(manager, ContinuousBatchingManager)
    manager.start()
    manager.stop(block=True)
    pool = ContinuousBatchingConfig(num_blocks=8, max_batch_tokens=128, **{CB_PAGE_FIELD: 256})
    ours = optimized.generate_batch(prompts, generation_config=config, continuous_batching_config=pool)
    plain = reference.generate_batch(prompts, generation_config=config, continuous_batching_config=pool)
    assert [o.generated_tokens for o in ours.values()] == [o.generated_tokens for o in plain.values()]
    assert optimized.config._attn_implementation == "qwen3_accel"


def test_generate_batch_on_a_compiled_model_replays_decode_graphs():
    """optimize()'s default compile=True: the loop thread compiles and replays the engine's decode graphs."""
    reference, optimized = model_pair("tiny")
    prompts = _prompts(6, reference.config.vocab_size, seed=5)
    config = GenerationConfig(max_new_tokens=5, eos_token_id=None, **GREEDY)
    outputs = optimized.generate_batch(prompts, generation_config=config, continuous_batching_config=SMALL_POOL,
                                       persistent_manager=True)
    graphs = optimized.qwen3_accel.kept_manager.engine.decode_graphs
    optimized.destroy_cached_continuous_batching_manager()
    assert [o.generated_tokens for o in outputs.values()] == [_alone(reference, p, 5) for p in prompts]
    assert graphs.compiled and not graphs.eager_keys
    assert max(graphs.calls.values()) > 1, "the warm-up compiled the graphs, but no request step replayed one"


def test_cancel_mid_decode_pause_and_ids(pair, overlap):
    """A request paused while it decodes finds no step of ours in flight (with overlap the loop reads it before
    granting the pause, so the model can be changed in place) and goes on after; cancelled, it ends FAILED
    "cancelled" with a prefix of HF's tokens and frees its blocks; ids in flight are unique; pause() holds the loop
    (from two threads) and stop() inside it is refused; after stop, request_id_iter hands over what is left of
    that request and ends."""
    reference, optimized = pair
    manager = optimized.init_continuous_batching(generation_config=GenerationConfig(eos_token_id=None, **GREEDY),
                                                 continuous_batching_config=SMALL_POOL)
    manager.start()
    try:
        prompt = [4, 8, 15, 16, 23, 42]
        long = manager.add_request(prompt, max_new_tokens=400, streaming=True)
        with pytest.raises(ValueError, match="unique"):
            manager.add_request([1, 2], request_id=long, max_new_tokens=2)
        stream = manager.request_id_iter(long)
        seen = [next(stream) for _ in range(3)]
        for _ in range(3):
            with manager.pause():
                engine = manager.engine
                seq = engine.requests[long]
                assert engine.in_flight is None and seq.pending == 0
                held = len(seq.generated)
                time.sleep(0.05)
                assert len(seq.generated) == held  # the loop waits
        while len(next(stream).generated_tokens) <= held:  # it goes on
            pass
        manager.cancel_request(long)
        final = [o for o in stream][-1]
        assert final.status == RequestStatus.FAILED and final.error == "cancelled"
        assert held < len(final.generated_tokens) < 400
        assert final.generated_tokens == _alone(reference, prompt, len(final.generated_tokens))
        assert [o.generated_tokens for o in seen] == [final.generated_tokens[: n + 1] for n in range(3)]
        blocks = manager.engine.block_manager
        assert blocks.num_free == len(blocks.blocks)
        with manager.pause():
            entered = threading.Event()

            def pause_too():
                with manager.pause():
                    entered.set()

            other = threading.Thread(target=pause_too)
            other.start()
            assert entered.wait(10)  # two holders at once
            other.join()
            held = manager.add_request([3, 1, 4], max_new_tokens=2)
            assert manager.get_result(held, timeout=1) is None  # the loop waits while the pause is held
            with pytest.raises(RuntimeError, match="inside a pause"):
                manager.stop()
        assert next(manager.request_id_iter(held)).generated_tokens == _alone(reference, [3, 1, 4], 2)
        first, second = (manager.add_request(p, max_new_tokens=3) for p in ([9, 9], [8, 8]))
    finally:
        manager.stop(block=True)
    assert [o.request_id for o in manager.request_id_iter(second)] == [second]  # ends, does not spin
    assert [o.request_id for o in manager.request_id_iter(first)] == [first]


def test_stop_releases_the_pool_and_a_failed_step_recovers(pair, monkeypatch):
    """A step that raises fails the requests in it and the loop goes on with a fresh engine of the same size; stop()
    without keep_for_next_session lets the pool go (nothing of ours holds the engine any more)."""
    import gc
    import weakref

    from qwen3_accel.serving.engine import Engine

    reference, optimized = pair
    manager = optimized.init_continuous_batching(generation_config=GenerationConfig(eos_token_id=None, **GREEDY),
                                                 continuous_batching_config=SMALL_POOL)
    manager.start()
    first_engine = weakref.ref(manager.engine)
    size = len(manager.engine.block_manager.blocks)
    original = Engine.step
    monkeypatch.setattr(Engine, "step", lambda self: (_ for _ in ()).throw(RuntimeError("planted")))
    failed = manager.add_request([1, 2, 3], max_new_tokens=3)
    result = next(manager.request_id_iter(failed))
    assert result.status == RequestStatus.FAILED and "planted" in result.error
    monkeypatch.setattr(Engine, "step", original)
    good = manager.add_request([1, 2, 3], max_new_tokens=3)
    assert next(manager.request_id_iter(good)).generated_tokens == _alone(reference, [1, 2, 3], 3)
    gc.collect()
    assert first_engine() is None and len(manager.engine.block_manager.blocks) == size  # replaced, same size
    engine = weakref.ref(manager.engine)
    manager.stop(block=True)
    gc.collect()
    assert engine() is None and manager.engine is None
