"""The compiled decode step behind HF's loop: one graph per batch bucket, no graph breaks, no recompiles
as prompts and outputs change. (The fast loop's graph is tested in test_fast_generate.py.)"""

import pytest
import torch
from torch._dynamo.utils import ReinplaceCounters, counters

from conftest import generate_without_recompiles, left_padded_batch, model_pair


@pytest.mark.parametrize("decode_linear", ["never", "always"])
def test_decode_is_one_graph_with_no_recompiles(decode_linear):
    torch._dynamo.reset()
    counters.clear()
    ReinplaceCounters.clear()
    reference, optimized = model_pair("tiny", compile=True, fast_generate=False, max_batch_size=2, max_cache_len=64,
                                      decode_linear=decode_linear)
    cases = [([9, 5], 6), ([14, 3], 11), ([4, 4], 3)]
    # Inductor's passes must run (not a cached graph from an earlier test) for the in-place check below.
    no_cache = dict(fx_graph_cache=False)
    with torch._inductor.config.patch(no_cache), torch._functorch.config.patch(enable_autograd_cache=False):
        assert generate_without_recompiles(reference, optimized, cases) == 1
        # A batch of one has its own one-row graph, compiled once and then reused.
        assert generate_without_recompiles(reference, optimized, [([7], 5), ([8], 5)]) == 2
    # The cache writes (QK-norm + RoPE op, mask index-put) happen in place: a missed one copies a whole cache.
    assert ReinplaceCounters.get_total_missed() == 0


def test_graphs_stay_within_the_documented_bound_over_many_varied_requests():
    """Far more than dynamo's 8 recompiles' worth of distinct settings (temperatures, top-k/top-p, pad ids, eos
    lists, batch sizes, HF-loop requests, calls inside and outside torch.inference_mode()) on two models: no error,
    no eager fallback, and each model holds exactly the documented bound of 3 graphs per batch bucket (buckets 1
    and 2 here)."""
    torch._dynamo.reset()
    counters.clear()
    models = [model_pair("tiny", compile=True, max_batch_size=2, max_cache_len=64, seed=seed) for seed in (0, 1)]
    every_graph_once = torch._dynamo.config.patch(error_on_recompile=True)  # every graph compiles exactly once

    for call in range(24):
        reference, optimized = models[call % 2]
        ids, mask = left_padded_batch([5 + call % 7, 3][: 1 + (call // 2) % 2], 512, seed=call)
        kwargs = dict(attention_mask=mask, max_new_tokens=4 + call % 5, pad_token_id=call % 3,
                      eos_token_id=list(range(100, 100 + call % 4)) or None)
        if call % 3 == 1:
            kwargs.update(do_sample=True, temperature=0.5 + call / 10, top_k=call % 6, top_p=1 - call / 50)
            with every_graph_once, torch.inference_mode(call // 4 % 2 == 0):  # alternating, per key
                out = optimized.generate(ids, **kwargs)
            assert out.shape[0] == ids.shape[0] and out.shape[1] <= ids.shape[1] + kwargs["max_new_tokens"]
            continue
        kwargs["do_sample"] = False
        if call % 3 == 2:
            kwargs["repetition_penalty"] = 1.0 + call / 100  # HF's loop over our compiled decode step
        with every_graph_once, torch.inference_mode(call // 4 % 2 == 0):  # alternating, per key
            actual = optimized.generate(ids, **kwargs)
        assert torch.equal(actual, reference.generate(ids, **kwargs)), f"call {call}"
    for _, optimized in models:
        acc = optimized.qwen3_accel
        assert not acc.runner.decode_steps.eager_keys and not acc.runner.fast_steps.eager_keys
        assert acc.graph_count() == 3 * 2
    assert not counters["graph_break"]


def test_a_failing_compile_fails_the_compile_tests(monkeypatch, caplog):
    """The suite's compile checks see a graph that could not be built (they once passed on the eager fallback);
    a user's request still gets HF's tokens, with a warning naming the graph key."""
    import logging

    from qwen3_accel import graphs

    def compile_that_fails(fn, **options):
        def step(*args, **kwargs):
            raise RuntimeError("planted compile failure")
        return step

    monkeypatch.setattr(torch, "compile", compile_that_fails)
    reference, optimized = model_pair("tiny", compile=True, max_batch_size=2, max_cache_len=64)
    with pytest.raises(RuntimeError, match="planted compile failure"):  # strict mode, as the suite runs
        generate_without_recompiles(reference, optimized, [([9, 5], 4)])
    monkeypatch.delenv(graphs.STRICT_ENV)  # a user's process: the eager fallback serves the request
    with caplog.at_level(logging.WARNING, logger="qwen3_accel.graphs"):
        with pytest.raises(AssertionError, match="ran eagerly after a failed compile"):
            generate_without_recompiles(reference, optimized, [([9, 5], 4)])
    assert "('fast', 2, 2, 64, False)" in caplog.text and "planted compile failure" in caplog.text
