"""The device-side decode loop behind generate(): same tokens as HF's loop, HF's sampling distribution."""

import logging

import pytest
import torch
from torch._dynamo.utils import counters
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from conftest import CollectStreamer, generate_without_recompiles, left_padded_batch, model_pair
from qwen3_accel.fast_generate import select_tokens
from qwen3_accel.router import fast_path_reason

GREEDY = dict(do_sample=False, pad_token_id=0)


@pytest.fixture(scope="module")
def pair():
    return model_pair("tiny", compile=False)


def _eos_hit_early(reference, ids, mask):
    free_run = reference.generate(ids, attention_mask=mask, max_new_tokens=20, **GREEDY)
    return int(free_run[0, ids.shape[1] + 1])  # the first row emits it at its second step


@pytest.mark.parametrize("lengths", [[7], [9, 4, 6]], ids=["batch1", "batch3-left-padded"])
def test_greedy_equals_hf_loop_with_early_eos(pair, lengths):
    reference, optimized = pair
    ids, mask = left_padded_batch(lengths, 512, seed=21)
    eos = _eos_hit_early(reference, ids, mask)
    for max_new in (20, 5, 1):
        kwargs = dict(attention_mask=mask, max_new_tokens=max_new, eos_token_id=eos, **GREEDY)
        expected = reference.generate(ids, **kwargs)
        assert torch.equal(optimized.generate(ids, **kwargs), expected), max_new
        if len(lengths) == 1 and max_new > 2:
            assert expected.shape[1] == ids.shape[1] + 2  # HF stopped at the eos, and so did we


def test_all_rows_finishing_stops_early(pair):
    reference, optimized = pair
    ids, mask = left_padded_batch([8, 8], 512, seed=3)
    free_run = reference.generate(ids, attention_mask=mask, max_new_tokens=12, **GREEDY)
    eos = free_run[:, ids.shape[1] + 2].tolist()  # each row emits one of these by its third step
    kwargs = dict(attention_mask=mask, max_new_tokens=30, eos_token_id=eos, **GREEDY)
    expected = reference.generate(ids, **kwargs)
    assert expected.shape[1] < ids.shape[1] + 30
    assert torch.equal(optimized.generate(ids, **kwargs), expected)


def test_top_k_1_sampling_is_greedy(pair):
    _, optimized = pair
    ids, mask = left_padded_batch([5, 9], 512, seed=8)
    greedy = optimized.generate(ids, attention_mask=mask, max_new_tokens=10, **GREEDY)
    sampled = optimized.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=True, top_k=1,
                                 temperature=0.7, pad_token_id=0)
    assert torch.equal(sampled, greedy)


def test_seeded_sampling_is_reproducible(pair):
    _, optimized = pair
    ids, mask = left_padded_batch([5, 9], 512, seed=8)
    kwargs = dict(attention_mask=mask, max_new_tokens=16, do_sample=True, temperature=1.3, top_p=0.95,
                  pad_token_id=0)
    torch.manual_seed(7)
    first = optimized.generate(ids, **kwargs)
    torch.manual_seed(7)
    assert torch.equal(optimized.generate(ids, **kwargs), first)
    torch.manual_seed(8)
    assert not torch.equal(optimized.generate(ids, **kwargs), first)


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 0.8), (1.5, 5, 1.0), (1.0, 0, 1.0)])
def test_sampling_follows_hf_warpers(temperature, top_k, top_p):
    """Frequencies of 40k draws over 8 tokens match the distribution HF's warpers define (chi-square)."""
    logits = torch.tensor([[2.0, 1.5, 1.2, 0.3, 0.0, -0.5, -1.0, -3.0]])
    scores = logits.clone()
    for warper in (TemperatureLogitsWarper(temperature), TopKLogitsWarper(top_k) if top_k else None,
                   TopPLogitsWarper(top_p) if top_p < 1 else None):
        if warper is not None:
            scores = warper(None, scores)
    expected = scores.softmax(dim=-1)[0]
    torch.manual_seed(0)
    draws = 40_000
    settings = (torch.tensor([temperature]), torch.tensor([top_k]), torch.tensor([top_p]))
    tokens = select_tokens(logits.expand(draws, -1), True, *settings)
    counts = torch.bincount(tokens, minlength=8).double()
    assert (counts[expected == 0] == 0).all(), "a token outside top-k / top-p was drawn"
    kept = expected > 0
    chi2 = ((counts[kept] - draws * expected[kept]) ** 2 / (draws * expected[kept])).sum().item()
    dof = int(kept.sum()) - 1
    assert chi2 < dof + 6 * (2 * dof) ** 0.5 + 10, f"chi-square {chi2:.1f} with {dof} degrees of freedom"




def test_streamer_receives_what_hf_streams(pair):
    reference, optimized = pair
    ids, mask = left_padded_batch([6], 512, seed=5)
    eos = _eos_hit_early(reference, ids, mask)
    ours, theirs = CollectStreamer(), CollectStreamer()
    kwargs = dict(attention_mask=mask, max_new_tokens=12, eos_token_id=eos, **GREEDY)
    out = optimized.generate(ids, streamer=ours, **kwargs)
    assert torch.equal(out, reference.generate(ids, streamer=theirs, **kwargs))
    assert len(ours.chunks) == len(theirs.chunks) and ours.ended
    for a, b in zip(ours.chunks, theirs.chunks):
        assert torch.equal(a.reshape(-1), b.reshape(-1))


def test_uncovered_requests_fall_back_to_hf_loop(pair, caplog):
    reference, optimized = pair
    ids, mask = left_padded_batch([6, 8], 512, seed=6)
    kwargs = dict(attention_mask=mask, max_new_tokens=8, repetition_penalty=1.3, **GREEDY)
    with caplog.at_level(logging.DEBUG, logger="qwen3_accel.optimize"):
        actual = optimized.generate(ids, **kwargs)
    assert torch.equal(actual, reference.generate(ids, **kwargs))
    assert "repetition_penalty=1.3" in caplog.text
    reason = fast_path_reason(optimized, (ids,), dict(max_new_tokens=4, stop_strings=["x"]))[0]
    assert reason is not None and "stop_strings" in reason


def test_fast_generate_can_be_turned_off():
    reference, optimized = model_pair("tiny", compile=False, fast_generate=False)
    ids, mask = left_padded_batch([6, 3], 512, seed=2)
    kwargs = dict(attention_mask=mask, max_new_tokens=6, **GREEDY)
    assert torch.equal(optimized.generate(ids, **kwargs), reference.generate(ids, **kwargs))
    assert not optimized.qwen3_accel.runner.fast_states


def test_fast_loop_compiles_once():
    torch._dynamo.reset()
    counters.clear()
    reference, optimized = model_pair("tiny", compile=True, max_batch_size=2, max_cache_len=64)
    assert generate_without_recompiles(reference, optimized, [([9, 5], 11), ([14, 3], 20)]) == 1


@pytest.mark.parametrize("fast", [True, False])
def test_hf_default_length_rules(fast):
    """No length given: HF's default max_length (20 tokens in all) applies, also to prompts longer than that."""
    reference, optimized = model_pair("tiny", compile=False, fast_generate=fast)
    for lengths in ([6, 9], [26, 9]):
        ids, mask = left_padded_batch(lengths, 512, seed=4)
        for length in ({}, {"max_length": 31}):  # a max_length the user sets is a total length
            expected = reference.generate(ids, attention_mask=mask, pad_token_id=0, **length)
            assert torch.equal(optimized.generate(ids, attention_mask=mask, pad_token_id=0, **length), expected)


def test_a_partly_filled_bucket_stays_bounded_over_many_calls():
    """3 sequences in the 4-row graph, call after call: the unused row restarts with every call, so nothing it holds
    outgrows one call (its position once kept counting across calls until it left the RoPE table, after which
    every request on that bucket failed)."""
    torch._dynamo.reset()
    import qwen3_accel
    from qwen3_accel.configs import build_model, get_config

    config = get_config("tiny", num_hidden_layers=1, max_position_embeddings=256)
    reference = build_model(config)
    optimized = qwen3_accel.optimize(build_model(config))  # compile=True, the default
    ids, mask = left_padded_batch([10, 7, 10], 512, seed=13)
    kwargs = dict(attention_mask=mask, max_new_tokens=30, **GREEDY)
    expected = reference.generate(ids, **kwargs)
    acc = optimized.qwen3_accel
    for call in range(12):  # 12 x 30 steps: far past the table's 256 positions before the fix
        assert torch.equal(optimized.generate(ids, **kwargs), expected), f"call {call}"
        (state,) = acc.runner.fast_states.values()
        assert int(state.positions.max()) <= ids.shape[1] + 30 and int(state.step) <= 30
        assert int(acc.runner.cache.current.write_pos) <= ids.shape[1] + 30
    assert acc.graph_count() == 1 and not acc.runner.fast_steps.eager_keys
