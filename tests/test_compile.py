"""The compiled decode step behind HF's loop: one graph per batch bucket, no graph breaks, no recompiles
as prompts and outputs change. (The fast loop's graph is tested in test_fast_generate.py.)"""

import torch
from torch._dynamo.utils import counters

from conftest import generate_without_recompiles, model_pair


def test_decode_is_one_graph_with_no_recompiles():
    torch._dynamo.reset()
    counters.clear()
    reference, optimized = model_pair("tiny", compile=True, fast_generate=False, max_batch_size=2, max_cache_len=64)
    cases = [([9, 5], 6), ([14, 3], 11), ([4, 4], 3)]
    assert generate_without_recompiles(reference, optimized, cases) == 1
    # A batch of one has its own one-row graph, compiled once and then reused.
    assert generate_without_recompiles(reference, optimized, [([7], 5), ([8], 5)]) == 2
