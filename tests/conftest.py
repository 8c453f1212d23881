import os

import pytest
import torch
from transformers.generation.streamers import BaseStreamer

# Without a GPU, Triton kernels run in Triton's interpreter; it must be on before any kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Any compile or replay failure of our compiled steps raises in tests (users get an eager fallback and a warning).
os.environ.setdefault("QWEN3_ACCEL_STRICT_COMPILE", "1")

from qwen3_accel.configs import build_model  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


def model_pair(name: str = "tiny", dtype=torch.float32, device="cpu", seed=0, **optimize_kwargs):
    """(HF reference, optimized copy with identical weights)."""
    import qwen3_accel

    reference = build_model(name, device=device, dtype=dtype, seed=seed)
    optimized = build_model(name, device=device, dtype=dtype, seed=seed)
    optimized.load_state_dict(reference.state_dict())
    return reference, qwen3_accel.optimize(optimized, **optimize_kwargs)


def left_padded_batch(lengths: list[int], vocab: int, seed: int = 0):
    """input_ids and attention_mask for prompts of the given lengths, left-padded with token 0."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(1, vocab, (n,), generator=g)
        mask[row, width - n :] = 1
    return ids, mask


def generate_without_recompiles(reference, optimized, cases, device="cpu") -> int:
    """Greedy generate() for each (prompt lengths, new tokens) case: equal to HF, no graph break, no key run eagerly
    after a failed compile, and an error on any recompile after the first call. Returns dynamo's count of compiled
    graphs (reset counters first)."""
    from torch._dynamo.utils import counters

    for call, (lengths, new_tokens) in enumerate(cases):
        ids, mask = left_padded_batch(lengths, reference.config.vocab_size, seed=call)
        ids, mask = ids.to(device), mask.to(device)
        kwargs = dict(attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        with torch._dynamo.config.patch(error_on_recompile=call > 0):
            actual = optimized.generate(ids, **kwargs)
        assert torch.equal(actual, reference.generate(ids, **kwargs)), f"call {call}"
    acc = optimized.qwen3_accel
    fell_back = acc.runner.decode_steps.eager_keys | acc.runner.fast_steps.eager_keys
    assert not fell_back, f"graph keys that ran eagerly after a failed compile: {sorted(fell_back)}"
    assert not counters["graph_break"]
    return counters["stats"]["unique_graphs"]


class CollectStreamer(BaseStreamer):
    """Records what generate() streams."""

    def __init__(self):
        self.chunks = []
        self.ended = False

    def put(self, value):
        self.chunks.append(value.clone())

    def end(self):
        self.ended = True
