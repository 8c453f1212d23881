"""`optimize()`: check the model, then wire our forward and generate onto it.

The model object stays the user's HF model. Instance attributes change: `forward` (ours, which hands anything it
does not cover to HF's original), `generate` (our fast loop, or HF's generate with our persistent cache passed in,
when the request is one they serve), and `generate_batch` / `init_continuous_batching` (HF's continuous batching,
set up for the optimized model). Everything else lives on a `Qwen3Accelerator` stored as `model.qwen3_accel`,
which wires together the runner (runner.py: weights, kernels, cache, compiled steps) and the router (router.py:
who serves each call).
"""

import contextlib
import functools
import logging
import os
import threading
import types
import warnings
from dataclasses import dataclass, replace
from typing import Any

import torch
from transformers import Cache, DynamicCache, GenerationConfig, Qwen3ForCausalLM, Qwen3MoeForCausalLM
from transformers.utils import ModelOutput

from . import compat, decoder, parallel, quantize, router
from .cache import Qwen3StaticCache
from .custom_ops import KERNEL_MODES
from .fast_generate import run_fast_generate
from .graphs import outside_inference_mode
from .patches import qwen3 as dense
from .patches import qwen3_moe
from .runner import ModelRunner
from .serving.manager import BatchingManager
from .speculative import HF_LOOKUP_NGRAM, Drafter, assistant_settings, run_speculative

logger = logging.getLogger(__name__)

# Which patch module serves each supported HF class: its `prepare(model, our_attention)` selects our entries in
# transformers' attention (and experts) interfaces for HF's own forward.
PATCHES = {Qwen3ForCausalLM: dense, Qwen3MoeForCausalLM: qwen3_moe}
SUPPORTED_CLASSES = tuple(PATCHES)
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ASSISTANTS_LOCK = threading.Lock()  # held while an assistant model is optimized for speculative decoding


@dataclass(frozen=True)
class OptimizeOptions:
    """How `optimize` treats a model.

    kernels: "auto" (Triton on CUDA, torch on CPU), "triton" (also on CPU, under TRITON_INTERPRET=1) or "torch".
        Defaults to the environment variable QWEN3_ACCEL_KERNELS, else "auto".
    attention: decode attention backend: "auto" (the split-KV Triton kernel on CUDA, masked SDPA on CPU unless
        kernels="triton"), "triton" or "sdpa".
    compile: compile the decode step with torch.compile(mode="reduce-overhead", fullgraph=True);
        False keeps every patch but runs eagerly.
    fast_generate: serve common generate() requests (greedy; temperature/top-k/top-p sampling; eos; streamer) with
        a device-side decode loop instead of HF's per-token Python loop (see fast_generate.py).
    weights: None keeps the projections as they are (the model dtype, or an FP8 checkpoint as transformers loaded
        it); "int8" (per output row), "int4" (asymmetric, groups of 128 along the input) or "fp8" (e4m3, one scale
        per 128x128 block: transformers' fine-grained FP8 format) quantizes the decoder layers' projections in
        place, weight-only (activations stay in the model dtype). Embeddings, norms, the router and the LM head are
        kept. Qwen3-MoE's experts too: transformers' FP8Experts for "fp8", our QuantizedExperts for int8/int4.
    decode_linear: how decode steps of up to 4 rows run their projections: through `decode_linear`, one launch
        each with the RMSNorm, SiLU·mul and residual add folded in, or cuBLAS with separate norm/activation kernels.
        "auto": the first for quantized weights, the second for weights in the model dtype (until GPU measurements
        place a model-size bound, custom_ops/linear.py DECODE_LINEAR_DENSE_MAX_HIDDEN); "always"; "never".
    max_batch_size, max_cache_len: size of the persistent KV cache. None (default) sizes it to the first
        generate() call (length rounded up to 256 slots) and grows it, with a warning, when a later call needs
        more; growth re-allocates, so CUDA graphs are recorded again. An explicit value is a hard limit: a call
        that needs more raises ValueError.
    """

    kernels: str | None = None
    compile: bool = True
    max_batch_size: int | None = None
    max_cache_len: int | None = None
    attention: str = "auto"
    fast_generate: bool = True
    weights: str | None = None
    decode_linear: str = "auto"


def optimize(model: torch.nn.Module, options: OptimizeOptions | None = None, **kwargs: Any) -> torch.nn.Module:
    """Make a HF Qwen3 causal LM fast in place and return it; `generate()` and `forward()` keep their API.

    Keyword arguments are the fields of `OptimizeOptions`. Calling it again on the same model is a no-op.
    """
    options = replace(options or OptimizeOptions(), **kwargs)
    options = replace(options, kernels=options.kernels or os.environ.get("QWEN3_ACCEL_KERNELS", "auto"))
    existing = getattr(model, "qwen3_accel", None)
    if isinstance(existing, Qwen3Accelerator):
        if options != existing.options:
            warnings.warn("model is already optimized; the new options are ignored", stacklevel=2)
        return model
    _check_model(model)
    quantize.check_weights_option(model, options.weights)
    if options.decode_linear not in decoder.DECODE_LINEAR_MODES:
        raise ValueError(f"decode_linear={options.decode_linear!r} is not supported; choose one of "
                         f"{decoder.DECODE_LINEAR_MODES}")
    if options.compile and options.kernels == "triton" and next(model.parameters()).device.type != "cuda":
        raise ValueError(
            "kernels='triton' on the CPU runs Triton's interpreter, which torch.compile cannot trace: pass "
            "compile=False with it (the CPU's compiled path uses kernels='auto')"
        )
    if (options.weights or quantize.is_quantized(model)) and parallel.describe(model).world_size > 1:
        raise ValueError("quantized weights under tensor parallelism are not supported in this version")
    with outside_inference_mode():
        if options.weights:
            quantize.quantize_model(model, options.weights)
        model.qwen3_accel = Qwen3Accelerator(model, options)
    if model.qwen3_accel.device.type == "cpu":
        _note_cpu_speed()
    return model


@functools.cache
def _note_cpu_speed() -> None:
    """Say once per process what a CPU user gets (measured: README "Main command", docs/BENCHMARKS.md)."""
    logger.warning(
        "qwen3_accel on the CPU runs the torch references of its ops (compiled by Inductor): HF's outputs and API, "
        "but about HF eager's decode speed, not faster (0.8-1.0x on the tiny model, 2026-12-02); the kernels and "
        "CUDA graphs that make it fast need a CUDA GPU"
    )


def _check_model(model: torch.nn.Module) -> None:
    if not isinstance(model, SUPPORTED_CLASSES):
        names = ", ".join(cls.__name__ for cls in SUPPORTED_CLASSES)
        raise TypeError(f"qwen3_accel.optimize supports {names}; got {type(model).__name__}")
    quantize.check_quantized(model)
    quantized = {id(p) for m in quantize.quantized_modules(model) for p in m.parameters()}
    dtypes = {p.dtype for p in model.parameters() if id(p) not in quantized}
    if len(dtypes) != 1 or next(iter(dtypes)) not in SUPPORTED_DTYPES:
        raise TypeError(
            f"qwen3_accel.optimize needs all weights in one of {[str(d) for d in SUPPORTED_DTYPES]} (projections "
            f"may be quantized: weights='int8'|'int4'|'fp8'); got {sorted(str(d) for d in dtypes)}"
        )
    device_map = getattr(model, "hf_device_map", None) or {}
    if len({str(d) for d in device_map.values()}) > 1 or any(str(d) in ("disk", "meta") for d in device_map.values()):
        raise ValueError(
            "qwen3_accel.optimize needs the whole model on one device; accelerate placed it on "
            f"{sorted({str(d) for d in device_map.values()})} (device_map={device_map!r}). Load it with "
            "device_map='cuda' (or one device), without offloading"
        )
    devices = {p.device for p in model.parameters()}
    if len(devices) != 1 or next(iter(devices)).type not in ("cuda", "cpu"):
        raise ValueError(
            f"qwen3_accel.optimize needs the whole model on one CUDA device (or the CPU); got {sorted(map(str, devices))}"
        )
    config = model.config
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or []) or (
        getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None)
    ):
        raise ValueError("qwen3_accel.optimize supports full attention only; this config enables sliding windows")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ValueError(
            f"qwen3_accel.optimize supports hidden_act='silu' (Qwen3's); this config has {config.hidden_act!r}"
        )


def _require_tokens(tokens: Any) -> None:
    """HF fails deep inside on an empty prompt; say what is wrong instead."""
    if isinstance(tokens, torch.Tensor) and tokens.dim() >= 2 and tokens.shape[1] == 0:
        raise ValueError(f"the input holds no tokens (shape {list(tokens.shape)}); give at least one per sequence")


class Qwen3Accelerator:
    """One optimized model: its runner (runner.py) and the dispatch of each call (router.py) to it or to HF.

    `copy.deepcopy` and `pickle` of the model carry only the options: the copy rebuilds its own state (fused
    weights, kernels, cache, graphs) on its first call, so it is optimized and independent of the original.

    Persistent tensors (fused weights, RoPE table, cache, the fast loop's buffers) are allocated outside inference
    mode even when a call comes inside `torch.inference_mode()` (see graphs.outside_inference_mode).

    One lock serializes the calls that use the persistent cache or change the model's state (threads of a server
    sharing one model): they would otherwise write into each other's cache rows. Requests on HF's own cache run
    concurrently, as they do on a plain HF model.
    """

    def __init__(self, model: Qwen3ForCausalLM | Qwen3MoeForCausalLM, options: OptimizeOptions):
        self.model = model
        self.options = options
        self.hf_forward = model.forward
        self.hf_generate = model.generate
        self.hf_implementations = router.current_implementations(model)  # before _build selects ours
        self._lock = threading.RLock()
        self._setup()
        model.forward = self.forward
        model.generate = self.generate
        model.generate_batch = self.generate_batch
        model.init_continuous_batching = self.init_continuous_batching
        model.destroy_cached_continuous_batching_manager = self.destroy_cached_continuous_batching_manager
        self.kept_manager: BatchingManager | None = None

    def _setup(self) -> None:
        with outside_inference_mode():
            self._build()

    def _build(self) -> None:
        model, options = self.model, self.options
        self.tp = parallel.describe(model)  # before any change: a layout we do not support leaves the model as is
        self.tp.check_same_request("optimize", options)
        self.device = model.lm_head.weight.device
        self.moe = isinstance(model, Qwen3MoeForCausalLM)
        self.runner = ModelRunner(model, options, self.tp)
        # HF's own forward (requests ours hands it) attends through our decode kernel, unless the user chose an
        # implementation other than HF's default or asked for SDPA / the torch references.
        our_attention = (self.hf_implementations["attention"] == "sdpa" and options.attention != "sdpa"
                         and options.kernels != "torch")
        next(p for cls, p in PATCHES.items() if isinstance(model, cls)).prepare(model, our_attention)
        quantize.use_our_fp8_forward(model)
        self.implementations = router.Implementations(model, self.hf_implementations, self._lock)
        self._ready = True

    # --------------------------------------------------------------------------- continuous batching
    # Our engine (serving/: paged cache, scheduler, our kernels) behind HF's manager API; what it does not cover
    # (router.batching_reason) goes to HF's continuous batching on HF's attention (router.Implementations hands it
    # over), MoE experts still fused.
    def generate_batch(self, *args: Any, **kwargs: Any):
        """HF's `generate_batch` (HF's `GenerationOutput` per request): HF's own driver over the manager
        `init_continuous_batching` returns."""
        self._ensure_ready()
        try:
            return type(self.model).generate_batch(self.model, *args, **kwargs)
        finally:
            self.implementations.restore_after_batching()

    def init_continuous_batching(self, generation_config: GenerationConfig | None = None,
                                 continuous_batching_config: Any = None, workload_hints: Any = None):
        """A continuous-batching manager with HF's methods (the one `transformers serve --continuous-batching`
        drives): ours (serving.manager.BatchingManager) unless the request needs HF's (logged with the reason)."""
        self._ensure_ready()
        config = generation_config if generation_config is not None else self.model.generation_config
        reason = router.batching_reason(self.model, config, continuous_batching_config,
                                        implementations=self.implementations, tensor_parallel=self.tp.world_size > 1)
        if reason is None:
            kept = self.kept_manager
            if kept is not None:  # stop(keep_for_next_session=True), as HF caches its manager
                if kept.generation_config.to_dict() != config.to_dict():
                    logger.warning("qwen3_accel: returning the continuous-batching manager kept from the last "
                                   "session, with its own generation config (as HF does); destroy it first "
                                   "(destroy_cached_continuous_batching_manager) for new settings")
                return kept
            logger.info("qwen3_accel: continuous batching on qwen3_accel's engine (paged KV cache, our kernels)")
            return BatchingManager(self.model, config, continuous_batching_config, workload_hints,
                                   on_stop=self._manager_stopped)
        logger.info("qwen3_accel: continuous batching on HF's engine and attention: %s", reason)
        self.implementations.hand_to_batching()
        manager = type(self.model).init_continuous_batching(self.model, generation_config,
                                                            continuous_batching_config, workload_hints)
        self.implementations.batching_managers.add(manager)
        return manager

    def _manager_stopped(self, manager: BatchingManager, keep: bool) -> None:
        if keep:
            self.kept_manager = manager
        elif self.kept_manager is manager:
            self.kept_manager = None

    def destroy_cached_continuous_batching_manager(self) -> None:
        """HF's method: release a manager kept by `stop(keep_for_next_session=True)` (ours or HF's)."""
        if self.kept_manager is not None:
            self.kept_manager.destroy()
            self.kept_manager = None
        type(self.model).destroy_cached_continuous_batching_manager(self.model)

    def __getstate__(self) -> dict[str, Any]:
        return {"model": self.model, "options": self.options, "hf_implementations": self.hf_implementations}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # The model is not restored yet: set up on first use.
        self.__dict__.update(state, _ready=False, _lock=threading.RLock(), kept_manager=None)

    def _ensure_ready(self) -> None:
        if not self._ready:
            self.hf_forward = types.MethodType(type(self.model).forward, self.model)
            self.hf_generate = types.MethodType(type(self.model).generate, self.model)
            self._setup()

    def graph_count(self) -> int:
        """Compiled graphs this model holds now (at most 3 per batch bucket of the current cache)."""
        return self.runner.graph_count()

    def check_not_moved(self) -> None:
        """A model moved or cast since `optimize` is an error, at the first call after it, whichever path serves
        the call (cheap enough for every call)."""
        self.runner.weights.check_not_moved()

    def check_weights_shared(self) -> None:
        """Keep our weights equal to the model's: a parameter replaced since `optimize` (any layer, any projection)
        is copied into ours; a model moved or cast since is an error."""
        self.check_not_moved()
        if self.runner.weights.sync():
            logger.debug("qwen3_accel: a weight was replaced since optimize; copied into the one our forward reads")

    @contextlib.contextmanager
    def disabled(self):
        """Run HF's own forward and generate (same weights, HF's attention and experts implementations) inside this
        block, e.g. for a baseline."""
        self._ensure_ready()
        ours = self.implementations.current()
        self.model.forward, self.model.generate = self.hf_forward, self.hf_generate
        self.implementations.apply(self.hf_implementations)
        try:
            yield self.model
        finally:
            self.model.forward, self.model.generate = self.forward, self.generate
            self.implementations.apply(ours)

    def _under_autocast(self) -> bool:
        """Whether torch.autocast is on for the model's device: then HF's own forward and generate run, with HF's
        attention and experts (our kernels, cache and graphs keep the model dtype; autocast would mix dtypes)."""
        return torch.is_autocast_enabled(self.device.type)

    # -------------------------------------------------------------------------------------- generate
    def generate(self, *args: Any, **kwargs: Any):
        """HF's `generate`: our device-side loop when it covers the request, else HF's loop on our cache or HF's."""
        self._ensure_ready()
        _require_tokens(args[0] if args else kwargs.get("input_ids", kwargs.get("inputs")))
        self.check_not_moved()  # on every path, so that one state gets one answer
        route = router.route_generate(self.model, args, kwargs, fast_loop=self.options.fast_generate,
                                      implementations=self.implementations, autocast=self._under_autocast())
        if route.reason is not None:  # an assisted request HF's loop serves is slow: say so where users look
            level = logging.INFO if route.reason.startswith("assisted decoding") else logging.DEBUG
            logger.log(level, "qwen3_accel: %s (%s)", route.path, route.reason)
        if route.path == router.HF_GENERATE:
            with self._lock, self.disabled():
                return self.hf_generate(*args, **kwargs)
        if route.path == router.FAST_LOOP and route.request.speculative:
            return self._speculate(route.request, args, kwargs)
        if route.path == router.FAST_LOOP:
            with self._lock:
                self.check_weights_shared()  # HF's loop reaches our forward, which checks at its first step
                return run_fast_generate(self.runner, route.request)
        if route.config.do_sample:
            self.tp.share_random_state(self.device)  # tensor parallel: HF's sampler draws the same on every rank
        if route.path == router.HF_CACHE:
            return self.hf_generate(*args, **kwargs)
        with self._lock:
            cache = self.runner.cache_for(*route.cache_shape)
            output = self.hf_generate(*args, **{compat.CACHE_ARG: cache}, **kwargs)
            if isinstance(output, ModelOutput):
                # The persistent cache is reset by the next call: hand the caller a copy of its contents instead.
                for key in [key for key, value in output.items() if value is cache]:
                    output[key] = cache.to_dynamic(self.model.config)
        return output

    def _speculate(self, request, args: tuple, kwargs: dict[str, Any]):
        """Speculative decoding in our loop (speculative.py). An assistant not optimized yet is optimized here, with
        this model's options (its weights stay as they are); one we cannot optimize leaves the request to HF's
        assisted loop, with the reason logged."""
        assistant, helper = request.assistant, None

        def hf_assisted():
            if request.config.do_sample:
                self.tp.share_random_state(self.device)  # tensor parallel: HF's sampler draws the same everywhere
            return self.hf_generate(*args, **kwargs)

        if self.tp.world_size > 1:
            logger.info("qwen3_accel: %s (assisted decoding under tensor parallelism)", router.HF_CACHE)
            return hf_assisted()
        if request.prompt_lookup is not None:
            drafter = Drafter(None, request.prompt_lookup,
                              max_ngram=request.config.max_matching_ngram_size or HF_LOOKUP_NGRAM)
        else:
            with _ASSISTANTS_LOCK:  # two threads' first calls with one assistant optimize it once
                helper = getattr(assistant, "qwen3_accel", None)
                if not isinstance(helper, Qwen3Accelerator):
                    try:
                        optimize(assistant, replace(self.options, weights=None, max_batch_size=None,
                                                    max_cache_len=None))
                    except (TypeError, ValueError) as error:
                        logger.info("qwen3_accel: HF's assisted decoding serves this request: the assistant model "
                                    "cannot be optimized (%s)", error)
                        return hf_assisted()
                    logger.info("qwen3_accel: optimized the assistant model for speculative decoding")
                    helper = assistant.qwen3_accel
            helper._ensure_ready()
            if helper.tp.world_size > 1:
                logger.info("qwen3_accel: %s (an assistant under tensor parallelism)", router.HF_CACHE)
                return hf_assisted()
            k, schedule, confidence = assistant_settings(assistant.generation_config)
            drafter = Drafter(helper.runner, k, schedule, confidence=confidence, assistant=assistant)
        locks = [self._lock] if helper is None or helper is self else sorted([self._lock, helper._lock], key=id)
        with contextlib.ExitStack() as held:
            for lock in locks:
                held.enter_context(lock)
            self.check_weights_shared()
            if helper is not None and helper is not self:
                helper.check_weights_shared()
            return run_speculative(self.runner, drafter, request)

    # --------------------------------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ):
        """`Qwen3ForCausalLM.forward`'s signature; our kernels where they apply, HF's forward otherwise.

        The cache comes as `cache` (transformers >= 5.24) or `past_key_values` (older releases), whichever the
        caller uses.
        """
        self._ensure_ready()
        if cache is not None and not isinstance(cache, Cache):
            # HF continuous batching's paged cache, which is no `Cache` and always comes as `cache` (before 5.24 not
            # the forward's cache argument: its paged attention reads it from the kwargs): HF's forward, as given.
            return self._hf_forward(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache, logits_to_keep=logits_to_keep,
                **kwargs,
            )
        kwargs["cache"] = cache
        cache = compat.pop_cache_arg(kwargs)
        all_args = dict(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, inputs_embeds=inputs_embeds,
            labels=labels, use_cache=use_cache, logits_to_keep=logits_to_keep, **{compat.CACHE_ARG: cache}, **kwargs,
        )
        if torch.compiler.is_compiling():
            # A user's torch.compile of the model (or HF's generate compiling its forward): HF's forward, which Dynamo
            # traces whole (fullgraph too), with our attention and experts ops inside the user's graph. Our own
            # dispatch takes a lock and reads masks and cache lengths on the host, which a graph cannot hold.
            if isinstance(cache, Qwen3StaticCache):  # e.g. inputs recorded from our generate(), then exported
                raise ValueError(
                    "qwen3_accel's own KV cache cannot be traced (torch.compile / torch.export of the model's "
                    "forward): trace with none, or with HF's DynamicCache / StaticCache"
                )
            return self.hf_forward(**all_args)
        stray = sorted(name for name, value in kwargs.items() if isinstance(value, Cache))
        if stray:
            raise ValueError(f"got a cache as {stray}; qwen3_accel's forward takes it as `cache` or `past_key_values`")
        self.check_not_moved()
        use_cache = self.model.config.use_cache if use_cache is None else use_cache
        ours = isinstance(cache, Qwen3StaticCache)
        tokens = input_ids if input_ids is not None else inputs_embeds
        _require_tokens(tokens)
        if cache is not None and not ours and type(cache) is not DynamicCache:
            # Any other cache class (HF's StaticCache, a user's own): HF's forward, which knows it (not every one has
            # a length to ask for).
            return self._hf_forward(**all_args)
        past = cache.get_seq_length() if cache is not None else 0
        if past == 0:  # tensor parallel: every rank must run this sequence (a no-op on one device)
            self.tp.check_same_request("forward", tokens, attention_mask, position_ids, logits_to_keep)
        fallbacks = router.forward_fallbacks(
            self.model, kwargs, labels=labels, attention_mask=attention_mask, position_ids=position_ids,
            tokens=tokens, cache=cache, past=past, ours=ours, rope_positions=self.runner.cos_sin.shape[0],
            implementations=self.implementations,
        )
        if fallbacks or self._under_autocast():
            return self._hf_forward(**all_args)

        if past == 0:
            with self._lock:
                self.check_weights_shared()  # once per sequence, not per decoded token
        runner = self.runner
        if inputs_embeds is None:
            inputs_embeds = runner.embed(input_ids)
        if ours and inputs_embeds.shape[1] == 1 and past > 0:
            logits = runner.decode(cache, inputs_embeds, attention_mask, position_ids)
        else:
            if cache is None and use_cache:
                cache = DynamicCache(config=self.model.config)
            hidden = runner.prefill(cache, inputs_embeds, attention_mask, position_ids)
            hidden = hidden[:, -logits_to_keep:] if isinstance(logits_to_keep, int) else hidden[:, logits_to_keep]
            logits = runner.logits(hidden)
        output = compat.causal_lm_output(logits, cache if use_cache else None, moe=self.moe)
        return output if kwargs.get("return_dict", True) else output.to_tuple()

    def _hf_forward(self, **args: Any):
        """HF's forward, which serves what ours does not; under autocast HF's whole forward (its attention and
        experts too): autocast decides each op's dtype, our kernels do not."""
        if self._under_autocast():
            with self._lock, self.disabled():
                return self.hf_forward(**args)
        return self.hf_forward(**args)


__all__ = ["KERNEL_MODES", "OptimizeOptions", "optimize", "Qwen3Accelerator"]
