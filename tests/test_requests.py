"""Request shapes and model changes a long-lived process meets: each gives HF's answer or a clear error."""

import copy
import pickle
import threading

import pytest
import torch
import torch.nn as nn

import qwen3_accel
from conftest import left_padded_batch, model_pair
from qwen3_accel.compat import CACHE_ARG, OUTPUT_CACHE_FIELD
from qwen3_accel.configs import build_model, get_config
from qwen3_accel.custom_ops import moe
from qwen3_accel.optimize import Qwen3Accelerator

GREEDY = dict(do_sample=False, pad_token_id=0)


@pytest.fixture(scope="module")
def pair():
    return model_pair("tiny", compile=False)


def op_calls(profile, op: str | None = None) -> int:
    """Calls of our op `op` (any of our ops with None) the profiler recorded."""
    prefix = f"qwen3_accel::{op or ''}"
    return sum(event.name == prefix if op else event.name.startswith(prefix) for event in profile.events())


def both(reference, optimized, *args, **kwargs):
    """generate() on both models: the same tokens."""
    expected = reference.generate(*args, **kwargs)
    actual = optimized.generate(*args, **kwargs)
    if not isinstance(expected, torch.Tensor):  # a config that asks for extra outputs makes generate return a dict
        expected, actual = expected.sequences, actual.sequences
    assert torch.equal(actual, expected)
    return actual


def test_missing_mask_with_pad_tokens_in_the_prompt(pair):
    """HF infers the mask from the pad token when none is given (a left-padded batch without its mask)."""
    reference, optimized = pair
    ids, _ = left_padded_batch([9, 5, 7], 512, seed=1)
    both(reference, optimized, ids, max_new_tokens=6, **GREEDY)


def test_right_padded_mask(pair):
    reference, optimized = pair
    ids, mask = left_padded_batch([8, 5], 512, seed=2)
    ids, mask = ids.flip(1), mask.flip(1)  # padding on the right
    both(reference, optimized, ids, attention_mask=mask, max_new_tokens=6, **GREEDY)


def test_queries_that_see_no_token_get_hfs_zeros(pair):
    """Padding queries that see no real token (left padding, a row of padding only) get zero attention output, as
    torch's SDPA gives them in HF: the logits match HF's at every position, padding included, and a batch with an
    all-padding row generates HF's tokens for every row."""
    reference, optimized = pair
    ids = torch.tensor([[0, 0, 0, 5, 9], [0, 0, 0, 0, 0], [3, 4, 5, 6, 7]])
    mask = (ids != 0).long()
    with torch.no_grad():
        torch.testing.assert_close(optimized(ids, attention_mask=mask).logits,
                                   reference(ids, attention_mask=mask).logits, atol=1e-5, rtol=1e-5)
    both(reference, optimized, ids, attention_mask=mask, max_new_tokens=4, **GREEDY)


def test_a_first_call_inside_inference_mode_leaves_later_calls_working():
    """The persistent cache and buffers are made on a model's first call; made inside torch.inference_mode() they
    were inference tensors, and every later call outside it failed on their in-place updates."""
    reference, optimized = model_pair("tiny-moe", compile=False)
    ids, mask = left_padded_batch([7, 4], 512, seed=13)
    requests = [dict(), dict(repetition_penalty=1.2), dict(num_beams=2)]  # fast loop, HF's loop on our cache, HF's
    for inference in (True, False, True):
        for request in requests:
            with torch.inference_mode(inference):
                both(reference, optimized, ids, attention_mask=mask, max_new_tokens=4, **request, **GREEDY)
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask).logits
        torch.testing.assert_close(optimized(ids, attention_mask=mask).logits, expected)


@pytest.mark.parametrize("name", ["tiny", "tiny-moe"])
def test_autocast_runs_hfs_own_path(name):
    """Under torch.autocast HF's forward decides each op's dtype; ours would write bf16 keys into an fp32 cache (it
    crashed). generate and forward run HF's own path then, with HF's tokens and logits and none of our ops."""
    reference, optimized = model_pair(name, compile=False)
    ids, mask = left_padded_batch([7, 4], 512, seed=14)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.profiler.profile() as profile:
        for request in (dict(), dict(repetition_penalty=1.2)):
            both(reference, optimized, ids, attention_mask=mask, max_new_tokens=4, **request, **GREEDY)
        with torch.no_grad():
            torch.testing.assert_close(optimized(ids, attention_mask=mask).logits,
                                       reference(ids, attention_mask=mask).logits)
    assert op_calls(profile) == 0
    both(reference, optimized, ids, attention_mask=mask, max_new_tokens=4, **GREEDY)  # and ours again after it


def test_threads_sharing_one_model_get_their_own_tokens():
    """A server's threads calling one optimized model at once: each gets HF's tokens for its own prompt (they wrote
    into each other's cache rows: every output was wrong). Fast loop, HF's loop on our cache, HF's own cache."""
    reference, optimized = model_pair("tiny", compile=False)
    prompts = [left_padded_batch([5 + i, 3 + i], 512, seed=20 + i) for i in range(4)]
    requests = [dict(), dict(repetition_penalty=1.2), dict(num_beams=2)]
    kwargs = dict(max_new_tokens=12, **GREEDY)
    expected = {(i, j): reference.generate(ids, attention_mask=mask, **kwargs, **request)
                for i, (ids, mask) in enumerate(prompts) for j, request in enumerate(requests)}
    results = {}

    def serve(i):
        ids, mask = prompts[i]
        for round in range(2):
            for j, request in enumerate(requests):
                results[i, j, round] = optimized.generate(ids, attention_mask=mask, **kwargs, **request)

    threads = [threading.Thread(target=serve, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 2 * len(expected)
    assert all(torch.equal(out, expected[i, j]) for (i, j, _), out in results.items())


def test_a_replaced_weight_in_any_layer_is_used():
    reference, optimized = model_pair("tiny", compile=False)
    ids, mask = left_padded_batch([6, 9], 512, seed=3)
    both(reference, optimized, ids, attention_mask=mask, max_new_tokens=5, **GREEDY)
    for model in (reference, optimized):
        torch.manual_seed(5)
        model.model.layers[1].mlp.up_proj.weight = nn.Parameter(torch.randn(128, 64) * 0.5)
        torch.manual_seed(6)
        model.model.layers[1].self_attn.v_proj.weight = nn.Parameter(torch.randn(64, 64) * 0.5)
    out = both(reference, optimized, ids, attention_mask=mask, max_new_tokens=5, **GREEDY)
    assert optimized.model.layers[1].self_attn.v_proj.weight.data_ptr() != 0
    with torch.no_grad():  # a user's forward sees it too
        torch.testing.assert_close(optimized(out).logits, reference(out).logits, atol=1e-4, rtol=1e-4)


def test_a_weight_of_another_shape_is_a_clear_error():
    _, optimized = model_pair("tiny", compile=False)
    optimized.model.layers[1].mlp.gate_proj.weight = nn.Parameter(torch.randn(64, 64))
    with pytest.raises(ValueError, match=r"gate_proj.weight was replaced by a torch.float32 tensor of shape \[64, 64"):
        optimized.generate(torch.ones(1, 3, dtype=torch.long), max_new_tokens=2, **GREEDY)


def test_a_returned_cache_stays_valid_after_the_next_call(pair):
    """A cache returned by generate() can be continued later, whatever ran in between."""
    reference, optimized = pair
    ids, mask = left_padded_batch([7, 4], 512, seed=4)
    kwargs = dict(attention_mask=mask, max_new_tokens=4, return_dict_in_generate=True, **GREEDY)
    ref_first, opt_first = reference.generate(ids, **kwargs), optimized.generate(ids, **kwargs)
    assert torch.equal(opt_first.sequences, ref_first.sequences)
    other, other_mask = left_padded_batch([5, 11], 512, seed=5)
    optimized.generate(other, attention_mask=other_mask, max_new_tokens=9, return_dict_in_generate=True, **GREEDY)

    def continue_from(model, first):
        cache = getattr(first, OUTPUT_CACHE_FIELD)
        seq = first.sequences
        full_mask = torch.cat([mask, torch.ones(2, seq.shape[1] - mask.shape[1], dtype=mask.dtype)], dim=1)
        with torch.no_grad():
            return model(seq[:, -1:], attention_mask=full_mask, **{CACHE_ARG: cache}).logits

    torch.testing.assert_close(continue_from(optimized, opt_first), continue_from(reference, ref_first),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("top_k", [3, 6])
def test_moe_top_k_that_is_not_a_power_of_two(top_k):
    config = get_config("tiny-moe", num_experts_per_tok=top_k)
    reference = build_model(config)
    optimized = qwen3_accel.optimize(copy.deepcopy(reference), compile=False)
    ids, mask = left_padded_batch([6, 3], 512, seed=6)
    both(reference, optimized, ids, attention_mask=mask, max_new_tokens=5, **GREEDY)
    logits = torch.randn(5, 8)
    expected = moe.moe_route_reference(logits, top_k, True)
    actual = moe.moe_route_triton(logits, top_k, True)  # Triton's interpreter on the CPU
    torch.testing.assert_close(actual[0], expected[0])
    assert torch.equal(actual[1], expected[1])


def test_triton_kernels_with_compile_on_cpu_are_refused_up_front():
    with pytest.raises(ValueError, match="pass compile=False"):
        qwen3_accel.optimize(build_model("tiny"), kernels="triton", compile=True)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_are_optimized_and_independent(pair, how):
    reference, optimized = pair
    ids, mask = left_padded_batch([5, 8], 512, seed=7)
    both(reference, optimized, ids, attention_mask=mask, max_new_tokens=4, **GREEDY)
    clone = copy.deepcopy(optimized) if how == "deepcopy" else pickle.loads(pickle.dumps(optimized))
    assert isinstance(clone.qwen3_accel, Qwen3Accelerator)
    assert clone.qwen3_accel is not optimized.qwen3_accel
    both(reference, clone, ids, attention_mask=mask, max_new_tokens=6, **GREEDY)
    assert clone.qwen3_accel.runner.cache.current is not optimized.qwen3_accel.runner.cache.current
    weight = "model.layers.0.self_attn.q_proj.weight"
    assert clone.get_parameter(weight).data_ptr() != optimized.get_parameter(weight).data_ptr()
    with torch.no_grad():
        clone.model.layers[0].mlp.down_proj.weight.mul_(2)  # changing the copy leaves the original alone
    both(reference, optimized, ids, attention_mask=mask, max_new_tokens=4, **GREEDY)
    assert set(clone.state_dict()) == set(reference.state_dict())


@pytest.mark.parametrize("flag", ["output_hidden_states", "output_attentions"])
def test_output_flags_set_on_the_config(flag):
    config = get_config("tiny")
    setattr(config, flag, True)
    reference = build_model(config, attn_implementation="eager")
    optimized = qwen3_accel.optimize(copy.deepcopy(reference), compile=False)
    ids, mask = left_padded_batch([6, 4], 512, seed=8)
    with torch.no_grad():
        expected, actual = reference(ids, attention_mask=mask), optimized(ids, attention_mask=mask)
    name = "hidden_states" if flag == "output_hidden_states" else "attentions"
    assert getattr(actual, name) is not None and len(getattr(actual, name)) == len(getattr(expected, name))
    kwargs = dict(attention_mask=mask, max_new_tokens=4, **GREEDY)
    both(reference, optimized, ids, **kwargs)


def test_moe_router_logits_set_on_the_config():
    config = get_config("tiny-moe", output_router_logits=True)
    reference = build_model(config)
    optimized = qwen3_accel.optimize(copy.deepcopy(reference), compile=False)
    ids, mask = left_padded_batch([6, 4], 512, seed=9)
    with torch.no_grad():
        expected, actual = reference(ids, attention_mask=mask), optimized(ids, attention_mask=mask)
    assert actual.router_logits is not None
    torch.testing.assert_close(actual.logits, expected.logits)
    # (HF's own generate fails on a padded batch with this flag, in its load-balancing loss: one unpadded prompt)
    both(reference, optimized, ids[:1, -6:], max_new_tokens=4, **GREEDY)


def test_an_activation_other_than_silu_is_refused():
    with pytest.raises(ValueError, match="hidden_act='silu'.*'gelu'"):
        qwen3_accel.optimize(build_model(get_config("tiny", hidden_act="gelu")), compile=False)


def test_empty_prompt_is_a_clear_error(pair):
    _, optimized = pair
    empty = torch.zeros(1, 0, dtype=torch.long)
    with pytest.raises(ValueError, match=r"holds no tokens \(shape \[1, 0\]\)"):
        optimized.generate(empty, max_new_tokens=3, **GREEDY)
    with pytest.raises(ValueError, match=r"holds no tokens \(shape \[1, 0\]\)"), torch.no_grad():
        optimized(empty)


@pytest.mark.parametrize("name", ["tiny", "tiny-moe"])
@pytest.mark.parametrize(
    "request_kwargs",
    [dict(num_beams=3), dict(num_beams=2, num_return_sequences=2), dict(prompt_lookup_num_tokens=3,
     repetition_penalty=1.3), dict(assistant="plain", repetition_penalty=1.3), dict(use_cache=False),
     dict(repetition_penalty=1.3)],
    ids=["beams", "beams-returns", "prompt-lookup", "assisted", "no-cache", "penalty"],
)
def test_hf_loop_requests_run_our_kernels(name, request_kwargs, monkeypatch):
    """Requests that run HF's generation loop (HF's DynamicCache, or ours) still go through our forward and
    kernels, with HF eager's tokens. (Assisted requests come here with a setting our speculative loop does not
    implement, the repetition penalty; tests/test_speculative.py has the ones it does.)"""
    from qwen3_accel import decoder

    reference, optimized = model_pair(name, compile=False)
    kwargs = dict(request_kwargs)
    if kwargs.pop("assistant", None):
        kwargs["assistant_model"] = build_model(name, seed=3)
    ids, mask = left_padded_batch([7] if "assistant_model" in kwargs or "prompt_lookup_num_tokens" in kwargs
                                  else [7, 4], 512, seed=10)
    ids = torch.cat([ids, ids[:, -4:], ids[:, -4:]], dim=1)  # repeats for prompt lookup to find
    mask = torch.cat([mask, torch.ones(mask.shape[0], 8, dtype=mask.dtype)], dim=1)
    expected = reference.generate(ids, attention_mask=mask, max_new_tokens=6, **kwargs, **GREEDY)
    calls = []
    original = decoder.forward_hidden
    monkeypatch.setattr(decoder, "forward_hidden", lambda *a, **k: calls.append(1) or original(*a, **k))
    actual = optimized.generate(ids, attention_mask=mask, max_new_tokens=6, **kwargs, **GREEDY)
    assert torch.equal(actual, expected)
    assert calls, "HF's loop did not run through qwen3_accel's forward"


def test_hf_forward_of_an_optimized_moe_uses_our_experts():
    """Requests our forward hands to HF's (here output_hidden_states, and a training step) run the experts through
    transformers' ExpertsInterface entry "qwen3_accel": fused_moe without gradients, the torch reference with."""
    reference, optimized = model_pair("tiny-moe", compile=False)
    assert optimized.config._experts_implementation == "qwen3_accel"
    ids, mask = left_padded_batch([6, 4], 512, seed=11)
    with torch.no_grad(), torch.profiler.profile() as profile:
        actual = optimized(ids, attention_mask=mask, output_hidden_states=True)
    assert op_calls(profile, "fused_moe") == 2  # one per MoE layer
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask, output_hidden_states=True)
    torch.testing.assert_close(actual.logits, expected.logits, atol=1e-5, rtol=1e-5)
    for model in (reference, optimized):
        model.train()
        model(ids, attention_mask=mask, labels=ids).loss.backward()
    name = "model.layers.1.mlp.experts.down_proj"
    torch.testing.assert_close(optimized.get_parameter(name).grad, reference.get_parameter(name).grad,
                               atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["tiny", "tiny-moe"])
@pytest.mark.parametrize("request_kwargs", [dict(output_hidden_states=True, return_dict_in_generate=True),
                                            dict(cache_implementation="static")], ids=["hidden-states", "hf-static"])
def test_hf_forward_decodes_through_our_attention(name, request_kwargs):
    """Decode steps our forward hands to HF's (extra outputs; HF's StaticCache) attend through transformers'
    AttentionInterface entry "qwen3_accel": decode_attention over HF's cache, one call per layer and step, with HF
    eager's tokens. Prompts stay on SDPA; `disabled()` runs HF's own implementations (no op of ours at all)."""
    reference, optimized = model_pair(name, compile=False)
    assert optimized.config._attn_implementation == "qwen3_accel"
    ids, mask = left_padded_batch([6, 4], 512, seed=12)
    kwargs = dict(attention_mask=mask, max_new_tokens=5, **request_kwargs, **GREEDY)
    expected = reference.generate(ids, **kwargs)
    with torch.profiler.profile() as profile:
        actual = optimized.generate(ids, **kwargs)
    assert op_calls(profile, "decode_attention") == 4 * reference.config.num_hidden_layers  # 4 steps after the prompt
    if isinstance(expected, torch.Tensor):
        assert torch.equal(actual, expected)
    else:
        assert torch.equal(actual.sequences, expected.sequences)
        for step_expected, step_actual in zip(expected.hidden_states, actual.hidden_states):
            torch.testing.assert_close(step_actual, step_expected, atol=1e-5, rtol=1e-5)

    with optimized.qwen3_accel.disabled(), torch.profiler.profile() as profile:
        assert optimized.config._attn_implementation == reference.config._attn_implementation
        assert getattr(optimized.config, "_experts_implementation", None) == \
            getattr(reference.config, "_experts_implementation", None)
        baseline = optimized.generate(ids, **kwargs)
    assert op_calls(profile) == 0
    assert torch.equal(baseline if isinstance(baseline, torch.Tensor) else baseline.sequences,
                       expected if isinstance(expected, torch.Tensor) else expected.sequences)
    assert optimized.config._attn_implementation == "qwen3_accel"


@pytest.mark.parametrize("implementation, options", [("eager", {}), ("sdpa", dict(attention="sdpa")),
                                                     ("sdpa", dict(kernels="torch"))])
def test_hf_attention_is_kept_when_the_user_chose_it(implementation, options):
    model = build_model("tiny", attn_implementation=implementation)
    qwen3_accel.optimize(model, compile=False, **options)
    assert model.config._attn_implementation == implementation


def test_moe_forward_returns_hfs_moe_output_class():
    """HF's Qwen3-MoE returns MoeCausalLMOutputWithPast (router_logits and aux_loss None unless asked for): code
    reading them must not meet an AttributeError on the optimized model."""
    reference, optimized = model_pair("tiny-moe", compile=False)
    ids, mask = left_padded_batch([6, 4], 512, seed=14)
    with torch.no_grad():
        expected, actual = reference(ids, attention_mask=mask), optimized(ids, attention_mask=mask)
    assert type(actual) is type(expected)
    assert actual.router_logits is None and actual.aux_loss is None
    torch.testing.assert_close(actual.logits, expected.logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["tiny", "tiny-moe"])
def test_a_users_fullgraph_compile_of_the_model_works(name):
    """torch.compile(model, fullgraph=True), and generate() compiling HF's forward itself over HF's static cache
    (compile_config=CompileConfig(fullgraph=True)): HF's results, no crash."""
    from transformers import CompileConfig

    torch._dynamo.reset()
    reference, optimized = model_pair(name)
    ids, mask = left_padded_batch([9, 5], 512, seed=15)
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask).logits
        actual = torch.compile(optimized, fullgraph=True)(ids, attention_mask=mask).logits
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    compile_config = CompileConfig(fullgraph=True)
    compile_config._compile_all_devices = True  # HF compiles only on accelerators unless told
    kwargs = dict(attention_mask=mask, max_new_tokens=5, **GREEDY)
    expected_tokens = reference.generate(ids, **kwargs)
    actual_tokens = optimized.generate(ids, cache_implementation="static", compile_config=compile_config, **kwargs)
    assert torch.equal(actual_tokens, expected_tokens)
    # Our persistent cache (as HF's exporter records it from our generate()) is a clear error, not HF's AttributeError.
    ours = optimized.qwen3_accel.runner.cache_for(2, 16)
    with pytest.raises(Exception, match="qwen3_accel's own KV cache cannot be traced"), torch.no_grad():
        torch.compile(optimized, fullgraph=True)(ids, attention_mask=mask, **{CACHE_ARG: ours})


def test_set_experts_implementation_after_optimize_is_honoured():
    """A user's `set_experts_implementation("eager")` after optimize: every path runs HF's experts (none of our
    fused_moe calls), with HF's tokens; setting ours back restores our forward."""
    reference, optimized = model_pair("tiny-moe", compile=False)
    ids, mask = left_padded_batch([6, 4], 512, seed=16)
    optimized.set_experts_implementation("eager")
    with torch.profiler.profile() as profile:
        both(reference, optimized, ids, attention_mask=mask, max_new_tokens=4, **GREEDY)
        with torch.no_grad():
            optimized(ids, attention_mask=mask)
    assert op_calls(profile, "fused_moe") == 0
    optimized.set_experts_implementation("qwen3_accel")
    with torch.profiler.profile() as profile:
        both(reference, optimized, ids, attention_mask=mask, max_new_tokens=4, **GREEDY)
    assert op_calls(profile, "fused_moe") > 0


@pytest.mark.parametrize("request_kwargs", [{}, dict(cache_implementation="static"), dict(num_beams=2)],
                         ids=["fast-loop", "hf-static", "beams"])
def test_a_model_cast_after_optimize_fails_alike_on_every_path(request_kwargs):
    """The same state gets the same answer on every path: the clear error, at the first call after the cast."""
    model = qwen3_accel.optimize(build_model("tiny"), compile=False)
    model.to(torch.float16)
    ids, _ = left_padded_batch([5], 512)
    with pytest.raises(RuntimeError, match="moved or converted after qwen3_accel.optimize"):
        model.generate(ids, max_new_tokens=3, **request_kwargs, **GREEDY)
    with pytest.raises(RuntimeError, match="moved or converted after qwen3_accel.optimize"), torch.no_grad():
        model(ids)
