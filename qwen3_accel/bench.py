"""End-to-end benchmark: HF eager, HF's static-cache + compile recipe, and qwen3_accel, in one process.

Every contender generates from the same random prompts with the same weights (the HF contenders run HF's own
forward and generate on the optimized model's weights, inside `Qwen3Accelerator.disabled()`). They are timed
interleaved, round by round (timing.py), so that load from other processes falls on all of them alike, and every
figure carries its spread over the rounds. Decode speed is isolated from prefill by timing `generate` with 1 and
with 1 + N new tokens in the same round and dividing the difference; an estimate still within the timer's noise
after extra rounds is reported as unreliable, in words. Prefill latency is one forward; time to first token a
whole `generate` of one token. The copy bandwidth measured in the same run gives the roofline: bytes a decode
step must read (weights, plus the valid KV cache) over it. On CUDA the profiler also counts the GPU operations
(kernels, copies) one decode step launches. qwen3_accel variants (quantized weights, other decode_linear modes)
need their own copy of the weights, so each is timed after the base contenders, against qwen3_accel's figures.
"""

import contextlib
import datetime
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import transformers
from tqdm.auto import tqdm

from .compat import CACHE_ARG
from .loading import is_main_process, load_model
from .reports import pyplot, write_json_and_table
from .timing import (DecodeEstimate, Spread, Timer, decode_rounds, interleaved, looked_busy, machine_noise,
                     paired_ratio)

CONTENDERS = ("hf_eager", "hf_static_compile", "qwen3_accel")
# Requests beyond plain greedy decoding, timed for hf_eager and qwen3_accel, interleaved, at each request batch
# size: "plain" (greedy decoding itself, the yardstick), beam search (HF's loop over HF's cache), a logits
# processor (HF's loop over our cache), and speculative decoding (our loop; HF's assisted loop for hf_eager, which
# refuses batches of more than one): "assisted" drafts with the model itself (every draft kept: what verifying
# costs), "assisted_draft" with the --draft-model, "lookup" with prompt lookup on a prompt that repeats a phrase.
# Random weights make acceptance rates meaningless for real text; the report gives the ones measured.
REQUESTS = ("plain", "beam4", "assisted", "assisted_draft", "lookup", "penalty")
SPECULATIVE = ("assisted", "assisted_draft", "lookup")
DRAFT_TOKENS = 4  # k of the speculative requests: a verify step over 5 tokens (issue 25's goal is stated at 5)


@dataclass
class BenchConfig:
    model: str = "Qwen3-0.6B"
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    dtype: str = "bfloat16"
    contenders: tuple[str, ...] = CONTENDERS
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    prompt_lengths: tuple[int, ...] = (128, 512, 2048)
    decode_prompt_length: int = 128
    decode_tokens: int = 64
    repeats: int = 5  # rounds per figure (decode: up to 3x as many when the first ones are within the noise)
    kernels: str = "auto"
    weights: tuple[str, ...] = ()  # quantized formats measured after the others, each as `qwen3_accel_<format>`
    decode_linear: tuple[str, ...] = ()  # other `decode_linear` modes, each as `qwen3_accel_decode_linear_<mode>`
    requests: tuple[str, ...] = ()  # from REQUESTS, timed for hf_eager and qwen3_accel
    request_batch_sizes: tuple[int, ...] = (1,)
    draft_model: str | None = None  # the assistant of the "assisted_draft" request (a shape name or a checkpoint)
    extra: dict[str, Any] = field(default_factory=dict)

    def max_cache_len(self) -> int:
        """The cache length every timed request fits in: the longest prompt, then 1 + decode_tokens new tokens."""
        return max(*self.prompt_lengths, self.decode_prompt_length) + 1 + self.decode_tokens


def median_time(timer: Timer, fn: Callable[[], Any], repeats: int) -> float:
    return statistics.median(timer(fn) for _ in range(repeats))


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    timer = Timer(device)
    timer(lambda: dst.copy_(src))
    seconds = median_time(timer, lambda: dst.copy_(src), repeats)
    return 2 * src.numel() * src.element_size() / seconds


def decode_bytes_per_step(model: torch.nn.Module, batch: int, context: int) -> int:
    """Bytes one decode step must read: every weight once (embeddings only for the batch rows; for MoE only the
    experts the batch can be expected to touch) + the valid KV cache. Under tensor parallelism: per rank (its
    shards, the replicated weights, its KV heads)."""
    from .parallel import local
    from .weights import model_shape

    config = model.config
    embed = local(model.get_input_embeddings().weight)
    weights = 0
    n_experts = getattr(config, "num_experts", 0)
    # Expected distinct experts hit by batch * top_k independent picks out of n_experts.
    active = n_experts * (1 - (1 - config.num_experts_per_tok / n_experts) ** batch) if n_experts else 0
    for name, p in model.named_parameters():
        p = local(p)
        if p is embed:
            continue
        fraction = active / n_experts if ".experts." in name else 1.0
        weights += int(p.numel() * p.element_size() * fraction)
    if config.tie_word_embeddings:
        weights += embed.numel() * embed.element_size()
    shape = model_shape(model)  # this rank's KV heads, counted from its own k_proj shard
    kv = 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * context * batch * embed.element_size()
    return weights + kv


def _prompts(batch: int, length: int, vocab: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (batch, length), generator=g).to(device)


def _generate_fn(model, ids: torch.Tensor, new_tokens: int, static_cache=None,
                 extra: dict[str, Any] | None = None) -> Callable[[], Any]:
    # No eos: every contender runs exactly `new_tokens` steps. `extra`: a request's own generate() arguments.
    kwargs = dict(
        attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
        eos_token_id=None, **(extra or {}),
    )
    if static_cache is None:
        return lambda: model.generate(ids, **kwargs)

    def run():
        # HF's recipe: a StaticCache reused across calls (reset, same shape), and Transformers compiles the
        # decode forward itself (mode="reduce-overhead") because the cache is compileable.
        static_cache.reset()
        return model.generate(ids, **{CACHE_ARG: static_cache}, **kwargs)

    return run


def request_kwargs(name: str, model, draft=None) -> dict[str, Any]:
    """The generate() arguments of a named request (see REQUESTS)."""
    if name == "plain":
        return {}
    if name == "beam4":
        return dict(num_beams=4)
    if name == "assisted":
        return dict(assistant_model=model)
    if name == "assisted_draft":
        return dict(assistant_model=draft)
    if name == "lookup":
        return dict(prompt_lookup_num_tokens=DRAFT_TOKENS)
    if name == "penalty":
        return dict(repetition_penalty=1.1)
    raise ValueError(f"unknown request {name!r}; choose from {REQUESTS}")


def request_key(request: str, batch: int) -> str:
    """A request's entry in the report: its name at batch 1, "<name>, batch <b>" otherwise."""
    return request if batch == 1 else f"{request}, batch {batch}"


def request_cases(config: dict[str, Any]) -> list[tuple[str, int]]:
    """(request, batch size) of every request case a report's config asks for, in its order."""
    return [(r, b) for r in config.get("requests", ()) for b in config.get("request_batch_sizes", (1,))]


def _request_prompts(request: str, batch: int, length: int, vocab: int, device: torch.device) -> torch.Tensor:
    """Random prompts; for prompt lookup a random phrase of 8 tokens repeated (something to look up)."""
    if request != "lookup":
        return _prompts(batch, length, vocab, device)
    phrase = _prompts(batch, 8, vocab, device, seed=1)
    return phrase.repeat(1, -(-length // 8))[:, :length]


def _acceptance(model, request: str) -> float | None:
    """The share of drafts kept in qwen3_accel's last speculative call of this request."""
    speculator = model.qwen3_accel.runner.speculators.get("lookup" if request == "lookup" else "assistant")
    return None if speculator is None else speculator.stats.acceptance


def _decode_figures(estimate: DecodeEstimate, batch: int, steps: int) -> dict[str, Any]:
    """The report's decode entries for one contender and case: tok/s (median; None when no round measured any),
    its spread, ms per step, and whether it stood above the noise (with the reason when not)."""
    spread = estimate.spread
    figures = {"decode_tok_s": None if spread is None else batch * steps / spread.median,
               "decode_tok_s_spread": None if spread is None else spread.inverse(batch * steps).to_dict(),
               "decode_step_ms": None if spread is None else 1e3 * spread.median / steps,
               "decode_reliable": estimate.reliable}
    if not estimate.reliable:
        figures["decode_unreliable_reason"] = estimate.reason
    return figures


def bench_requests(model, names: list[str], contexts: dict[str, Callable], cfg: BenchConfig, progress: tqdm,
                   draft=None) -> tuple[dict[str, dict[str, dict]], dict[str, dict[str, DecodeEstimate]]]:
    """Decode tokens/s of each request at each request batch size, the contenders interleaved: as for plain
    decode, `generate` with 1 + N new tokens minus `generate` with 1, over N. Speculative requests also report the
    share of drafts qwen3_accel kept; HF's assisted loop takes one sequence, so hf_eager sits out larger batches."""
    timer = Timer(model.device)
    results: dict[str, dict] = {name: {} for name in names}
    estimates: dict[str, dict[str, DecodeEstimate]] = {name: {} for name in names}
    for request in cfg.requests:
        extra = request_kwargs(request, model, draft)
        for batch in cfg.request_batch_sizes:
            key = request_key(request, batch)
            progress.set_postfix_str(f"request {key}")
            ids = _request_prompts(request, batch, cfg.decode_prompt_length, model.config.vocab_size, model.device)
            takers = [n for n in names if not (request in SPECULATIVE and batch > 1 and n != "qwen3_accel")]
            pairs = {name: tuple(_in(contexts[name], _generate_fn(model, ids, n, extra=extra))
                                 for n in (1, 1 + cfg.decode_tokens)) for name in takers}
            for name in takers:
                pairs[name][1]()  # warm-up
            found, _ = decode_rounds(timer, pairs, cfg.repeats, 3 * cfg.repeats)
            for name in takers:
                figures = _decode_figures(found[name], batch, cfg.decode_tokens)
                if request in SPECULATIVE and name == "qwen3_accel":
                    pairs[name][1]()  # one whole call, whose counts the speculator keeps
                    figures["acceptance"] = _acceptance(model, request)
                results[name][key] = figures
                estimates[name][key] = found[name]
            progress.update(len(names))
    return results, estimates


def _draft_model(cfg: BenchConfig, model, device: torch.device, dtype: torch.dtype, contexts: dict[str, Callable]):
    """The assisted_draft request's assistant, optimized for qwen3_accel (and HF's own inside the HF contenders'
    contexts). Every speculative request drafts DRAFT_TOKENS tokens a round on both loops: the early stop on the
    assistant's confidence is off (random weights are never confident, so it would draft one token a round)."""
    import qwen3_accel

    _draft_settings(model)  # the model as its own assistant
    if "assisted_draft" not in cfg.requests:
        return None
    draft = _draft_settings(load_model(cfg.draft_model, device, dtype))
    if hasattr(model, "qwen3_accel"):
        qwen3_accel.optimize(draft, kernels=cfg.kernels)
        for name, context in list(contexts.items()):
            if name != "qwen3_accel":
                contexts[name] = _both(context, draft.qwen3_accel.disabled)
    return draft


def _draft_settings(assistant):
    assistant.generation_config.num_assistant_tokens = DRAFT_TOKENS
    assistant.generation_config.assistant_confidence_threshold = 0.0
    return assistant


def _both(first: Callable, second: Callable) -> Callable:
    @contextlib.contextmanager
    def context():
        with first(), second():
            yield
    return context


def _in(context: Callable, fn: Callable[[], Any]) -> Callable[[], Any]:
    """`fn` run inside `context()` (HF's own path on the optimized model for the HF contenders)."""
    def run():
        with context():
            return fn()
    return run


def device_ops_per_step(first: Callable[[], Any], full: Callable[[], Any], steps: int,
                        device: torch.device) -> float | None:
    """GPU kernels (and copies) per decode step: the profiler's count for `full` minus that for `first` (the same
    request with one new token), over the `steps` extra tokens. Kernels replayed from a CUDA graph count one by
    one. None off CUDA."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    def count(fn: Callable[[], Any]) -> int:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize(device)
        return sum(1 for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA)

    return (count(full) - count(first)) / steps


def measure(model, kinds: dict[str, str], contexts: dict[str, Callable], cfg: BenchConfig,
            progress: tqdm) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, DecodeEstimate]]]:
    """Prefill latency and time to first token by prompt length, decode tokens/s by batch size, for every contender
    (name -> its kind in CONTENDERS), timed interleaved. Returns the figures and the decode estimates.

    Prefill is one forward over a batch-1 prompt (no cache, last-position logits); time to first token is a whole
    `generate` call with one new token (prefill, cache writes, token selection and HF's per-call set-up).
    """
    device = model.device
    timer = Timer(device)
    vocab = model.config.vocab_size
    names = list(kinds)
    results: dict[str, dict[str, Any]] = {
        name: {"prefill_s": {}, "prefill_s_spread": {}, "ttft_s": {}, "ttft_s_spread": {}, "decode_tok_s": {},
               "decode_tok_s_spread": {}, "decode_step_ms": {}, "decode_reliable": {}, "first_call_s": {},
               "device_ops_per_step": {}} for name in names}
    estimates: dict[str, dict[str, DecodeEstimate]] = {name: {} for name in names}
    static_caches: dict[tuple[str, int], Any] = {}

    def generate_fn(name: str, ids: torch.Tensor, new_tokens: int) -> Callable[[], Any]:
        cache = None
        if kinds[name] == "hf_static_compile":
            from transformers import StaticCache

            cache = static_caches.setdefault(
                (name, ids.shape[0]), StaticCache(config=model.config, max_cache_len=cfg.max_cache_len()))
        return _in(contexts[name], _generate_fn(model, ids, new_tokens, cache))

    def record(key: str, length: str, times: dict[str, list[float]]) -> None:
        for name, values in times.items():
            spread = Spread.of(values)
            results[name][key][length] = spread.median
            results[name][f"{key}_spread"][length] = spread.to_dict()

    for length in cfg.prompt_lengths:
        progress.set_postfix_str(f"prefill {length}")
        ids = _prompts(1, length, vocab, device)
        with torch.no_grad():
            prefills = {name: _in(contexts[name], lambda ids=ids: model(input_ids=ids, use_cache=False,
                                                                        logits_to_keep=1)) for name in names}
            for fn in prefills.values():
                fn()
            record("prefill_s", str(length), interleaved(timer, prefills, cfg.repeats))
        firsts = {name: generate_fn(name, ids, 1) for name in names}
        for fn in firsts.values():
            fn()
        record("ttft_s", str(length), interleaved(timer, firsts, cfg.repeats))
        progress.update(len(names))
    for batch in cfg.batch_sizes:
        progress.set_postfix_str(f"decode batch {batch}")
        ids = _prompts(batch, cfg.decode_prompt_length, vocab, device)
        if "hf_static_compile" in kinds.values():
            # A fresh compile per batch size, as for a user who serves one batch size: without it the second size
            # recompiles with a dynamic batch dimension, slower to compile and to run.
            torch._dynamo.reset()
        pairs = {name: (generate_fn(name, ids, 1), generate_fn(name, ids, 1 + cfg.decode_tokens)) for name in names}
        for name, (_, full) in pairs.items():
            start = time.perf_counter()
            full()  # warm-up: compiles and records graphs for this shape
            results[name]["first_call_s"][str(batch)] = time.perf_counter() - start
            full()
        found, _ = decode_rounds(timer, pairs, cfg.repeats, 3 * cfg.repeats)
        for name in names:
            estimates[name][str(batch)] = found[name]
            for key, value in _decode_figures(found[name], batch, cfg.decode_tokens).items():
                results[name].setdefault(key, {})[str(batch)] = value
            first, full = pairs[name]
            results[name]["device_ops_per_step"][str(batch)] = device_ops_per_step(first, full, cfg.decode_tokens,
                                                                                    device)
        progress.update(len(names))
    for name in names:  # peak GPU memory of each contender's largest decode (None on CPU, where it is not tracked)
        results[name]["peak_memory_gib"] = None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            generate_fn(name, _prompts(max(cfg.batch_sizes), cfg.decode_prompt_length, vocab, device),
                        1 + cfg.decode_tokens)()
            results[name]["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return results, estimates


def environment(device: torch.device) -> dict[str, Any]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} threads)",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def _free_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _projection_bytes(model: torch.nn.Module) -> dict[str, float]:
    """Bytes the quantized projections and experts take (values, scales, zero points) and per weight."""
    from .quantize import quantized_modules

    modules = quantized_modules(model)
    total = sum(p.numel() * p.element_size() for m in modules for p in m.parameters())
    weights = sum(m.weight.shape[0] * m.in_features if hasattr(m, "weight")
                  else m.gate_up_proj.numel() + m.down_proj.numel() for m in modules)  # experts: 1 byte per weight
    return {"bytes": total, "bytes_per_weight": total / weights}


def _ratios(ours: dict[str, DecodeEstimate], base: dict[str, DecodeEstimate], paired: bool) -> dict[str, Any]:
    """Our decode rate over the base's per case: {case: {"median", "min", "max", "rounds", "paired"}} or
    {case: {"unreliable": why}}. Paired: the two were timed side by side in every round (the ratio of each
    round); else the ratio of medians, its range from the extreme rounds."""
    out = {}
    for case, estimate in ours.items():
        other = base[case]
        if not (estimate.reliable and other.reliable):
            why = estimate.reason if not estimate.reliable else other.reason
            out[case] = {"unreliable": why}
            continue
        if paired:
            spread = paired_ratio(estimate, other)
        else:
            a, b = estimate.spread, other.spread
            spread = Spread(b.median / a.median, b.low / a.high, b.high / a.low, min(a.rounds, b.rounds))
        out[case] = {**spread.to_dict(), "paired": paired}
    return out


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Measure every contender on one model; returns the report (see `write_report`)."""
    import qwen3_accel

    if "assisted_draft" in cfg.requests and cfg.draft_model is None:  # before minutes of loading
        raise ValueError("the assisted_draft request needs --draft-model (e.g. Qwen3-0.6B for Qwen3-8B)")
    device = torch.device(cfg.device)
    dtype = getattr(torch, cfg.dtype)
    model = load_model(cfg.model, device, dtype)
    bandwidth = copy_bandwidth(device)
    noise_before = machine_noise(device)
    report: dict[str, Any] = {
        "model": cfg.model, "dtype": cfg.dtype, "tensor_parallel": _world_size(),
        "num_layers": model.config.num_hidden_layers,
        "config": {k: v for k, v in vars(cfg).items() if k != "extra"},
        "environment": environment(device), "copy_bandwidth_gb_s": bandwidth / 1e9,
        "contenders": {},
    }
    # Variants of qwen3_accel, each measured after the others on a fresh copy of the weights (optimize patches
    # in place; quantizing replaces them), one at a time.
    variants = [(f"qwen3_accel_{w}", dict(weights=w)) for w in cfg.weights]
    variants += [(f"qwen3_accel_decode_linear_{m}", dict(decode_linear=m)) for m in cfg.decode_linear]
    contenders = sorted(cfg.contenders, key=CONTENDERS.index)
    steps = (len(contenders) + len(variants)) * (len(cfg.prompt_lengths) + len(cfg.batch_sizes))
    request_contenders = [c for c in ("hf_eager", "qwen3_accel") if c in contenders] if cfg.requests else []
    steps += len(request_contenders) * len(cfg.requests) * len(cfg.request_batch_sizes)
    context = cfg.decode_prompt_length + cfg.decode_tokens // 2
    max_len = cfg.max_cache_len()
    step_bytes = {batch: decode_bytes_per_step(model, batch, context) for batch in cfg.batch_sizes}
    contexts = {c: contextlib.nullcontext for c in contenders}
    if "qwen3_accel" in contenders:
        # One model for all: the HF contenders run HF's own forward and generate on its weights.
        qwen3_accel.optimize(model, kernels=cfg.kernels, max_batch_size=max(*cfg.batch_sizes, *cfg.request_batch_sizes),
                             max_cache_len=max_len)
        contexts.update({c: model.qwen3_accel.disabled for c in contenders if c != "qwen3_accel"})
    draft = _draft_model(cfg, model, device, dtype, contexts)
    with tqdm(total=steps, desc=f"bench {cfg.model}", unit="case", disable=not is_main_process()) as progress:
        results, estimates = measure(model, {c: c for c in contenders}, contexts, cfg, progress)
        report["contenders"].update(results)
        if request_contenders:
            requests, request_estimates = bench_requests(model, request_contenders, contexts, cfg, progress, draft)
            for name in request_contenders:
                report["contenders"][name]["requests"] = requests[name]
        del draft
        torch._dynamo.reset()
        quantized_bytes = {}
        for name, options in variants:
            del model
            _free_memory(device)
            model = qwen3_accel.optimize(load_model(cfg.model, device, dtype), kernels=cfg.kernels,
                                         max_batch_size=max(cfg.batch_sizes), max_cache_len=max_len, **options)
            results, found = measure(model, {name: "qwen3_accel"}, {name: contextlib.nullcontext}, cfg, progress)
            report["contenders"].update(results)
            estimates.update(found)
            if "weights" in options:
                report["contenders"][name]["weight_bytes"] = _projection_bytes(model)
                quantized_bytes[name] = {batch: decode_bytes_per_step(model, batch, context)
                                         for batch in cfg.batch_sizes}
            torch._dynamo.reset()
    report["roofline"] = {}
    for batch in cfg.batch_sizes:
        bound = bandwidth / step_bytes[batch] * batch
        share = {}
        for c, r in report["contenders"].items():  # each against the bytes its own weights take
            own_bound = bandwidth / quantized_bytes[c][batch] * batch if c in quantized_bytes else bound
            tok_s = r["decode_tok_s"][str(batch)]
            share[c] = tok_s / own_bound if tok_s is not None and r["decode_reliable"][str(batch)] else None
        report["roofline"][str(batch)] = {
            "bytes_per_step": step_bytes[batch],
            "bound_tok_s": bound,
            "share": share,
            "quantized_bytes_per_step": {c: b[batch] for c, b in quantized_bytes.items()},
        }
    base_names = set(contenders)
    report["speedup"] = {
        f"{ours}_vs_{base}": _ratios(estimates[ours], estimates[base], paired=ours in base_names)
        for ours in estimates if ours.startswith("qwen3_accel")
        for base in ("hf_eager", "hf_static_compile", "qwen3_accel") if base in estimates and base != ours
    }
    if len(request_contenders) == 2:
        ours, theirs = request_estimates["qwen3_accel"], request_estimates["hf_eager"]
        report["request_speedup"] = _ratios({k: v for k, v in ours.items() if k in theirs}, theirs, True)
    if "qwen3_accel" in request_contenders and "plain" in cfg.requests:
        ours = request_estimates["qwen3_accel"]
        cases = [(request_key(r, b), request_key("plain", b)) for r, b in request_cases(vars(cfg)) if r in SPECULATIVE]
        report["speculative_vs_plain"] = _ratios({key: ours[key] for key, _ in cases},
                                                 {key: ours[plain] for key, plain in cases},
                                                 paired=False)  # timed in separate rounds
    report["notes"] = []
    noise = {when: times for when, times in (("before", noise_before), ("after", machine_noise(device)))}
    busy = [when for when, times in noise.items() if looked_busy(times)]
    report["machine_noise"] = {**{when: Spread.of(times).to_dict() for when, times in noise.items()},
                               "busy": bool(busy)}
    for when in busy:
        spread = Spread.of(noise[when])
        report["notes"].append(
            f"the machine looked busy {when} the run: a fixed workload took {spread.low * 1e3:.1f} to "
            f"{spread.high * 1e3:.1f} ms (median {spread.median * 1e3:.1f}) over {spread.rounds} runs; contenders "
            "are interleaved, so load falls on all alike, but spreads are wide")
    if variants:
        report["notes"].append("qwen3_accel variants need their own copy of the weights: each was timed after the "
                               "base contenders, so its ratios to them are not paired round by round")
    if "hf_static_compile" in contenders and device.type not in ("cuda", "xpu"):
        report["notes"].append(f"transformers compiles the static-cache decode only on CUDA/XPU (and a few "
                               f"accelerators): on {device.type} hf_static_compile ran uncompiled")
    return report


def _with_spread(median: float | None, spread: dict | None, scale: float = 1.0, digits: int = 1) -> str:
    """"12.3 (11.9-13.0)": a median with its min-max over the rounds."""
    if median is None or spread is None:
        return "unreliable"
    return f"{median * scale:.{digits}f} ({spread['min'] * scale:.{digits}f}-{spread['max'] * scale:.{digits}f})"


def _ratio_text(ratio: dict) -> str:
    if "unreliable" in ratio:
        return f"not measured reliably ({ratio['unreliable']})"
    how = "paired rounds" if ratio["paired"] else "rounds, not paired"
    return f"{ratio['median']:.2f}x ({ratio['min']:.2f}-{ratio['max']:.2f} over {ratio['rounds']} {how})"


def format_table(report: dict[str, Any]) -> str:
    """A plain-text table of one report: each figure as median (min-max over the rounds)."""
    env = report["environment"]
    width = 26
    lines = [
        f"{report['model']} ({report['dtype']}) on {env['device']}; torch {env['torch']}, transformers "
        f"{env['transformers']}, triton {env['triton']}; {env['date']}",
        f"copy bandwidth {report['copy_bandwidth_gb_s']:.0f} GB/s; figures: median (min-max) over the rounds, "
        "contenders interleaved",
    ]
    if report.get("machine_noise", {}).get("busy"):
        lines.append("MACHINE LOOKED BUSY: spreads are wide; see the note below")
    if report.get("tensor_parallel", 1) > 1:
        lines.append(f"tensor parallel over {report['tensor_parallel']} ranks: bytes and roofline per rank")
    contenders = list(report["contenders"])
    results = report["contenders"]
    lines.append(f"{'':28}" + "".join(f"{c:>{width}}" for c in contenders))
    first = results[contenders[0]]
    unreliable = []
    for length in first["ttft_s"]:
        for key, label in (("prefill_s", "prefill prompt"), ("ttft_s", "TTFT prompt")):
            cells = [_with_spread(results[c][key][length], results[c][key + "_spread"][length], 1e3) + " ms"
                     for c in contenders]
            row = "".join(f"{cell:>{width}}" for cell in cells)
            lines.append(f"{label + ' ' + length:28}{row}")
    for batch in first["decode_tok_s"]:
        cells = []
        for c in contenders:
            r = results[c]
            text = _with_spread(r["decode_tok_s"][batch], r["decode_tok_s_spread"][batch], digits=0) + " tok/s"
            if not r["decode_reliable"][batch]:
                unreliable.append(f"{c}, decode batch {batch}: {r['decode_unreliable_reason'][batch]}")
                text = f"unreliable [{len(unreliable)}]"
            cells.append(f"{text:>{width}}")
        lines.append(f"{'decode batch ' + batch:28}{''.join(cells)}")
        share = report["roofline"][batch]["share"]
        row = "".join(f"{'—' if share[c] is None else f'{share[c] * 100:.1f}%':>{width}}" for c in contenders)
        lines.append(f"{'  % of bandwidth roofline':28}{row}")
        row = "".join(f"{results[c]['first_call_s'][batch]:>{width - 2}.1f} s" for c in contenders)
        lines.append(f"{'  first call (compiles)':28}{row}")
        ops = [results[c].get("device_ops_per_step", {}).get(batch) for c in contenders]
        if any(n is not None for n in ops):
            layers = report.get("num_layers") or 1
            row = "".join(f"{'—' if n is None else f'{n:.0f} ({n / layers:.1f}/layer)':>{width}}" for n in ops)
            lines.append(f"{'  GPU ops per step':28}{row}")
    if first["peak_memory_gib"] is not None:
        row = "".join(f"{results[c]['peak_memory_gib']:>{width - 4}.2f} GiB" for c in contenders)
        lines.append(f"{'peak memory':28}{row}")
    for request in (request_key(r, b) for r, b in request_cases(report["config"])):
        cells = []
        for c in contenders:
            r = results[c].get("requests", {}).get(request)
            if r is None:
                text = "—"
            elif r["decode_reliable"]:
                text = _with_spread(r["decode_tok_s"], r["decode_tok_s_spread"], digits=0) + " tok/s"
            else:
                text = "unreliable"
            cells.append(f"{text:>{width}}")
        kept = results.get("qwen3_accel", {}).get("requests", {}).get(request, {}).get("acceptance")
        label = request if kept is None else f"{request} ({kept * 100:.0f}% kept)"
        lines.append(f"{label:28}{''.join(cells)}")
    for name, by_batch in report["speedup"].items():
        lines.append(f"{name}: " + "; ".join(f"batch {b}: {_ratio_text(x)}" for b, x in by_batch.items()))
    if report.get("request_speedup"):
        lines.append("qwen3_accel_vs_hf_eager, requests: " +
                     "; ".join(f"{name}: {_ratio_text(x)}" for name, x in report["request_speedup"].items()))
    if report.get("speculative_vs_plain"):
        lines.append("qwen3_accel speculative vs plain decoding: " +
                     "; ".join(f"{name}: {_ratio_text(x)}" for name, x in report["speculative_vs_plain"].items()))
    lines += [f"[{i}] {text}" for i, text in enumerate(unreliable, 1)]
    lines += [f"note: {note}" for note in report.get("notes", [])]
    return "\n".join(lines)


def write_report(report: dict[str, Any], out_dir: str) -> list[str]:
    """JSON, table and PNG plots (tok/s by batch size; speedup bars; tok/s of the requests) into `out_dir`;
    returns the paths."""
    plt = pyplot()
    import matplotlib.ticker

    stem = os.path.join(out_dir, f"bench_{report['model']}")
    paths = [f"{stem}.json", f"{stem}.txt", f"{stem}_decode.png"]
    write_json_and_table(report, format_table(report), paths[0], paths[1])

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, result in report["contenders"].items():  # medians, bars from min to max; unreliable points left out
        points = [(int(b), v, result["decode_tok_s_spread"][b]) for b, v in result["decode_tok_s"].items()
                  if v is not None and result["decode_reliable"][b]]
        if points:
            xs, ys, spreads = zip(*points)
            errors = [[y - sp["min"] for y, sp in zip(ys, spreads)], [sp["max"] - y for y, sp in zip(ys, spreads)]]
            ax.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=name)
    bounds = report["roofline"]
    ax.plot([int(b) for b in bounds], [v["bound_tok_s"] for v in bounds.values()], "k--", label="bandwidth bound")
    ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="decode tokens/s",
           title=f"{report['model']} decode, {report['environment']['device']}")
    batch_sizes = [int(b) for b in bounds]
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xticks(batch_sizes, [str(b) for b in batch_sizes])
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths[2], dpi=120)
    plt.close(fig)

    if report["speedup"]:
        paths.append(f"{stem}_speedup.png")
        fig, ax = plt.subplots(figsize=(6, 4))
        names = list(report["speedup"])
        batches = list(next(iter(report["speedup"].values())))
        width = 0.8 / len(names)
        for i, name in enumerate(names):  # medians, bars from min to max; unreliable cases left out
            shown = [(j, report["speedup"][name][b]) for j, b in enumerate(batches)
                     if "unreliable" not in report["speedup"][name][b]]
            if shown:
                xs = [j + i * width for j, _ in shown]
                ys = [r["median"] for _, r in shown]
                errors = [[r["median"] - r["min"] for _, r in shown], [r["max"] - r["median"] for _, r in shown]]
                ax.bar(xs, ys, width, yerr=errors, capsize=3, label=name)
        ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(batches))], [f"batch {b}" for b in batches])
        ax.axhline(1.0, color="k", linewidth=0.8)
        ax.set(ylabel="decode speedup (x)", title=f"{report['model']}: qwen3_accel speedup")
        ax.legend()
        fig.tight_layout()
        fig.savefig(paths[3], dpi=120)
        plt.close(fig)
    requests = {name: result["requests"] for name, result in report["contenders"].items() if result.get("requests")}
    if requests:
        paths.append(f"{stem}_requests.png")
        keys = [key for key in (request_key(r, b) for r, b in request_cases(report["config"]))
                if any(key in entries for entries in requests.values())]
        fig, ax = plt.subplots(figsize=(7, 0.45 * len(keys) * len(requests) + 1.5))
        height = 0.8 / len(requests)
        for i, (name, entries) in enumerate(requests.items()):  # medians, bars from min to max; unreliable left out
            shown = [(j, entries[key]) for j, key in enumerate(keys)
                     if key in entries and entries[key]["decode_reliable"]]
            if shown:
                ys = [j + i * height for j, _ in shown]
                xs = [r["decode_tok_s"] for _, r in shown]
                errors = [[r["decode_tok_s"] - r["decode_tok_s_spread"]["min"] for _, r in shown],
                          [r["decode_tok_s_spread"]["max"] - r["decode_tok_s"] for _, r in shown]]
                ax.barh(ys, xs, height, xerr=errors, capsize=3, label=name)
        ax.set_yticks([j + height * (len(requests) - 1) / 2 for j in range(len(keys))], keys)
        ax.invert_yaxis()
        ax.set(xlabel="decode tokens/s", title=f"{report['model']}: requests, {report['environment']['device']}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths
