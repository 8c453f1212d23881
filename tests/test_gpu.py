"""GPU-only checks (bf16 on CUDA, compiled decode with CUDA graphs). Skipped without a GPU."""

import itertools

import pytest
import torch

from conftest import left_padded_batch, model_pair
from test_random_requests import run_stream
from qwen3_accel.configs import build_model
from qwen3_accel.custom_ops import activation, rms_norm, rope

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("shape", [(1, 1024), (7, 4096), (3, 5120)])
def test_bf16_kernels_match_references(shape):
    torch.manual_seed(0)
    x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    r = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(shape[-1], device="cuda", dtype=torch.bfloat16)
    tol = dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(rms_norm.rms_norm_triton(x, w, 1e-6), rms_norm.rms_norm_reference(x, w, 1e-6), **tol)
    out, res = rms_norm.fused_add_rms_norm_triton(x, r, w, 1e-6)
    out_ref, res_ref = rms_norm.fused_add_rms_norm_reference(x, r, w, 1e-6)
    torch.testing.assert_close(res, res_ref, atol=0, rtol=0)
    torch.testing.assert_close(out, out_ref, **tol)
    gate_up = torch.randn(shape[0], 2 * shape[-1], device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(activation.silu_and_mul_triton(gate_up), activation.silu_and_mul_reference(gate_up), **tol)
    qkv = torch.randn(shape[0], 32, 128, device="cuda", dtype=torch.bfloat16)
    cos_sin = torch.randn(64, 128, device="cuda")
    positions = torch.randint(0, 64, (shape[0],), device="cuda")
    args = (qkv[:, :16], qkv[:, 16:24], w[:128].contiguous(), r[0, :128].contiguous(), cos_sin, positions, 1e-6)
    for ours, ref in zip(rope.qk_norm_rope_triton(*args), rope.qk_norm_rope_reference(*args)):
        torch.testing.assert_close(ours, ref, atol=6e-2, rtol=2e-2)


def test_fp32_greedy_and_compile_on_gpu():
    """The tiny model in fp32 on CUDA, compiled with CUDA graphs: tokens equal HF eager's, no recompiles."""
    reference, optimized = model_pair("tiny", device="cuda", max_batch_size=4, max_cache_len=128)
    for call, lengths in enumerate([[9, 5, 12], [3, 14, 7], [6, 6, 6]]):
        ids, mask = left_padded_batch(lengths, 512, seed=call)
        ids, mask = ids.cuda(), mask.cuda()
        kwargs = dict(attention_mask=mask, max_new_tokens=12 + call, do_sample=False, pad_token_id=0)
        with torch._dynamo.config.patch(error_on_recompile=call > 0):
            actual = optimized.generate(ids, **kwargs)
        assert torch.equal(actual, reference.generate(ids, **kwargs))


def test_bf16_greedy_parity_on_qwen3_0_6b_shapes():
    """32 prompts x 32 new tokens in bf16 against HF eager.

    Random weights give flat logits (top-2 gaps of a few hundredths), so one bf16 rounding can flip a
    near-tie and the two continuations then part ways. As in vLLM's `check_logprobs_close`, every
    divergence must happen at a near-tie of HF's own logits; a wrong kernel picks tokens far down the list.
    """
    reference, optimized = model_pair("Qwen3-0.6B", dtype=torch.bfloat16, device="cuda", seed=0,
                                      max_batch_size=32, max_cache_len=256)
    ids, mask = left_padded_batch([16 + (7 * i) % 48 for i in range(32)], reference.config.vocab_size, seed=1)
    ids, mask = ids.cuda(), mask.cuda()
    kwargs = dict(attention_mask=mask, max_new_tokens=32, do_sample=False, pad_token_id=0)
    expected = reference.generate(ids, return_dict_in_generate=True, output_logits=True, **kwargs)
    actual = optimized.generate(ids, **kwargs)
    prompt_len = ids.shape[1]
    same = actual == expected.sequences
    print(f"bf16 parity: {same.all(dim=1).float().mean():.1%} of prompts identical, "
          f"{same[:, prompt_len:].float().mean():.1%} of new tokens")
    near_tie = 0.125  # 8 bf16 ulps of a logit near 2; random-weight logits have std ~0.6
    for row in range(ids.shape[0]):
        diverged = (~same[row, prompt_len:]).nonzero()
        if len(diverged) == 0:
            continue
        step = int(diverged[0])
        logits = expected.logits[step][row].float()
        gap = logits.max() - logits[actual[row, prompt_len + step]]
        assert gap <= near_tie, f"prompt {row} diverged at step {step} on a token {gap:.3f} below HF's best"


def test_random_request_stream_compiled_on_cuda():
    """The CPU suite's long-lived-process stream with CUDA kernels and CUDA graphs (fp32: greedy tokens exact;
    sampled ones from Inductor's random numbers, checked for shape only), dense and MoE models alternating."""
    pairs = [model_pair(name, device="cuda", compile=True) for name in ("tiny", "tiny-moe")]
    failures = run_stream(pairs, calls=120, seed=5, device="cuda", exact_sampling=False)
    assert not failures, "\n".join(failures)
    for _, optimized in pairs:
        acc = optimized.qwen3_accel
        assert not acc.runner.decode_steps.eager_keys and not acc.runner.fast_steps.eager_keys


@pytest.mark.parametrize("fmt", ["int8", "int4", "fp8"])
@pytest.mark.parametrize("rows", [1, 3, 17, 300])
def test_quantized_linear_on_gpu(fmt, rows):
    """The compiled Triton kernel (GEMV and tl.dot paths, bf16 and fp32 activations) against dequantize-then-matmul,
    on Qwen3 shapes and odd ones."""
    from qwen3_accel.custom_ops import formats
    from qwen3_accel.custom_ops import linear as ql

    for n_out, n_in in [(6144, 4096), (131, 200)]:
        weight = torch.randn(n_out, n_in, device="cuda") * 0.02
        if fmt == "int8":
            packed = (*formats.quantize_int8(weight), None, 1, n_in)
        elif fmt == "int4":
            packed = (*formats.quantize_int4(weight.bfloat16()), 1, formats.INT4_GROUP)
        else:
            packed = (*formats.quantize_fp8(weight), None, formats.FP8_BLOCK, formats.FP8_BLOCK)
        for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
            x = torch.randn(rows, n_in, device="cuda", dtype=dtype)
            expected = ql.quantized_linear_reference(x, *packed).float()
            actual = torch.ops.qwen3_accel.quantized_linear(x, *packed).float()
            torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * expected.abs().max().item())


@pytest.mark.parametrize("fmt", ["int8", "int4", "fp8"])
def test_quantized_model_greedy_on_gpu(fmt):
    """optimize(weights=fmt) on CUDA, compiled: fp32 greedy tokens equal HF eager's on the dequantized weights."""
    from test_quantized import dequantized_reference
    import qwen3_accel

    model = qwen3_accel.optimize(build_model("tiny", device="cuda", seed=1), weights=fmt)
    reference = dequantized_reference(model, build_model("tiny", device="cuda", seed=1))
    ids, mask = left_padded_batch([7, 4], 512, seed=2)
    ids, mask = ids.cuda(), mask.cuda()
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **kwargs), reference.generate(ids, **kwargs))


def test_decode_linear_cuts_gpu_ops_per_step():
    """Compiled on CUDA, greedy tokens are HF's with decode_linear on and off, and the fused projections save at
    least 3 GPU operations per layer and step (12 -> 7 in theory; cuBLAS may add split-K reductions), as counted by
    the profiler over CUDA-graph replays."""
    from qwen3_accel.bench import device_ops_per_step

    ids, mask = left_padded_batch([7, 4], 512, seed=3)
    ids, mask = ids.cuda(), mask.cuda()
    ops = {}
    for mode in ("always", "never"):
        reference, optimized = model_pair("tiny", device="cuda", max_batch_size=2, max_cache_len=64,
                                          decode_linear=mode)
        kwargs = dict(attention_mask=mask, do_sample=False, pad_token_id=0)
        assert torch.equal(optimized.generate(ids, max_new_tokens=9, **kwargs),
                           reference.generate(ids, max_new_tokens=9, **kwargs))
        ops[mode] = device_ops_per_step(lambda: optimized.generate(ids, max_new_tokens=1, **kwargs),
                                        lambda: optimized.generate(ids, max_new_tokens=9, **kwargs), 8,
                                        torch.device("cuda"))
    layers = reference.config.num_hidden_layers
    assert ops["never"] - ops["always"] >= 3 * layers, ops


@pytest.mark.parametrize("request_kwargs", [dict(cache_implementation="static"),
                                            dict(output_hidden_states=True, return_dict_in_generate=True)])
def test_hf_forward_decodes_through_our_kernel_on_gpu(request_kwargs):
    """Requests our forward hands to HF's attend through the split-KV Triton kernel over HF's cache (fp32, CUDA):
    HF eager's tokens, one kernel call per layer and step."""
    reference, optimized = model_pair("tiny", device="cuda")
    ids, mask = left_padded_batch([9, 5, 12], 512, seed=5)
    kwargs = dict(attention_mask=mask.cuda(), max_new_tokens=6, do_sample=False, pad_token_id=0, **request_kwargs)
    expected = reference.generate(ids.cuda(), **kwargs)
    with torch.profiler.profile() as profile:
        actual = optimized.generate(ids.cuda(), **kwargs)
    calls = sum(event.name == "qwen3_accel::decode_attention" for event in profile.events())
    assert calls == 5 * reference.config.num_hidden_layers
    sequences = [out if isinstance(out, torch.Tensor) else out.sequences for out in (expected, actual)]
    assert torch.equal(*sequences)


def test_continuous_batching_engine_on_cuda():
    """The tiny model in fp32 on CUDA through HF's generate_batch on our engine: paged Triton kernels, chunked
    prompts, preemption, decode steps and steps with prompt chunks replayed as CUDA graphs, each step launched
    before the last one's tokens are read (overlap); each request HF's greedy tokens."""
    from transformers import ContinuousBatchingConfig, GenerationConfig

    from qwen3_accel.compat import CB_PAGE_FIELD

    reference, optimized = model_pair("tiny", device="cuda")
    g = torch.Generator().manual_seed(6)
    lengths = torch.randint(1, 200, (24,), generator=g).tolist()
    prompts = [torch.randint(1, 512, (n,), generator=g).tolist() for n in lengths]
    config = GenerationConfig(max_new_tokens=12, eos_token_id=None, do_sample=False, pad_token_id=0)
    pool = ContinuousBatchingConfig(num_blocks=2, max_batch_tokens=256, **{CB_PAGE_FIELD: 256})  # preempts
    outputs = optimized.generate_batch(prompts, generation_config=config, continuous_batching_config=pool,
                                       persistent_manager=True)
    engine = optimized.qwen3_accel.kept_manager.engine
    graphs, chunk_graphs = engine.decode_graphs, engine.chunk_graphs
    preemptions, overlap = engine.scheduler.preemptions, engine.overlap
    optimized.destroy_cached_continuous_batching_manager()
    for prompt, output in zip(prompts, outputs.values()):
        ids = torch.tensor([prompt], device="cuda")
        expected = reference.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)[0, len(prompt):]
        assert output.error is None and output.generated_tokens == expected.tolist()
    assert graphs.compiled and not graphs.eager_keys and preemptions > 0 and overlap
    # Steps with prompt chunks replayed their graphs: calls beyond the warm-up's two per key (record, then replay).
    assert sum(chunk_graphs.calls.values()) > 2 * len(chunk_graphs.compiled) and not chunk_graphs.eager_keys


def test_engine_decode_steps_never_wait_for_the_device():
    """With overlap, a step's host work runs while the device computes the step before: under
    torch.cuda.set_sync_debug_mode("error") every blocking copy or stream sync raises, so the steps after the
    prompts (greedy and sampled rows, and a chunk graph's step when a request joins) must queue their inputs
    through pinned memory and read tokens only through their event."""
    from qwen3_accel.serving.engine import Engine

    reference, optimized = model_pair("tiny", device="cuda")
    engine = Engine(optimized, num_blocks=64, max_batch_size=8)
    engine.warm_up(64)
    g = torch.Generator().manual_seed(8)
    prompts = [torch.randint(1, 512, (n,), generator=g).tolist() for n in (5, 9, 14, 20)]
    seqs = [engine.add_request(p, 16) for p in prompts]
    sampled = engine.add_request(prompts[0], 16, do_sample=True, temperature=0.8, top_k=20, top_p=0.9)
    engine.step()  # the prompts
    chunk_replays = sum(engine.chunk_graphs.calls.values())
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in itertools.count():
            if step == 3:  # joins while the others decode: a step of its prompt chunk and their decodes
                seqs.append(engine.add_request(prompts[3], 16))
            if not engine.has_work():
                break
            engine.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert sum(engine.chunk_graphs.calls.values()) > chunk_replays and not engine.chunk_graphs.eager_keys
    for prompt, seq in zip(prompts + prompts[3:], seqs):
        ids = torch.tensor([prompt], device="cuda")
        expected = reference.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=0)[0, len(prompt):]
        assert seq.generated == expected.tolist()
    assert len(sampled.generated) == 16 and all(0 <= t < optimized.config.vocab_size for t in sampled.generated)


def test_default_kv_pool_is_the_same_size_for_every_new_manager():
    """Default sizing (a share of free memory): a manager built after another one stopped finds the memory the
    first released (stop empties the allocator's cache), not a fifth of it."""
    from transformers import GenerationConfig

    _, optimized = model_pair("tiny", device="cuda")
    config = GenerationConfig(max_new_tokens=2, eos_token_id=None, do_sample=False, pad_token_id=0)
    sizes = []
    for _ in range(2):
        manager = optimized.init_continuous_batching(generation_config=config)
        manager.start()
        sizes.append(len(manager.engine.block_manager.blocks))
        manager.add_request([1, 2, 3], max_new_tokens=2)
        assert manager.get_result(timeout=120).error is None
        manager.stop(block=True)
    assert sizes[1] >= 0.9 * sizes[0], sizes


def test_speculative_decoding_on_cuda():
    """The tiny model in fp32 on CUDA: an assistant (a noisy copy, so that some drafts are kept and some not) and
    prompt lookup through Triton's paged kernels and CUDA graphs, batches 1 and 3; greedy decoding's tokens."""
    reference, optimized = model_pair("tiny", device="cuda")
    draft = build_model("tiny", device="cuda", seed=0)
    draft.load_state_dict(optimized.state_dict())
    with torch.no_grad():
        draft.lm_head.weight.add_(0.5 * draft.lm_head.weight.std() * torch.randn_like(draft.lm_head.weight))
    draft.generation_config.num_assistant_tokens = 4
    for lengths in ([9], [5, 17, 3]):
        ids, mask = left_padded_batch(lengths, 512, seed=len(lengths))
        ids, mask = ids.cuda(), mask.cuda()
        kwargs = dict(attention_mask=mask, max_new_tokens=24, eos_token_id=None, do_sample=False, pad_token_id=0)
        expected = reference.generate(ids, **kwargs)
        assert torch.equal(optimized.generate(ids, assistant_model=draft, **kwargs), expected)
        assert torch.equal(optimized.generate(ids, prompt_lookup_num_tokens=4, **kwargs), expected)
    for speculator in optimized.qwen3_accel.runner.speculators.values():
        steps = (speculator.draft_steps, speculator.store_steps, speculator.lookup_steps, speculator.verify_steps)
        assert any(s.compiled for s in steps) and not any(s.eager_keys for s in steps)
