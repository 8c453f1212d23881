"""Across the supported transformers range: the version check, the cache argument under either name, HF's loop
on our cache, and every private transformers name we rely on (listed in docs/ARCHITECTURE.md)."""

import warnings

import pytest
import torch
import transformers
from packaging.version import Version
from transformers import GenerationConfig
from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention, Qwen3RMSNorm

from conftest import left_padded_batch, model_pair
from qwen3_accel import compat
from qwen3_accel.cache import Qwen3StaticCache

GREEDY = dict(do_sample=False, pad_token_id=0)


@pytest.fixture(scope="module")
def pair():
    return model_pair("tiny", compile=False)


@pytest.mark.parametrize(
    "torch_version,tf_version,outcome",
    [
        ("2.11.0", "5.17.0", None),
        ("2.14.1+cpu", "5.24.0", None),
        ("2.10.1", "5.20.0", "error"),
        ("2.13.0", "5.16.1", "error"),
        ("2.13.0", "6.0.0", "error"),
        ("2.13.0", "5.99.0.dev0", "warning"),
    ],
)
def test_version_check(torch_version, tf_version, outcome):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if outcome == "error":
            with pytest.raises(ImportError) as error:
                compat.check_versions(torch_version, tf_version)
            message = str(error.value)
            assert f"torch {torch_version}" in message and f"transformers {tf_version}" in message
            assert "transformers>=5.17,<6.0" in message and "torch>=2.11" in message
        else:
            compat.check_versions(torch_version, tf_version)
    assert any("tested with transformers" in str(w.message) for w in caught) == (outcome == "warning")


def test_installed_versions_are_supported_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compat.check_versions()


def test_cache_argument_name_matches_the_installed_transformers():
    new_name = Version(transformers.__version__) >= Version("5.24.0.dev0")
    assert compat.CACHE_ARG == ("cache" if new_name else "past_key_values")
    assert compat.OUTPUT_CACHE_FIELD == compat.CACHE_ARG


@pytest.mark.parametrize("request_kwargs", [dict(repetition_penalty=1.3), dict(no_repeat_ngram_size=2)],
                         ids=["repetition_penalty", "no_repeat_ngram_size"])
def test_hf_loop_decodes_on_our_cache(pair, request_kwargs):
    """A request the fast loop does not serve runs HF's loop, whose every step must reach our forward with our
    persistent cache: one prefill, then one compiled-step decode per new token, on the same cache object."""
    reference, optimized = pair
    acc = optimized.qwen3_accel
    ids, mask = left_padded_batch([6, 9], 512, seed=13)
    kwargs = dict(attention_mask=mask, max_new_tokens=7, **request_kwargs, **GREEDY)
    calls = {"prefill": 0, "decode": 0}
    runner = acc.runner
    prefill, decode = runner.prefill, runner.decode

    def counting(name, fn):
        def wrapped(*args, **kw):
            calls[name] += 1
            return fn(*args, **kw)
        return wrapped

    runner.prefill, runner.decode = counting("prefill", prefill), counting("decode", decode)
    try:
        actual = optimized.generate(ids, **kwargs)
    finally:
        del runner.prefill, runner.decode
    assert torch.equal(actual, reference.generate(ids, **kwargs))
    assert calls == {"prefill": 1, "decode": 6}
    cache = runner.cache.current
    assert isinstance(cache, Qwen3StaticCache) and cache.get_seq_length() == ids.shape[1] + 6


# ------------------------------------------------------------------ private transformers names we rely on
def test_private_prepare_generation_config(pair):
    """`PreTrainedModel._prepare_generation_config(config, **kwargs) -> (config, model_kwargs)`: the settings
    generate() will use, HF's defaults filled in, and the arguments that are not generation settings."""
    _, optimized = pair
    config, model_kwargs = optimized._prepare_generation_config(None, max_new_tokens=5, attention_mask="mask")
    assert isinstance(config, GenerationConfig) and config.max_new_tokens == 5
    assert model_kwargs == {"attention_mask": "mask"}
    config, _ = optimized._prepare_generation_config(GenerationConfig(do_sample=True, top_k=3))
    assert config.do_sample and config.top_k == 3


def test_private_default_generation_params():
    """`GenerationConfig._get_default_generation_params() -> dict`: HF's default for each setting."""
    defaults = GenerationConfig()._get_default_generation_params()
    assert isinstance(defaults, dict)
    assert defaults.get("repetition_penalty") == 1.0 and defaults.get("num_beams") == 1


def test_hf_module_attributes_we_read(pair):
    """Attributes of HF's Qwen3 modules the patches read (not private by name, but not documented API either)."""
    _, optimized = pair
    attn = optimized.model.layers[0].self_attn
    assert isinstance(attn, Qwen3Attention)
    assert attn.scaling == attn.head_dim**-0.5
    assert isinstance(attn.q_norm, Qwen3RMSNorm) and attn.q_norm.variance_epsilon == optimized.config.rms_norm_eps
    assert optimized.model.rotary_emb.inv_freq.shape == (attn.head_dim // 2,)


def test_continuous_batching_types_and_config_we_use():
    """HF's continuous-batching output type and config fields the manager builds and reads (serving/manager.py)."""
    import dataclasses

    from transformers import ContinuousBatchingConfig
    from transformers.generation.continuous_batching import RequestStatus
    from transformers.generation.continuous_batching.requests import GenerationOutput

    from qwen3_accel.compat import CB_PAGE_FIELD

    fields = {f.name for f in dataclasses.fields(GenerationOutput)}
    assert {"request_id", "prompt_ids", "generated_tokens", "error", "status", "created_time", "lifespan",
            "timestamps"} <= fields
    assert RequestStatus.DECODING < RequestStatus.FINISHED < RequestStatus.FAILED  # is_finished: status >= FINISHED
    assert GenerationOutput("r", status=RequestStatus.FAILED).is_finished()
    assert not GenerationOutput("r", status=RequestStatus.DECODING).is_finished()
    config = ContinuousBatchingConfig(num_blocks=3, max_batch_tokens=64, max_requests_per_batch=4,
                                      max_memory_percent=0.5, **{CB_PAGE_FIELD: 32})
    assert (config.num_blocks, getattr(config, CB_PAGE_FIELD), config.max_batch_tokens, config.max_requests_per_batch,
            config.max_memory_percent, config.max_queue_size) == (3, 32, 64, 4, 0.5, 0)
    # What router.batching_reason reads (a request for any of them goes to HF's manager), at their defaults.
    assert (config.return_logprobs, config.per_request_processors, config.cpu_offload_space) == (False, False, 0.0)


def test_workload_hints_and_experts_interface_we_use():
    """HF's WorkloadHints (bench_serve builds them positionally, the manager reads their fields) and the experts
    interface our MoE patch registers in; neither is exported at transformers' top level."""
    from transformers.generation.continuous_batching.utils import WorkloadHints
    from transformers.integrations.moe import ExpertsInterface

    from qwen3_accel.patches.qwen3_moe import EXPERTS_IMPLEMENTATION, experts_forward

    hints = WorkloadHints(100, 20, 3)
    assert (hints.max_prompt_length, hints.max_generated_length, hints.num_requests) == (100, 20, 3)
    assert ExpertsInterface()[EXPERTS_IMPLEMENTATION] is experts_forward
