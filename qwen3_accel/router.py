"""Who serves a call on an optimized model, and why.

generate() goes to one of four paths, in this order of preference:
  FAST_LOOP       our device-side loop (fast_generate.py): greedy or sampled decoding it implements exactly, with
                  an assistant model or prompt lookup drafting for it (speculative.py)
  OUR_CACHE       HF's generate loop, every step on our forward and our persistent cache (other logits
                  processors, stopping criteria, ...)
  HF_CACHE        HF's generate loop on HF's own cache (beam search, assisted decoding, a cache passed in, ...);
                  its steps still reach our forward, which runs HF's DynamicCache through the Cache API
  HF_GENERATE     HF's whole generate, HF's attention and experts too (autocast on)
forward() runs ours, or hands the call to HF's forward for what ours does not cover (`forward_fallbacks`).
The reasons are logged at debug level. `Implementations` tracks which attention and experts implementations HF's
forward uses: HF's own, ours, or what a user or HF's continuous batching chose since.
"""

import logging
import threading
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache, GenerationConfig

from . import compat
from .fast_generate import EOS_SLOTS, FastRequest
from .speculative import HF_LOOKUP_NGRAM, SCHEDULES, assistant_settings

logger = logging.getLogger(__name__)

FAST_LOOP, OUR_CACHE, HF_CACHE, HF_GENERATE = "fast loop", "HF's loop on our cache", "HF's loop on HF's cache", \
    "HF's generate"
_HF_ONLY_FLAGS = ("output_attentions", "output_hidden_states", "output_router_logits")


# Generation settings the fast loop implements; everything else must be at HF's default.
_HANDLED = {
    "max_length", "max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "eos_token_id", "pad_token_id",
    "bos_token_id", "decoder_start_token_id", "transformers_version", "_from_model_config",
    # settings of features the loop never uses (assistants, beams, compile of HF's own loop)
    "num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold",
    "assistant_lookbehind", "target_lookbehind", "length_penalty", "early_stopping", "num_beam_groups",
    "compile_config", "disable_compile", "cache_config", "is_assistant",
}
# generate() arguments that are not generation settings: only these may be given (and not None).
_GENERATE_ARGS = ("logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "synced_gpus",
                  "negative_prompt_ids", "negative_prompt_attention_mask", "custom_generate")
MAX_LOOKUP_NGRAM = 8  # prompt lookup's n-gram sizes our step unrolls (its work grows as n squared); HF's default: 2
# Settings of speculative decoding the fast loop implements (with an assistant_model or prompt lookup).
_SPECULATION = frozenset({"prompt_lookup_num_tokens", "max_matching_ngram_size"})


def fast_path_reason(model, args: tuple, kwargs: dict[str, Any]) -> tuple[str | None, FastRequest | None]:
    """(None, request) when the fast loop serves this generate() call, else (why not, None)."""
    kwargs = dict(kwargs)
    inputs = args[0] if args else kwargs.pop("input_ids", kwargs.pop("inputs", None))
    if len(args) > 1:
        return "positional arguments after the inputs", None
    streamer = kwargs.pop("streamer", None)
    assistant = kwargs.pop("assistant_model", None)
    for name in _GENERATE_ARGS:
        if kwargs.pop(name, None) is not None:
            return name, None
    base = kwargs.get("generation_config") or model.generation_config
    if all(kwargs.get(k) is None and getattr(base, k, None) is None for k in ("max_new_tokens", "max_length")):
        return "no max_new_tokens/max_length: HF's default length rule applies", None
    config, model_kwargs = model._prepare_generation_config(kwargs.pop("generation_config", None), **kwargs)
    attention_mask = model_kwargs.pop("attention_mask", None)
    if model_kwargs:
        return f"model arguments {sorted(model_kwargs)}", None
    lookup = config.prompt_lookup_num_tokens
    speculative = assistant is not None or lookup is not None
    setting = unhandled_setting(config, _SPECULATION if speculative else frozenset())
    if setting is not None:
        return setting, None
    if not isinstance(inputs, torch.Tensor) or inputs.dim() != 2:
        return "no 2-D input_ids tensor", None
    if speculative:
        reason = speculation_reason(model, assistant, config, inputs, streamer)
        if reason is not None:
            return reason, None
    if config.max_new_tokens is not None and config.max_new_tokens < 1:
        return f"max_new_tokens={config.max_new_tokens}", None
    if config.max_new_tokens is None and (config.max_length is None or config.max_length <= inputs.shape[1]):
        return f"max_length={config.max_length} does not exceed the prompt", None
    eos_ids = config.eos_token_id
    eos_ids = [] if eos_ids is None else [eos_ids] if isinstance(eos_ids, int) else list(eos_ids)
    if len(eos_ids) > EOS_SLOTS:
        return f"{len(eos_ids)} eos ids (the fast loop holds {EOS_SLOTS})", None
    if attention_mask is None:
        if config.pad_token_id is not None and bool((inputs == config.pad_token_id).any()):
            return "no attention_mask and the prompt holds the pad token (HF infers the mask from it)", None
    elif attention_mask.dim() != 2 or attention_mask.shape != inputs.shape:
        return "an attention_mask that is not [batch, prompt length]", None
    elif not bool(attention_mask[:, -1].bool().all()):
        return "a right-padded attention_mask", None
    return None, FastRequest(config, inputs, attention_mask, streamer, eos_ids, assistant, lookup)


def speculation_reason(model, assistant, config: GenerationConfig, inputs: torch.Tensor, streamer) -> str | None:
    """Why HF's assisted loop must serve this request, or None when ours drafts and verifies it."""
    if assistant is not None and config.prompt_lookup_num_tokens is not None:
        return "assistant_model and prompt_lookup_num_tokens together"
    if streamer is not None and inputs.shape[0] > 1:
        return "a streamer with more than one sequence"
    if config.prompt_lookup_num_tokens is not None:
        ngram = config.max_matching_ngram_size or HF_LOOKUP_NGRAM
        if config.prompt_lookup_num_tokens < 1 or ngram < 1:
            return "prompt_lookup_num_tokens or max_matching_ngram_size below 1"
        if ngram > MAX_LOOKUP_NGRAM:
            return f"max_matching_ngram_size above {MAX_LOOKUP_NGRAM} (ours compares n-grams in a compiled step)"
        return None
    from .optimize import SUPPORTED_CLASSES  # (optimize imports this module)

    if not isinstance(assistant, SUPPORTED_CLASSES):
        return f"an assistant model of class {type(assistant).__name__} (ours drafts with Qwen3 models)"
    if assistant.config.vocab_size != model.config.vocab_size:
        return (f"an assistant with another vocabulary ({assistant.config.vocab_size} tokens, the model "
                f"{model.config.vocab_size})")
    if assistant.lm_head.weight.device != model.lm_head.weight.device:
        return "an assistant on another device"
    k, schedule, _ = assistant_settings(assistant.generation_config)
    if schedule not in SCHEDULES:
        return f"num_assistant_tokens_schedule={schedule!r}"
    if k < 1:
        return f"num_assistant_tokens={k}"
    return None


def unhandled_setting(config: GenerationConfig, ignored: frozenset = frozenset()) -> str | None:
    """The first generation setting away from HF's default that our loops do not implement, as `key=value` (None
    is a setting left unset: HF's default applies)."""
    defaults = config._get_default_generation_params()
    for key, value in config.to_dict().items():
        if key in _HANDLED or key in ignored or value is None or value == defaults.get(key) or (
                key not in defaults and value in (False, {}, [])):
            continue
        return f"{key}={value!r}"
    return None


# Cache settings continuous batching has no use for (its paged cache is the cache): `transformers serve` sets
# use_cache=False in every continuous-batching request's config.
_BATCHING_IGNORED = frozenset({"use_cache", "cache_implementation"})
# ContinuousBatchingConfig fields our engine does not implement, with the value that asks for nothing.
_BATCHING_UNHANDLED = {"return_logprobs": False, "per_request_processors": False, "cpu_offload_space": 0.0}


def batching_reason(model, generation_config: GenerationConfig, cb_config: Any, *, implementations:
                    "Implementations", tensor_parallel: bool) -> str | None:
    """Why HF's continuous batching must serve `init_continuous_batching(generation_config, cb_config)`, or None
    when our engine (serving/) does."""
    if tensor_parallel:
        return "tensor parallelism (our engine runs on one device)"
    changed = implementations.changed()
    if changed is not None:
        return changed
    setting = unhandled_setting(generation_config, _BATCHING_IGNORED)
    if setting is not None:
        return setting
    for name, nothing in _BATCHING_UNHANDLED.items():
        value = getattr(cb_config, name, nothing)
        if value not in (nothing, None):
            return f"continuous_batching_config.{name}={value!r}"
    return None


@dataclass(frozen=True)
class GenerateRoute:
    """Where a generate() call goes: `path` (one of the four above), why not a faster one, and what it needs."""

    path: str
    reason: str | None = None
    request: FastRequest | None = None  # FAST_LOOP
    config: GenerationConfig | None = None  # OUR_CACHE, HF_CACHE: HF's effective settings
    cache_shape: tuple[int, int] | None = None  # OUR_CACHE: (sequences, prompt + new tokens) to size the cache for


def route_generate(model, args: tuple, kwargs: dict[str, Any], *, fast_loop: bool,
                   implementations: "Implementations", autocast: bool) -> GenerateRoute:
    """The path for `model.generate(*args, **kwargs)` (fast_loop: whether the option allows the fast loop)."""
    if autocast:
        return GenerateRoute(HF_GENERATE, "autocast is on: our kernels and cache run the model dtype")
    changed = implementations.changed()
    fast_reason = changed if fast_loop else "fast_generate=False"
    if fast_loop and changed is None:
        fast_reason, request = fast_path_reason(model, args, kwargs)
        if request is not None:
            return GenerateRoute(FAST_LOOP, request=request)
    others = {k: v for k, v in kwargs.items() if k != "generation_config"}
    config = model._prepare_generation_config(kwargs.get("generation_config"), **others)[0]
    reason = hf_cache_reason(model, args, kwargs, config) or changed
    if reason is not None:
        if fast_reason is not None and fast_reason != reason:
            reason = f"{reason}; not the fast loop: {fast_reason}"
        return GenerateRoute(HF_CACHE, reason, config=config)
    inputs = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
    batch, prompt_len = inputs.shape[:2]
    # max_length is a total length when the user set it, and a count of new tokens when it is HF's default (in
    # recent transformers): size for the larger reading.
    new_tokens = config.max_new_tokens if config.max_new_tokens is not None else config.max_length
    return GenerateRoute(OUR_CACHE, fast_reason, config=config,
                         cache_shape=(batch * (config.num_return_sequences or 1), prompt_len + new_tokens))


def hf_cache_reason(model, args: tuple, kwargs: dict[str, Any], config: GenerationConfig) -> str | None:
    """Why HF's loop must keep its own cache for this call, or None when ours serves it."""
    inputs = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
    if not isinstance(inputs, torch.Tensor) or inputs.dim() != 2:
        return "no 2-D input_ids tensor (e.g. inputs_embeds only)"
    if any(kwargs.get(name) is not None for name in compat.CACHE_ARG_NAMES):
        return "a cache was passed in"
    if (config.num_beams or 1) > 1:
        return "beam search"
    if kwargs.get("assistant_model") is not None or config.prompt_lookup_num_tokens is not None:
        return "assisted decoding (HF's loop)"
    if config.cache_implementation is not None:
        return f"cache_implementation={config.cache_implementation!r}"
    if config.use_cache is False:
        return "use_cache=False"
    for flag in _HF_ONLY_FLAGS:
        if getattr(config, flag, False) or getattr(model.config, flag, False):
            return flag
    return None


def forward_fallbacks(model, kwargs: dict[str, Any], *, labels, attention_mask, position_ids, tokens, cache, past: int,
                      ours: bool, rope_positions: int, implementations: "Implementations") -> list[str]:
    """What in a forward call only HF's forward serves (empty: ours runs it). `ours`: the cache is our own, which
    HF's forward cannot run, so anything listed is a clear error instead."""
    config = model.config
    reasons = [flag for flag in _HF_ONLY_FLAGS if kwargs.get(flag, getattr(config, flag, False))]
    if labels is not None:
        reasons.append("labels")
    mask_2d = attention_mask is None or (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2)
    if not mask_2d:  # 4-D, or the per-layer-type dict HF's generate prepares for its static caches
        reasons.append("a prepared attention mask")
    if torch.is_grad_enabled() and model.lm_head.weight.requires_grad:
        reasons.append("gradients")
    changed = implementations.changed()
    if changed:
        reasons.append(changed)
    if position_ids is not None and not (ours and tokens is not None and tokens.shape[1] == 1 and past > 0):
        # (decode steps on our cache come from generate, which bounds them by the model's positions)
        if int(position_ids.max()) >= rope_positions:
            reasons.append(f"position ids past the model's {rope_positions} positions")
    if reasons and ours:
        raise ValueError(f"qwen3_accel's own cache cannot serve {reasons}: run without a cache or with HF's")
    # HF's DynamicCache (beam search, assisted decoding, a user's own loop) runs on our kernels too, through the
    # Cache API, unless the mask does not cover the cache.
    if type(cache) is DynamicCache and mask_2d and attention_mask is not None and tokens is not None and (
        attention_mask.shape[-1] != past + tokens.shape[1]
    ):
        reasons.append("an attention mask that does not cover the cache")
    return reasons


class Implementations:
    """The attention and (MoE) experts implementations HF's forward uses: HF's own (`hf`, before optimize), ours
    (`ours`, selected by optimize), and whatever a user or HF's continuous batching set since.

    HF's continuous batching (its scheduler, paged cache and paged attention) picks a paged attention from the one
    the model has, which must be HF's (it refuses ours), and restores that one when it stops; `hand_to_batching`
    and `restore_after_batching` make that swap, and while a manager runs, its choice is not taken for a user's.
    """

    def __init__(self, model, hf: dict[str, str | None], lock: threading.RLock):
        self.model, self.hf, self.lock = model, hf, lock
        self.ours = self.current()
        self.logged: set[str] = set()
        self.batching_managers: weakref.WeakSet = weakref.WeakSet()  # HF continuous-batching managers started

    def current(self) -> dict[str, str | None]:
        return current_implementations(self.model)

    def apply(self, implementations: dict[str, str | None]) -> None:
        model = self.model
        if model.config._attn_implementation != implementations["attention"]:
            model.set_attn_implementation(implementations["attention"])
        experts = implementations["experts"]
        if experts is not None and model.config._experts_implementation != experts:
            model.set_experts_implementation(experts)

    def changed(self) -> str | None:
        """Why HF's forward must serve: the user chose another attention or experts implementation after
        `optimize` (`set_attn_implementation` / `set_experts_implementation`), which our forward would ignore."""
        now = self.current()
        if now != self.ours and self.batching_managers:
            self.restore_after_batching()  # a continuous-batching manager that has stopped since
            now = self.current()
        if now == self.ours:
            return None
        hf_attention = self.hf["attention"]
        if (now["experts"] == self.ours["experts"] and now["attention"] in (hf_attention, f"paged|{hf_attention}")
                and self._batching()):
            return None  # a running manager's choice, not the user's: our own path does not read it
        changed = ", ".join(f"{kind}={now[kind]!r}" for kind in now if now[kind] != self.ours[kind])
        reason = f"implementation set after optimize ({changed}): HF's forward honours it"
        if reason not in self.logged:
            self.logged.add(reason)
            logger.info("qwen3_accel: %s", reason)
        return reason

    def _batching(self) -> bool:
        return any(manager.is_running() for manager in self.batching_managers)

    def hand_to_batching(self) -> None:
        """HF's attention on the model, for HF's continuous-batching manager to pick its paged version of."""
        with self.lock:
            if self.current()["attention"] == self.ours["attention"]:
                logger.info("qwen3_accel: continuous batching runs HF's paged attention and forward (our fused MoE "
                            "experts stay in); generate() returns to our kernels once its managers stop")
                self.apply({**self.ours, "attention": self.hf["attention"]})

    def restore_after_batching(self) -> None:
        """Our attention again once no continuous-batching manager runs (HF restored its own when each stopped)."""
        with self.lock:
            if self._batching():
                return
            if self.current()["attention"] == self.hf["attention"]:
                self.apply(self.ours)


def current_implementations(model) -> dict[str, str | None]:
    """The attention and experts implementations HF's forward uses now."""
    return {"attention": model.config._attn_implementation,
            "experts": getattr(model.config, "_experts_implementation", None)}
