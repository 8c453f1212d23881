"""`optimize()`: check the model, apply the patches, install the persistent cache and the compiled decode step.

The model object stays the user's HF model. Two instance attributes change: `forward` (our forward,
which hands anything it does not cover to HF's original) and `generate` (HF's generate with our
persistent cache passed in, when the request is one our cache serves). Everything else lives on a
`Qwen3Accelerator` stored as `model.qwen3_accel`.
"""

import contextlib
import logging
import os
import threading
import types
import warnings
import weakref
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from transformers import Cache, DynamicCache, GenerationConfig, Qwen3ForCausalLM, Qwen3MoeForCausalLM
from transformers.utils import ModelOutput

from . import compat, fast_generate, parallel, quantize
from .cache import Qwen3StaticCache
from .graphs import CompiledSteps
from .custom_ops import KERNEL_MODES, select_kernels
from .custom_ops.attention import prefill_attention
from .patches import qwen3 as dense
from .patches import qwen3_moe

logger = logging.getLogger(__name__)

# Which patch module serves each supported HF class: its `prepare(model)` and `mlp(kernels, module, x)`.
PATCHES = {Qwen3ForCausalLM: dense, Qwen3MoeForCausalLM: qwen3_moe}
SUPPORTED_CLASSES = tuple(PATCHES)
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_CACHE_LEN_ROUNDING = 256  # automatic cache sizes are 256 slots times a power of two (a bounded set of sizes)


@dataclass(frozen=True)
class OptimizeOptions:
    """How `optimize` treats a model.

    kernels: "auto" (Triton on CUDA, torch on CPU), "triton" (also on CPU, under TRITON_INTERPRET=1) or "torch".
        Defaults to the environment variable QWEN3_ACCEL_KERNELS, else "auto".
    attention: decode attention backend: "auto" (the split-KV Triton kernel on CUDA, masked SDPA on CPU unless
        kernels="triton"), "triton", "sdpa", or "flash_attn" (not available in this version: a clear error).
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
    if options.decode_linear not in dense.DECODE_LINEAR_MODES:
        raise ValueError(f"decode_linear={options.decode_linear!r} is not supported; choose one of "
                         f"{dense.DECODE_LINEAR_MODES}")
    if options.compile and options.kernels == "triton" and next(model.parameters()).device.type != "cuda":
        raise ValueError(
            "kernels='triton' on the CPU runs Triton's interpreter, which torch.compile cannot trace: pass "
            "compile=False with it (the CPU's compiled path uses kernels='auto')"
        )
    if options.weights and parallel.describe(model).world_size > 1:
        raise ValueError("quantized weights under tensor parallelism are not supported in this version")
    with _outside_inference_mode():
        if options.weights:
            quantize.quantize_model(model, options.weights)
        model.qwen3_accel = Qwen3Accelerator(model, options)
    return model


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


@contextlib.contextmanager
def _outside_inference_mode():
    """Where persistent tensors are made: outside inference mode (see Qwen3Accelerator), without gradients
    (leaving inference mode would turn them back on)."""
    with torch.inference_mode(False), torch.no_grad():
        yield


def _implementations(model: torch.nn.Module) -> dict[str, str | None]:
    """The attention and (MoE) experts implementations HF's forward uses now."""
    return {"attention": model.config._attn_implementation,
            "experts": getattr(model.config, "_experts_implementation", None)}


def _set_implementations(model: torch.nn.Module, implementations: dict[str, str | None]) -> None:
    if model.config._attn_implementation != implementations["attention"]:
        model.set_attn_implementation(implementations["attention"])
    experts = implementations["experts"]
    if experts is not None and model.config._experts_implementation != experts:
        model.set_experts_implementation(experts)


def _require_tokens(tokens: Any) -> None:
    """HF fails deep inside on an empty prompt; say what is wrong instead."""
    if isinstance(tokens, torch.Tensor) and tokens.dim() >= 2 and tokens.shape[1] == 0:
        raise ValueError(f"the input holds no tokens (shape {list(tokens.shape)}); give at least one per sequence")


class Qwen3Accelerator:
    """The state of one optimized model: kernels, RoPE table, persistent cache, compiled decode steps.

    `copy.deepcopy` and `pickle` of the model carry only the options: the copy rebuilds its own state (fused
    weights, kernels, cache, graphs) on its first call, so it is optimized and independent of the original.

    Persistent tensors (fused weights, RoPE table, cache, the fast loop's buffers) are allocated outside inference
    mode even when a call comes inside `torch.inference_mode()`: an inference tensor cannot be updated in place
    outside it, so every later call made without inference mode would fail.

    One lock serializes the calls that use the persistent cache or change the model's state (threads of a server
    sharing one model): they would otherwise write into each other's cache rows. Requests on HF's own cache run
    concurrently, as they do on a plain HF model.
    """

    def __init__(self, model: Qwen3ForCausalLM | Qwen3MoeForCausalLM, options: OptimizeOptions):
        self.model = model
        self.options = options
        self.hf_forward = model.forward
        self.hf_generate = model.generate
        self.hf_implementations = _implementations(model)  # before _setup selects ours
        self._lock = threading.RLock()
        self._setup()
        model.forward = self.forward
        model.generate = self.generate
        model.generate_batch = self.generate_batch
        model.init_continuous_batching = self.init_continuous_batching

    def _setup(self) -> None:
        with _outside_inference_mode():
            self._build()

    def _build(self) -> None:
        model, options = self.model, self.options
        self.patches = next(p for cls, p in PATCHES.items() if isinstance(model, cls))
        self.tp = parallel.describe(model)  # before any change: a layout we do not support leaves the model as is
        if self.tp.world_size > 1 and quantize.is_quantized(model):
            raise ValueError("quantized weights under tensor parallelism are not supported in this version")
        self.tp.check_same_request("optimize", options)
        self.device = model.lm_head.weight.device
        self.dtype = model.lm_head.weight.dtype
        self.kernels = select_kernels(options.kernels, self.device, options.attention)
        self.shape = dense.model_shape(model)
        self.scale = model.model.layers[0].self_attn.scaling
        self.fused = self.patches.prepare(model)
        # HF's own forward (requests ours hands it) attends through our decode kernel, unless the user chose an
        # implementation other than HF's default or asked for SDPA / the torch references.
        ours_asked = options.attention != "sdpa" and options.kernels != "torch"
        if self.hf_implementations["attention"] == "sdpa" and ours_asked:
            model.set_attn_implementation(dense.ATTENTION_IMPLEMENTATION)
        quantize.use_our_fp8_forward(model)
        self.cos_sin = dense.rope_table(model, model.config.max_position_embeddings)
        self.cache: Qwen3StaticCache | None = None
        # Graph keys: ("decode", rows, cache rows, cache length) for HF's loop and ("fast", rows, cache rows,
        # cache length, do_sample) for the fast loop; rows is a power of two up to the cache's max_batch_size.
        self.decode_steps = CompiledSteps(self._decode_step, options.compile)
        self.fast_steps = CompiledSteps(types.MethodType(fast_generate.fast_step, self), options.compile)
        self._fast_states: dict[tuple[int, int], fast_generate.FastDecodeState] = {}
        self.implementations = _implementations(model)  # ours; a user's later choice sends calls to HF's forward
        self._logged: set[str] = set()
        self._batching_managers: weakref.WeakSet = weakref.WeakSet()  # HF continuous-batching managers started
        self._ready = True

    # --------------------------------------------------------------------------- continuous batching
    # HF's continuous batching (its scheduler, paged cache and paged attention) on the optimized model: the manager
    # picks a paged attention implementation from the one the model has, which must be HF's (it refuses ours), and
    # restores that one when it stops; meanwhile our forward sees the implementation differ from ours and hands
    # every call (the manager's packed batches over its paged cache) to HF's forward, MoE experts still fused.
    def generate_batch(self, *args: Any, **kwargs: Any):
        """HF's `generate_batch` (returns HF's `GenerationOutput` per request), on HF's continuous batching."""
        self._ensure_ready()
        try:
            self._hand_attention_to_hf_batching()
            return type(self.model).generate_batch(self.model, *args, **kwargs)
        finally:
            self._restore_after_batching()

    def init_continuous_batching(self, *args: Any, **kwargs: Any):
        """HF's `init_continuous_batching` (the manager `transformers serve --continuous-batching` drives)."""
        self._ensure_ready()
        self._hand_attention_to_hf_batching()
        manager = type(self.model).init_continuous_batching(self.model, *args, **kwargs)
        self._batching_managers.add(manager)
        return manager

    def _hand_attention_to_hf_batching(self) -> None:
        with self._lock:
            if _implementations(self.model)["attention"] == self.implementations["attention"]:
                logger.info("qwen3_accel: continuous batching runs HF's paged attention and forward (our fused MoE "
                            "experts stay in); generate() returns to our kernels once its managers stop")
                _set_implementations(self.model, {**self.implementations,
                                                  "attention": self.hf_implementations["attention"]})

    def _restore_after_batching(self) -> None:
        """Our attention again once no continuous-batching manager runs (HF restored its own when each stopped)."""
        with self._lock:
            if any(manager.is_running() for manager in self._batching_managers):
                return
            if _implementations(self.model)["attention"] == self.hf_implementations["attention"]:
                _set_implementations(self.model, self.implementations)

    def __getstate__(self) -> dict[str, Any]:
        return {"model": self.model, "options": self.options, "hf_implementations": self.hf_implementations}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # The model is not restored yet: set up on first use.
        self.__dict__.update(state, _ready=False, _lock=threading.RLock())

    def _ensure_ready(self) -> None:
        if not self._ready:
            self.hf_forward = types.MethodType(type(self.model).forward, self.model)
            self.hf_generate = types.MethodType(type(self.model).generate, self.model)
            self._setup()

    def graph_count(self) -> int:
        """Compiled graphs this model holds now (at most 3 per batch bucket of the current cache)."""
        return len(self.decode_steps) + len(self.fast_steps)

    # ----------------------------------------------------------------------------------------- cache
    def cache_for(self, batch_size: int, total_len: int) -> Qwen3StaticCache:
        """The persistent cache, reset, with room for `batch_size` sequences of `total_len` tokens."""
        limit = self.model.config.max_position_embeddings
        if total_len > limit:
            raise ValueError(f"prompt + new tokens = {total_len} exceeds the model's {limit} positions")
        opts, cache = self.options, self.cache
        for name, need, fixed in (("max_batch_size", batch_size, opts.max_batch_size),
                                  ("max_cache_len", total_len, opts.max_cache_len)):
            if fixed is not None and need > fixed:
                raise ValueError(
                    f"this call needs {name}={need} but the KV cache was fixed at {fixed} by qwen3_accel.optimize"
                )
        if cache is None or batch_size > cache.max_batch_size or total_len > cache.max_cache_len:
            # Powers of two (times 256 slots for the length): growth visits a bounded set of sizes.
            need_batch = max(batch_size, cache.max_batch_size if cache is not None else 0)
            need_len = max(total_len, cache.max_cache_len if cache is not None else 0)
            new_batch = opts.max_batch_size or 1 << (need_batch - 1).bit_length()
            rounded = _CACHE_LEN_ROUNDING << max(0, (-(-need_len // _CACHE_LEN_ROUNDING) - 1).bit_length())
            new_len = opts.max_cache_len or min(limit, rounded)
            if cache is not None:
                warnings.warn(
                    f"growing the KV cache from {cache.max_batch_size}x{cache.max_cache_len} to "
                    f"{new_batch}x{new_len}; the decode step's CUDA graph is recorded again. Pass max_batch_size/"
                    "max_cache_len to qwen3_accel.optimize to size it once.",
                    stacklevel=3,
                )
            self.cache = cache = None  # drop the old tensors (and the graphs that captured them) first
            self.decode_steps.clear()
            self.fast_steps.clear()
            self._fast_states.clear()
            s = self.shape
            with _outside_inference_mode():
                cache = Qwen3StaticCache(
                    s.num_layers, new_batch, new_len, s.num_kv_heads, s.head_dim, self.dtype, self.device
                )
            self.cache = cache
        cache.reset()
        return cache

    def check_not_moved(self) -> None:
        """A model moved or cast since `optimize` is an error, at the first call after it, whichever path serves
        the call (a few attribute reads per fused group: cheap enough for every call)."""
        for group in self.fused:
            if group.fused.device != self.device or group.fused.dtype != group.dtype:
                raise RuntimeError(
                    "the model's weights were moved or converted after qwen3_accel.optimize (e.g. .to(), .half()), "
                    "so the fused projections no longer share memory with them; move or cast the model first, then "
                    "optimize"
                )

    def check_weights_shared(self) -> None:
        """Keep the fused GEMM weights equal to the model's: a weight replaced since `optimize` (any layer, any
        fused projection) is copied into the fused buffer; a model moved or cast since is an error."""
        self.check_not_moved()
        for group in self.fused:
            if not group.in_sync():
                logger.debug("qwen3_accel: a fused weight was replaced; copying it into the fused buffer")
                group.resync()

    @contextlib.contextmanager
    def disabled(self):
        """Run HF's own forward and generate (same weights, HF's attention and experts implementations) inside this
        block, e.g. for a baseline."""
        self._ensure_ready()
        ours = _implementations(self.model)
        self.model.forward, self.model.generate = self.hf_forward, self.hf_generate
        _set_implementations(self.model, self.hf_implementations)
        try:
            yield self.model
        finally:
            self.model.forward, self.model.generate = self.forward, self.generate
            _set_implementations(self.model, ours)

    def _implementations_changed(self) -> str | None:
        """Why HF's forward must serve: the user chose another attention or experts implementation after `optimize`
        (`set_attn_implementation` / `set_experts_implementation`), which our forward would otherwise ignore."""
        now = _implementations(self.model)
        if now != self.implementations and self._batching_managers:
            self._restore_after_batching()  # a continuous-batching manager that has stopped since
            now = _implementations(self.model)
        if now == self.implementations:
            return None
        hf_attention = self.hf_implementations["attention"]
        batching_attention = (hf_attention, f"paged|{hf_attention}")
        if (now["experts"] == self.implementations["experts"] and now["attention"] in batching_attention
                and any(manager.is_running() for manager in self._batching_managers)):
            return None  # a running manager's choice, not the user's: our own path does not read it
        changed = ", ".join(f"{kind}={now[kind]!r}" for kind in now if now[kind] != self.implementations[kind])
        reason = f"implementation set after optimize ({changed}): HF's forward honours it"
        if reason not in self._logged:
            self._logged.add(reason)
            logger.info("qwen3_accel: %s", reason)
        return reason

    def _under_autocast(self) -> bool:
        """Whether torch.autocast is on for the model's device: then HF's own forward and generate run, with HF's
        attention and experts (our kernels, cache and graphs keep the model dtype; autocast would mix dtypes)."""
        return torch.is_autocast_enabled(self.device.type)

    def fast_state(self, rows: int, max_len: int) -> fast_generate.FastDecodeState:
        """The fast loop's static buffers for a batch bucket (allocated once per bucket and cache size)."""
        key = (rows, max_len)
        if key not in self._fast_states:
            with _outside_inference_mode():
                self._fast_states[key] = fast_generate.FastDecodeState(rows, max_len, self.device)
        return self._fast_states[key]

    # -------------------------------------------------------------------------------------- generate
    def generate(self, *args: Any, **kwargs: Any):
        """HF's `generate`: our device-side loop when it covers the request, else HF's loop on our cache."""
        self._ensure_ready()
        _require_tokens(args[0] if args else kwargs.get("input_ids", kwargs.get("inputs")))
        self.check_not_moved()  # on every path, so that one state gets one answer
        if self._under_autocast():
            logger.debug("qwen3_accel: HF's own generate (autocast is on: our kernels and cache run the model dtype)")
            with self._lock, self.disabled():
                return self.hf_generate(*args, **kwargs)
        if self.options.fast_generate and not self._implementations_changed():
            reason, request = fast_generate.fast_path_reason(self.model, args, kwargs)
            if request is not None:
                with self._lock:
                    self.check_weights_shared()  # HF's loop reaches our forward, which checks at its first step
                    return fast_generate.run_fast_generate(self, request)
            logger.debug("qwen3_accel: HF's generate loop (%s)", reason)
        gen_config = self._generation_config(kwargs)
        if gen_config.do_sample:
            self.tp.share_random_state(self.device)  # tensor parallel: HF's sampler draws the same on every rank
        reason = self._generate_fallback_reason(args, kwargs, gen_config)
        if reason is not None:
            logger.debug("qwen3_accel: HF generate with HF's own cache (%s)", reason)
            return self.hf_generate(*args, **kwargs)
        inputs = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
        batch, prompt_len = inputs.shape[:2]
        batch *= gen_config.num_return_sequences or 1
        # max_length is a total length when the user set it, and a count of new tokens when it is HF's default
        # (in recent transformers): size for the larger reading.
        new_tokens = gen_config.max_new_tokens if gen_config.max_new_tokens is not None else gen_config.max_length
        total_len = prompt_len + new_tokens
        with self._lock:
            cache = self.cache_for(batch, total_len)
            output = self.hf_generate(*args, **{compat.CACHE_ARG: cache}, **kwargs)
            if isinstance(output, ModelOutput):
                # The persistent cache is reset by the next call: hand the caller a copy of its contents instead.
                for key in [key for key, value in output.items() if value is cache]:
                    output[key] = cache.to_dynamic(self.model.config)
        return output

    def _generation_config(self, kwargs: dict[str, Any]) -> GenerationConfig:
        """The settings HF's generate will actually use (its defaults filled in), without changing anything."""
        others = {k: v for k, v in kwargs.items() if k != "generation_config"}
        return self.model._prepare_generation_config(kwargs.get("generation_config"), **others)[0]

    def _generate_fallback_reason(self, args: tuple, kwargs: dict[str, Any], config: GenerationConfig) -> str | None:
        inputs = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
        if not isinstance(inputs, torch.Tensor) or inputs.dim() != 2:
            return "no 2-D input_ids tensor (e.g. inputs_embeds only)"
        if any(kwargs.get(name) is not None for name in compat.CACHE_ARG_NAMES):
            return "a cache was passed in"
        if (config.num_beams or 1) > 1:
            return "beam search"
        if kwargs.get("assistant_model") is not None or config.prompt_lookup_num_tokens is not None:
            return "assisted decoding"
        if config.cache_implementation is not None:
            return f"cache_implementation={config.cache_implementation!r}"
        if config.use_cache is False:
            return "use_cache=False"
        for flag in ("output_attentions", "output_hidden_states", "output_router_logits"):
            if getattr(config, flag, False) or getattr(self.model.config, flag, False):
                return flag
        return self._implementations_changed()

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
        config = self.model.config
        use_cache = config.use_cache if use_cache is None else use_cache
        ours = isinstance(cache, Qwen3StaticCache)
        tokens = input_ids if input_ids is not None else inputs_embeds
        _require_tokens(tokens)
        if cache is not None and not ours and type(cache) is not DynamicCache:
            # Any other cache class (HF's StaticCache, the paged cache of HF's continuous batching, a user's own):
            # HF's forward, which knows it (not every one has a length to ask for).
            return self._hf_forward(**all_args)
        past = cache.get_seq_length() if cache is not None else 0
        if past == 0:  # tensor parallel: every rank must run this sequence (a no-op on one device)
            self.tp.check_same_request("forward", tokens, attention_mask, position_ids, logits_to_keep)
        hf_only = [flag for flag in ("output_attentions", "output_hidden_states", "output_router_logits")
                   if kwargs.get(flag, getattr(config, flag, False))]
        if labels is not None:
            hf_only.append("labels")
        mask_2d = attention_mask is None or (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2)
        if not mask_2d:  # 4-D, or the per-layer-type dict HF's generate prepares for its static caches
            hf_only.append("a prepared attention mask")
        if torch.is_grad_enabled() and self.model.lm_head.weight.requires_grad:
            hf_only.append("gradients")
        changed = self._implementations_changed()
        if changed:
            hf_only.append(changed)
        if position_ids is not None and not (ours and tokens is not None and tokens.shape[1] == 1 and past > 0):
            # (decode steps on our cache come from generate, which bounds them by the model's positions)
            if int(position_ids.max()) >= self.cos_sin.shape[0]:
                hf_only.append(f"position ids past the model's {self.cos_sin.shape[0]} positions")
        if hf_only and ours:
            raise ValueError(f"qwen3_accel's own cache cannot serve {hf_only}: run without a cache or with HF's")
        # HF's DynamicCache (beam search, assisted decoding, a user's own loop) runs on our kernels too, through
        # the Cache API, unless the mask does not cover the cache.
        if type(cache) is DynamicCache and mask_2d and attention_mask is not None and tokens is not None and (
            attention_mask.shape[-1] != past + tokens.shape[1]
        ):
            hf_only.append("an attention mask that does not cover the cache")
        if hf_only or self._under_autocast():
            return self._hf_forward(**all_args)

        if past == 0:
            with self._lock:
                self.check_weights_shared()  # once per sequence, not per decoded token
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids)
        batch, seq_len = inputs_embeds.shape[:2]
        if ours and seq_len == 1 and past > 0:
            logits = self._decode(cache, input_ids, inputs_embeds, attention_mask, position_ids)
        else:
            if cache is None and use_cache:
                cache = DynamicCache(config=self.model.config)
            hidden = self._prefill(cache, inputs_embeds, attention_mask, position_ids)
            hidden = hidden[:, -logits_to_keep:] if isinstance(logits_to_keep, int) else hidden[:, logits_to_keep]
            logits = self.logits(hidden)
        output = compat.causal_lm_output(logits, cache if use_cache else None, moe=self.patches is qwen3_moe)
        return output if kwargs.get("return_dict", True) else output.to_tuple()

    def _hf_forward(self, **args: Any):
        """HF's forward, which serves what ours does not; under autocast HF's whole forward (its attention and
        experts too): autocast decides each op's dtype, our kernels do not."""
        if self._under_autocast():
            with self._lock, self.disabled():
                return self.hf_forward(**args)
        return self.hf_forward(**args)

    def _prefill(self, cache, embeds, attention_mask, position_ids) -> torch.Tensor:
        """Eager forward over new tokens (a prompt, or steps on HF's DynamicCache); extends `cache` when given."""
        batch, seq_len = embeds.shape[:2]
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = (torch.arange(seq_len, device=embeds.device) + past)[None].expand(batch, seq_len)
        padded = attention_mask is not None and not bool(attention_mask.all())

        if isinstance(cache, Qwen3StaticCache):
            cache.check_room(batch, seq_len)
            end = past + seq_len
            valid = attention_mask[:, -seq_len:].bool() if attention_mask is not None else True
            cache.kv_valid[:batch, past:end] = valid
            key_valid = cache.kv_valid[:batch, :end] if (padded or past > 0) else None

            def attend(i, q, k, v):
                cache.keys[i][:batch, past:end] = k
                cache.values[i][:batch, past:end] = v
                keys, values = cache.keys[i][:batch, :end], cache.values[i][:batch, :end]
                if key_valid is None:
                    keys, values = k, v
                return prefill_attention(q, keys, values, key_valid, self.scale)
        else:  # no cache, or HF's DynamicCache: `update` returns every key so far, [B, kv_heads, past + L, D]
            key_valid = attention_mask.bool() if padded else None

            def attend(i, q, k, v):
                if cache is not None:
                    keys, values = cache.update(k.transpose(1, 2), v.transpose(1, 2), i)
                    k, v = keys.transpose(1, 2), values.transpose(1, 2)
                return prefill_attention(q, k, v, key_valid, self.scale)

        # A few tokens (beam search or a user's loop stepping over HF's cache): the decode-sized fused projections.
        fuse = dense.fuses_decode_linears(self.model, batch * seq_len, self.tp, self.options.decode_linear)
        hidden = dense.forward_hidden(
            self.model, self.kernels, self.cos_sin, embeds, position_ids, attend, self.patches.mlp, self.tp,
            None, self.patches.decode_mlp if fuse else None,
        )
        if isinstance(cache, Qwen3StaticCache):
            cache.seq_length = end
            cache.batch_size_in_use = batch
            cache.write_pos.fill_(end)
            cache.seq_start[:batch] = cache.kv_valid[:batch, :end].int().argmax(dim=1).int()  # left padding
        return hidden

    def _decode(self, cache, input_ids, embeds, attention_mask, position_ids) -> torch.Tensor:
        """One new token per sequence through the compiled step; returns logits [B, 1, V]."""
        batch = embeds.shape[0]
        cache.check_room(batch, 1)
        with _outside_inference_mode():  # graph inputs of one kind, whichever mode the caller is in
            if embeds.is_inference():
                embeds = embeds.clone()
            if position_ids is None:
                position_ids = torch.full((batch, 1), cache.seq_length, device=embeds.device, dtype=torch.long)
            # Graph inputs must keep their strides from step to step: HF's mask grows, so copy its last column out.
            new_valid = (
                attention_mask[:, -1].bool().clone(memory_format=torch.contiguous_format)
                if attention_mask is not None else torch.ones(batch, dtype=torch.bool, device=embeds.device)
            )
            position_ids = position_ids.clone(memory_format=torch.contiguous_format)
            # Rows are padded to a power of two: one CUDA graph per bucket serves every batch size in it.
            pad = cache.decode_rows(batch) - batch
            if pad:
                embeds = F.pad(embeds, (0, 0, 0, 0, 0, pad))
                position_ids = F.pad(position_ids, (0, 0, 0, pad))
                new_valid = F.pad(new_valid, (0, pad), value=True)
        key = ("decode", embeds.shape[0], cache.max_batch_size, cache.max_cache_len)
        logits = self.decode_steps(
            key, embeds, position_ids, new_valid, cache.keys, cache.values, cache.kv_valid, cache.seq_start,
            cache.write_pos,
        )
        cache.seq_length += 1
        return logits[:batch].clone()  # graph outputs are overwritten by the next replay

    def _decode_step(
        self, embeds, position_ids, new_valid, keys, values, kv_valid, seq_start, write_pos
    ) -> torch.Tensor:
        """The whole decode step for the first B cache rows: [B, 1, H] embeddings -> [B, 1, V] logits."""
        batch = embeds.shape[0]
        # Index-put on the whole mask (never on a slice): Inductor writes it in place. Keys and values are written
        # by the QK-norm + RoPE kernel (`DecodeSlot`).
        slot = (torch.arange(batch, device=embeds.device)[:, None], write_pos[None, :])  # [B, 1] x [1, 1]
        kv_valid[slot] = new_valid[:, None]
        seq_end = write_pos + 1

        def attend(i, q, layer_keys, layer_values):
            out = self.kernels.decode_attention(q[:, 0], layer_keys, layer_values, kv_valid, seq_start, seq_end,
                                                self.scale)
            return out.reshape(batch, 1, -1)

        mode = self.options.decode_linear
        fuse = dense.fuses_decode_linears(self.model, batch, self.tp, mode)
        fuse_head = fuse and dense.fuses_decode_head(self.model, mode)
        hidden = dense.forward_hidden(
            self.model, self.kernels, self.cos_sin, embeds, position_ids, attend, self.patches.mlp, self.tp,
            dense.DecodeSlot(keys, values, write_pos), self.patches.decode_mlp if fuse else None, not fuse_head,
        )
        write_pos.add_(1)
        return dense.decode_logits(self.kernels, self.model, hidden) if fuse_head else self.logits(hidden)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings (this rank's vocabulary rows summed over ranks under tensor parallelism)."""
        if self.tp.world_size == 1:
            return self.model.model.embed_tokens(input_ids)
        return self.tp.embed(parallel.local(self.model.model.embed_tokens.weight), input_ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head (every rank's vocabulary slice gathered under tensor parallelism)."""
        if self.tp.world_size == 1:
            return self.model.lm_head(hidden)
        return self.tp.gather_last_dim(F.linear(hidden, parallel.local(self.model.lm_head.weight)))


__all__ = ["KERNEL_MODES", "OptimizeOptions", "optimize", "Qwen3Accelerator"]
