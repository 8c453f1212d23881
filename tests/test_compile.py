"""The compiled decode step: one graph, no graph breaks, no recompiles as prompts and outputs change."""

import torch
from torch._dynamo.utils import counters

from conftest import left_padded_batch, model_pair

GREEDY = dict(do_sample=False, pad_token_id=0)


def test_decode_is_one_graph_with_no_recompiles():
    torch._dynamo.reset()
    counters.clear()
    reference, optimized = model_pair("tiny", compile=True, max_batch_size=2, max_cache_len=64)
    for call, (lengths, new_tokens) in enumerate([([9, 5], 6), ([14, 3], 11), ([4, 4], 3)]):
        ids, mask = left_padded_batch(lengths, 512, seed=call)
        with torch._dynamo.config.patch(error_on_recompile=call > 0):
            actual = optimized.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, **GREEDY)
        assert torch.equal(actual, reference.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, **GREEDY))
    assert counters["stats"]["unique_graphs"] == 1
    # A batch of one has its own one-row graph, compiled once and then reused.
    for call in range(2):
        ids, mask = left_padded_batch([7 + call], 512, seed=7)
        with torch._dynamo.config.patch(error_on_recompile=call > 0):
            actual = optimized.generate(ids, attention_mask=mask, max_new_tokens=5, **GREEDY)
        assert torch.equal(actual, reference.generate(ids, attention_mask=mask, max_new_tokens=5, **GREEDY))
    assert counters["stats"]["unique_graphs"] == 2
    assert not counters["graph_break"]
