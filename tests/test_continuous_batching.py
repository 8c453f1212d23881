"""HF's continuous batching (`generate_batch`, `init_continuous_batching`, what `transformers serve
--continuous-batching` drives) on an optimized model: every request HF generate()'s tokens for its prompt alone, and
our own path back once the managers stop. (Today HF's scheduler, paged cache and paged attention serve these
requests, with our fused MoE experts; see docs/ARCHITECTURE.md.)"""

import torch
from transformers import ContinuousBatchingConfig, GenerationConfig

import pytest
from conftest import model_pair

GREEDY = dict(do_sample=False, pad_token_id=0)
# HF sizes its paged cache by free memory unless told: 13-18 GB of a CPU's RAM for a tiny model.
SMALL_POOL = ContinuousBatchingConfig(num_blocks=64, max_batch_tokens=256)


def _prompts(count: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 60, (count,), generator=g).tolist()
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths]


def _alone(reference, prompt: list[int], new_tokens: int) -> list[int]:
    out = reference.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, **GREEDY)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("name", ["tiny", "tiny-moe"])
def test_generate_batch_gives_each_request_hfs_tokens(name, monkeypatch):
    from qwen3_accel.custom_ops import moe

    reference, optimized = model_pair(name, compile=False)
    prompts = _prompts(12, reference.config.vocab_size, seed=1)
    config = GenerationConfig(max_new_tokens=6, eos_token_id=None, **GREEDY)
    expert_calls = []  # our fused_moe op's CPU implementation, called from HF's background thread
    original = moe.fused_moe_reference
    monkeypatch.setattr(moe, "fused_moe_reference", lambda *a, **k: expert_calls.append(1) or original(*a, **k))
    outputs = optimized.generate_batch(prompts, generation_config=config, continuous_batching_config=SMALL_POOL)
    assert len(outputs) == len(prompts)
    for output in outputs.values():
        assert output.error is None
        assert output.generated_tokens == _alone(reference, output.prompt_ids, 6), output.request_id
    if name == "tiny-moe":
        assert expert_calls  # HF's forward runs our experts
    # The manager has stopped: generate() is ours again (the fast loop, our attention selected).
    ids = torch.tensor([prompts[0]])
    assert torch.equal(optimized.generate(ids, max_new_tokens=4, **GREEDY),
                       reference.generate(ids, max_new_tokens=4, **GREEDY))
    assert optimized.config._attn_implementation == "qwen3_accel"


def test_a_manager_serves_per_request_lengths_cancels_and_restarts():
    reference, optimized = model_pair("tiny", compile=False)
    prompts = _prompts(8, reference.config.vocab_size, seed=2)
    manager = optimized.init_continuous_batching(generation_config=GenerationConfig(eos_token_id=None, **GREEDY),
                                                 continuous_batching_config=SMALL_POOL)
    manager.start()
    try:
        requests = {manager.add_request(prompt, max_new_tokens=2 + i % 5): (prompt, 2 + i % 5)
                    for i, prompt in enumerate(prompts)}
        manager.cancel_request("no-such-request")  # an unknown id is a no-op, and harms no other request
        results = [manager.get_result(timeout=120) for _ in requests]  # in the order they finish
        assert sorted(r.request_id for r in results if r is not None) == sorted(requests)
        for result in results:
            prompt, new_tokens = requests[result.request_id]
            assert result.error is None
            assert result.generated_tokens == _alone(reference, prompt, new_tokens), result.request_id
        ids = torch.tensor([prompts[2]])  # generate() beside a running manager: our own path, HF's tokens
        assert torch.equal(optimized.generate(ids, max_new_tokens=4, **GREEDY),
                           reference.generate(ids, max_new_tokens=4, **GREEDY))
        late = manager.add_request(prompts[0], max_new_tokens=3)  # a request after the others finished
        result = manager.get_result(timeout=120)
        assert result.request_id == late and result.generated_tokens == _alone(reference, prompts[0], 3)
    finally:
        manager.stop(block=True)
    assert not manager.is_running()
    ids = torch.tensor([prompts[1]])
    assert torch.equal(optimized.generate(ids, max_new_tokens=4, **GREEDY),
                       reference.generate(ids, max_new_tokens=4, **GREEDY))
    assert optimized.config._attn_implementation == "qwen3_accel"
