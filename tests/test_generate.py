"""The optimized model against HF eager: forward logits, and generate() in every mode users rely on."""

import pytest
import torch

from conftest import CollectStreamer, left_padded_batch, model_pair
from qwen3_accel.compat import CACHE_ARG, CACHE_ARG_NAMES, OUTPUT_CACHE_FIELD

VOCAB = 512
GREEDY = dict(do_sample=False, pad_token_id=0)


@pytest.fixture(scope="module")
def pair():
    return model_pair("tiny", compile=False)


def test_forward_logits_match(pair):
    reference, optimized = pair
    ids, mask = left_padded_batch([11, 6, 9], VOCAB)
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask).logits
        actual = optimized(ids, attention_mask=mask).logits
    valid = mask.bool()
    torch.testing.assert_close(actual[valid], expected[valid], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", CACHE_ARG_NAMES)
def test_forward_returns_a_cache_hf_can_continue(pair, name):
    """A user's own loop: forward with use_cache, then feed the returned cache back in, under either name."""
    reference, optimized = pair
    ids, _ = left_padded_batch([7], VOCAB)
    with torch.no_grad():
        ref_out = reference(ids, use_cache=True)
        opt_out = optimized(ids, use_cache=True)
        nxt = ids[:, -1:]
        ref_next = reference(nxt, **{CACHE_ARG: getattr(ref_out, OUTPUT_CACHE_FIELD)}).logits
        opt_next = optimized(nxt, **{name: getattr(opt_out, OUTPUT_CACHE_FIELD)}).logits
    torch.testing.assert_close(opt_next, ref_next, atol=1e-4, rtol=1e-4)


def test_forward_rejects_two_caches_or_a_cache_under_another_name(pair):
    _, optimized = pair
    ids, _ = left_padded_batch([4], VOCAB)
    with torch.no_grad():
        first = getattr(optimized(ids, use_cache=True), OUTPUT_CACHE_FIELD)
        second = getattr(optimized(ids, use_cache=True), OUTPUT_CACHE_FIELD)
        with pytest.raises(ValueError, match="two different caches"):
            optimized(ids[:, -1:], cache=first, past_key_values=second)
        with pytest.raises(ValueError, match=r"got a cache as \['cache_params'\]"):
            optimized(ids[:, -1:], cache_params=first)


@pytest.mark.parametrize("lengths", [[9], [12, 5, 8]], ids=["batch1", "batch3-left-padded"])
def test_greedy_matches_over_consecutive_calls(pair, lengths):
    reference, optimized = pair
    cache = None
    for call, extra in enumerate([0, 4, -3]):
        ids, mask = left_padded_batch([n + extra for n in lengths], VOCAB, seed=call)
        expected = reference.generate(ids, attention_mask=mask, max_new_tokens=10 + call, **GREEDY)
        actual = optimized.generate(ids, attention_mask=mask, max_new_tokens=10 + call, **GREEDY)
        assert torch.equal(actual, expected), f"call {call}"
        if cache is not None:
            assert optimized.qwen3_accel.runner.cache.current is cache, "the persistent cache was re-allocated"
        cache = optimized.qwen3_accel.runner.cache.current
    assert cache.get_seq_length() > 0


def test_sampling_matches_with_the_same_seed(pair):
    reference, optimized = pair
    ids, mask = left_padded_batch([6, 9], VOCAB)
    kwargs = dict(do_sample=True, temperature=0.8, top_k=40, top_p=0.9, max_new_tokens=12, pad_token_id=0)
    torch.manual_seed(123)
    expected = reference.generate(ids, attention_mask=mask, **kwargs)
    torch.manual_seed(123)
    actual = optimized.generate(ids, attention_mask=mask, **kwargs)
    assert torch.equal(actual, expected)


def test_eos_stops_like_hf(pair):
    reference, optimized = pair
    ids, mask = left_padded_batch([8, 5, 7], VOCAB, seed=3)
    free_run = reference.generate(ids, attention_mask=mask, max_new_tokens=12, **GREEDY)
    eos = int(free_run[0, ids.shape[1] + 2])  # a token the first sequence emits early
    expected = reference.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=eos, **GREEDY)
    actual = optimized.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=eos, **GREEDY)
    assert (expected[0, ids.shape[1] + 3 :] == 0).all(), "the first sequence should stop at its eos"
    assert torch.equal(actual, expected)




def test_streamer_and_return_dict(pair):
    reference, optimized = pair
    ids, _ = left_padded_batch([6], VOCAB, seed=5)
    streamer = CollectStreamer()
    out = optimized.generate(
        ids, max_new_tokens=8, streamer=streamer, return_dict_in_generate=True, output_scores=True, **GREEDY
    )
    expected = reference.generate(ids, max_new_tokens=8, return_dict_in_generate=True, output_scores=True, **GREEDY)
    assert torch.equal(out.sequences, expected.sequences)
    streamed = torch.cat([c.reshape(1, -1) for c in streamer.chunks], dim=1)
    assert torch.equal(streamed, out.sequences)
    for ours, theirs in zip(out.scores, expected.scores):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_beam_search_falls_back_to_hf(pair):
    reference, optimized = pair
    ids, mask = left_padded_batch([7, 4], VOCAB, seed=9)
    kwargs = dict(num_beams=3, max_new_tokens=6, **GREEDY)
    assert torch.equal(
        optimized.generate(ids, attention_mask=mask, **kwargs), reference.generate(ids, attention_mask=mask, **kwargs)
    )


def test_triton_kernels_match_hf():
    """The whole tiny model on the real Triton kernels (interpreted on CPU, compiled on CUDA) against HF eager."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    reference, optimized = model_pair("tiny", device=device, compile=False, kernels="triton")
    assert optimized.qwen3_accel.runner.kernels.mode == "triton"
    ids, mask = left_padded_batch([9, 4], VOCAB, seed=11)
    ids, mask = ids.to(device), mask.to(device)
    expected = reference.generate(ids, attention_mask=mask, max_new_tokens=8, **GREEDY)
    assert torch.equal(optimized.generate(ids, attention_mask=mask, max_new_tokens=8, **GREEDY), expected)


def test_tied_embeddings_model():
    reference, optimized = model_pair("tiny-tied", compile=False)
    ids, mask = left_padded_batch([5, 8], 384, seed=2)
    expected = reference.generate(ids, attention_mask=mask, max_new_tokens=6, **GREEDY)
    assert torch.equal(optimized.generate(ids, attention_mask=mask, max_new_tokens=6, **GREEDY), expected)


def test_inputs_embeds_and_multiple_return_sequences(pair):
    """Requests outside the fast paths still give HF's answer."""
    reference, optimized = pair
    ids, mask = left_padded_batch([5, 7], VOCAB, seed=12)
    embeds = reference.model.embed_tokens(ids).detach()
    kwargs = dict(attention_mask=mask, max_new_tokens=5, **GREEDY)
    assert torch.equal(optimized.generate(inputs_embeds=embeds, **kwargs),
                       reference.generate(inputs_embeds=embeds, **kwargs))
    sampled = dict(do_sample=True, top_k=5, num_return_sequences=2, max_new_tokens=6, pad_token_id=0)
    torch.manual_seed(4)
    expected = reference.generate(ids, attention_mask=mask, **sampled)
    torch.manual_seed(4)
    assert torch.equal(optimized.generate(ids, attention_mask=mask, **sampled), expected)
