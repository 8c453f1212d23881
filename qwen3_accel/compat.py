"""The torch / transformers releases we support, and the names that differ between them.

The range below is what CI runs (`.ci/run`: one leg on the oldest pins, one on the newest releases). Outside it,
`import qwen3_accel` raises; a transformers 5.x newer than the newest tested minor release only warns, because
most releases change nothing we touch and the user should not be blocked, only told.
"""

import dataclasses
import inspect
import warnings

import torch
import transformers
from packaging.version import Version

MIN_TORCH = Version("2.11")
MIN_TRANSFORMERS = Version("5.17")
# The newest minor release CI has run. 5.25.0 (out by 2026-12-02) requires kernels >= 0.19.1, which the package
# index CI installs from does not have yet (0.17.2 at most), so pip resolves 5.24 there. Installed without its
# dependencies, 5.25 passed our suite except what loads through from_pretrained (HF's set_use_kernels raises for
# the missing kernels package) and the untested-version warning.
NEWEST_TESTED_TRANSFORMERS = Version("5.24")
NEXT_MAJOR_TRANSFORMERS = Version("6.0")


def supported_range() -> str:
    return (
        f"torch>={MIN_TORCH}, transformers>={MIN_TRANSFORMERS},<{NEXT_MAJOR_TRANSFORMERS} "
        f"(tested up to {NEWEST_TESTED_TRANSFORMERS}.x)"
    )


def check_versions(
    torch_version: str = torch.__version__, transformers_version: str = transformers.__version__
) -> None:
    """Raise ImportError outside the supported range; warn on a transformers minor release newer than tested."""
    installed = f"installed: torch {torch_version}, transformers {transformers_version}"
    torch_version = Version(Version(str(torch_version)).base_version)
    tf_version = Version(Version(transformers_version).base_version)
    if torch_version < MIN_TORCH or not MIN_TRANSFORMERS <= tf_version < NEXT_MAJOR_TRANSFORMERS:
        raise ImportError(f"qwen3_accel supports {supported_range()}; {installed}")
    if (tf_version.major, tf_version.minor) > (NEWEST_TESTED_TRANSFORMERS.major, NEWEST_TESTED_TRANSFORMERS.minor):
        warnings.warn(
            f"qwen3_accel is tested with transformers {MIN_TRANSFORMERS} to {NEWEST_TESTED_TRANSFORMERS}.x; "
            f"{installed}. It should work; please report anything that does not.",
            stacklevel=3,
        )


check_versions()  # before the imports below, which an unsupported release may not have

from transformers import ContinuousBatchingConfig, Qwen3ForCausalLM  # noqa: E402
from transformers.modeling_outputs import CausalLMOutputWithPast, MoeCausalLMOutputWithPast  # noqa: E402

# transformers 5.24 renamed the cache argument of `generate`, `prepare_inputs_for_generation` and the models'
# `forward` from `past_key_values` to `cache` (the old name warns until 5.40), and the output field with it.
CACHE_ARG = "cache" if "cache" in inspect.signature(Qwen3ForCausalLM.forward).parameters else "past_key_values"
CACHE_ARG_NAMES = ("cache", "past_key_values")
_OUTPUT_FIELDS = {field.name for field in dataclasses.fields(CausalLMOutputWithPast)}
OUTPUT_CACHE_FIELD = "cache" if "cache" in _OUTPUT_FIELDS else "past_key_values"
# ContinuousBatchingConfig's tokens per cache page: `block_size` until 5.24 renamed it `page_size`.
_CB_FIELDS = {field.name for field in dataclasses.fields(ContinuousBatchingConfig)}
CB_PAGE_FIELD = "page_size" if "page_size" in _CB_FIELDS else "block_size"


def causal_lm_output(logits: torch.Tensor, cache, moe: bool = False) -> CausalLMOutputWithPast:
    """HF's output class for the model (`MoeCausalLMOutputWithPast` for Qwen3-MoE: `router_logits` and `aux_loss`
    None, as HF gives them unless asked for) with the cache under this release's field name."""
    output_class = MoeCausalLMOutputWithPast if moe else CausalLMOutputWithPast
    return output_class(logits=logits, **{OUTPUT_CACHE_FIELD: cache})


def pop_cache_arg(kwargs: dict) -> object:
    """Remove and return the cache a caller passed under either name; both names with different caches is an error."""
    # A plain loop: Dynamo cannot trace a walrus inside a comprehension (a user's torch.compile of the model).
    caches = []
    for name in CACHE_ARG_NAMES:
        cache = kwargs.pop(name, None)
        if cache is not None:
            caches.append(cache)
    if len(caches) == 2 and caches[0] is not caches[1]:
        raise ValueError("got two different caches, as `cache` and as `past_key_values`; pass one")
    return caches[0] if caches else None
