"""End-to-end benchmark: HF eager, HF's static-cache + compile recipe, and qwen3_accel, in one process.

Every contender generates from the same random prompts with the same weights. Decode speed is
isolated from prefill by timing `generate` with 1 and with 1 + N new tokens and dividing the
difference; prefill latency is the time to the first token. The copy bandwidth measured in the same
run gives the roofline: bytes a decode step must read (weights, plus the valid KV cache) over it.
On CUDA the profiler also counts the GPU operations (kernels, copies) one decode step launches.
"""

import datetime
import json
import os
import platform
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import transformers
from tqdm.auto import tqdm

from .compat import CACHE_ARG
from .loading import is_main_process, load_model

CONTENDERS = ("hf_eager", "hf_static_compile", "qwen3_accel")
# Requests that run HF's generation loop (not the fast loop), measured at batch 1 for hf_eager and qwen3_accel:
# beam search and assisted decoding over HF's DynamicCache, a logits processor over our cache. The assistant is
# the model itself (every draft accepted: the upper bound of assisted decoding, and the only meaningful one with
# random weights).
REQUESTS = ("beam4", "assisted", "penalty")


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
    repeats: int = 3
    kernels: str = "auto"
    weights: tuple[str, ...] = ()  # quantized formats measured after the others, each as `qwen3_accel_<format>`
    decode_linear: tuple[str, ...] = ()  # other `decode_linear` modes, each as `qwen3_accel_decode_linear_<mode>`
    requests: tuple[str, ...] = ()  # from REQUESTS: HF-loop requests timed for hf_eager and qwen3_accel
    extra: dict[str, Any] = field(default_factory=dict)

    def max_cache_len(self) -> int:
        """The cache length every timed request fits in: the longest prompt, then 1 + decode_tokens new tokens."""
        return max(*self.prompt_lengths, self.decode_prompt_length) + 1 + self.decode_tokens


class Timer:
    """Wall time of a callable: CUDA events around it on a GPU, perf_counter elsewhere."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], Any]) -> float:
        if not self.cuda:
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        begin.record()
        fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1e3


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


def decode_seconds(timer: Timer, first: Callable[[], Any], full: Callable[[], Any], repeats: int, what: str) -> float:
    """Time of the decode steps alone: `full` (1 + N new tokens) minus `first` (1 new token), medians of `repeats`;
    NaN, with a warning naming `what`, when the difference is lost in timing noise."""
    seconds = median_time(timer, full, repeats) - median_time(timer, first, repeats)
    if seconds <= 0:
        warnings.warn(f"{what}: decode time lost in timing noise; raise --decode-tokens")
        return float("nan")
    return seconds


def request_kwargs(name: str, model) -> dict[str, Any]:
    """The generate() arguments of a named HF-loop request (see REQUESTS)."""
    if name == "beam4":
        return dict(num_beams=4)
    if name == "assisted":
        return dict(assistant_model=model)
    if name == "penalty":
        return dict(repetition_penalty=1.1)
    raise ValueError(f"unknown request {name!r}; choose from {REQUESTS}")


def bench_requests(model, cfg: BenchConfig, progress: tqdm) -> dict[str, dict[str, float]]:
    """Decode tokens/s of each HF-loop request at batch 1: as for plain decode, `generate` with 1 + N new tokens
    minus `generate` with 1, over N."""
    device = model.device
    timer = Timer(device)
    ids = _prompts(1, cfg.decode_prompt_length, model.config.vocab_size, device)
    results = {}
    for name in cfg.requests:
        progress.set_postfix_str(f"request {name}")
        extra = request_kwargs(name, model)
        first, full = (_generate_fn(model, ids, n, extra=extra) for n in (1, 1 + cfg.decode_tokens))
        full()  # warm-up
        seconds = decode_seconds(timer, first, full, cfg.repeats, f"request {name}")
        results[name] = {"decode_tok_s": cfg.decode_tokens / seconds,
                         "decode_step_ms": 1e3 * seconds / cfg.decode_tokens}
        progress.update(1)
    return results


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


def bench_contender(model, contender: str, cfg: BenchConfig, progress: tqdm) -> dict[str, Any]:
    """Prefill latency and time to first token by prompt length, decode tokens/s by batch size, for one contender.

    Prefill is one forward over a batch-1 prompt (no cache, last-position logits); time to first token is a whole
    `generate` call with one new token (prefill, cache writes, token selection and HF's per-call set-up).
    """
    device = model.device
    timer = Timer(device)
    vocab = model.config.vocab_size
    result: dict[str, Any] = {"prefill_s": {}, "ttft_s": {}, "decode_tok_s": {}, "decode_step_ms": {},
                              "first_call_s": {}, "device_ops_per_step": {}}
    static_caches: dict[int, Any] = {}

    def generate_fn(ids: torch.Tensor, new_tokens: int) -> Callable[[], Any]:
        cache = None
        if contender == "hf_static_compile":
            from transformers import StaticCache

            cache = static_caches.setdefault(
                ids.shape[0], StaticCache(config=model.config, max_cache_len=cfg.max_cache_len()))
        return _generate_fn(model, ids, new_tokens, cache)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for length in cfg.prompt_lengths:
        progress.set_postfix_str(f"{contender} prefill {length}")
        ids = _prompts(1, length, vocab, device)
        with torch.no_grad():
            def prefill():
                return model(input_ids=ids, use_cache=False, logits_to_keep=1)

            prefill()
            result["prefill_s"][str(length)] = median_time(timer, prefill, cfg.repeats)
        fn = generate_fn(ids, 1)
        fn()
        result["ttft_s"][str(length)] = median_time(timer, fn, cfg.repeats)
        progress.update(1)
    for batch in cfg.batch_sizes:
        progress.set_postfix_str(f"{contender} decode batch {batch}")
        ids = _prompts(batch, cfg.decode_prompt_length, vocab, device)
        first = generate_fn(ids, 1)
        full = generate_fn(ids, 1 + cfg.decode_tokens)
        if contender == "hf_static_compile":
            # A fresh compile per batch size, as for a user who serves one batch size: without it the second
            # size recompiles with a dynamic batch dimension, slower to compile and to run.
            torch._dynamo.reset()
        start = time.perf_counter()
        full()  # warm-up: compiles and records graphs for this shape
        result["first_call_s"][str(batch)] = time.perf_counter() - start
        full()
        seconds = decode_seconds(timer, first, full, cfg.repeats, f"{contender}, batch {batch}")
        result["decode_tok_s"][str(batch)] = batch * cfg.decode_tokens / seconds
        result["decode_step_ms"][str(batch)] = 1e3 * seconds / cfg.decode_tokens
        result["device_ops_per_step"][str(batch)] = device_ops_per_step(first, full, cfg.decode_tokens, device)
        progress.update(1)
    # Peak GPU memory while this contender ran (None on CPU, where it is not tracked).
    result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return result


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


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Measure every contender on one model; returns the report (see `write_report`)."""
    import qwen3_accel

    device = torch.device(cfg.device)
    dtype = getattr(torch, cfg.dtype)
    model = load_model(cfg.model, device, dtype)
    bandwidth = copy_bandwidth(device)
    report: dict[str, Any] = {
        "model": cfg.model, "dtype": cfg.dtype, "tensor_parallel": _world_size(),
        "num_layers": model.config.num_hidden_layers,
        "config": {k: v for k, v in vars(cfg).items() if k != "extra"},
        "environment": environment(device), "copy_bandwidth_gb_s": bandwidth / 1e9, "contenders": {},
    }
    # Variants of qwen3_accel, each measured after the others on a fresh copy of the weights (optimize patches
    # in place; quantizing replaces them), one at a time.
    variants = [(f"qwen3_accel_{w}", dict(weights=w)) for w in cfg.weights]
    variants += [(f"qwen3_accel_decode_linear_{m}", dict(decode_linear=m)) for m in cfg.decode_linear]
    steps = (len(cfg.contenders) + len(variants)) * (len(cfg.prompt_lengths) + len(cfg.batch_sizes))
    request_contenders = [c for c in ("hf_eager", "qwen3_accel") if c in cfg.contenders] if cfg.requests else []
    steps += len(request_contenders) * len(cfg.requests)
    context = cfg.decode_prompt_length + cfg.decode_tokens // 2
    max_len = cfg.max_cache_len()
    step_bytes = {batch: decode_bytes_per_step(model, batch, context) for batch in cfg.batch_sizes}
    with tqdm(total=steps, desc=f"bench {cfg.model}", unit="case", disable=not is_main_process()) as progress:
        # qwen3_accel patches the model in place, so it runs last; the HF contenders share its weights.
        for contender in sorted(cfg.contenders, key=CONTENDERS.index):
            if contender == "qwen3_accel":
                qwen3_accel.optimize(model, kernels=cfg.kernels, max_batch_size=max(cfg.batch_sizes),
                                     max_cache_len=max_len)
            report["contenders"][contender] = bench_contender(model, contender, cfg, progress)
            if contender in request_contenders:
                report["contenders"][contender]["requests"] = bench_requests(model, cfg, progress)
            torch._dynamo.reset()
        quantized_bytes = {}
        for name, options in variants:
            del model
            _free_memory(device)
            model = qwen3_accel.optimize(load_model(cfg.model, device, dtype), kernels=cfg.kernels,
                                         max_batch_size=max(cfg.batch_sizes), max_cache_len=max_len, **options)
            report["contenders"][name] = bench_contender(model, "qwen3_accel", cfg, progress)
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
            share[c] = r["decode_tok_s"][str(batch)] / own_bound
        report["roofline"][str(batch)] = {
            "bytes_per_step": step_bytes[batch],
            "bound_tok_s": bound,
            "share": share,
            "quantized_bytes_per_step": {c: b[batch] for c, b in quantized_bytes.items()},
        }
    tok_s = {c: r["decode_tok_s"] for c, r in report["contenders"].items()}
    report["speedup"] = {
        f"{ours}_vs_{base}": {n: tok_s[ours][n] / tok_s[base][n] for n in tok_s[ours]}
        for ours in tok_s if ours.startswith("qwen3_accel")
        for base in ("hf_eager", "hf_static_compile", "qwen3_accel") if base in tok_s and base != ours
    }
    if len(request_contenders) == 2:
        ours, base = (report["contenders"][c]["requests"] for c in ("qwen3_accel", "hf_eager"))
        report["request_speedup"] = {name: ours[name]["decode_tok_s"] / base[name]["decode_tok_s"]
                                     for name in cfg.requests}
    report["notes"] = []
    if "hf_static_compile" in cfg.contenders and device.type not in ("cuda", "xpu"):
        report["notes"].append(f"transformers compiles the static-cache decode only on CUDA/XPU (and a few "
                               f"accelerators): on {device.type} hf_static_compile ran uncompiled")
    return report


def format_table(report: dict[str, Any]) -> str:
    """A plain-text table of one report."""
    env = report["environment"]
    lines = [
        f"{report['model']} ({report['dtype']}) on {env['device']}; torch {env['torch']}, transformers "
        f"{env['transformers']}, triton {env['triton']}; {env['date']}",
        f"copy bandwidth {report['copy_bandwidth_gb_s']:.0f} GB/s",
    ]
    if report.get("tensor_parallel", 1) > 1:
        lines.append(f"tensor parallel over {report['tensor_parallel']} ranks: bytes and roofline per rank")
    contenders = list(report["contenders"])
    header = f"{'':28}" + "".join(f"{c:>20}" for c in contenders)
    lines.append(header)
    first = report["contenders"][contenders[0]]
    for length in first["ttft_s"]:
        row = "".join(f"{report['contenders'][c]['prefill_s'][length] * 1e3:>17.1f} ms" for c in contenders)
        lines.append(f"{'prefill prompt ' + length:28}{row}")
        row = "".join(f"{report['contenders'][c]['ttft_s'][length] * 1e3:>17.1f} ms" for c in contenders)
        lines.append(f"{'TTFT prompt ' + length:28}{row}")
    for batch in first["decode_tok_s"]:
        row = "".join(f"{report['contenders'][c]['decode_tok_s'][batch]:>15.1f} tok/s" for c in contenders)
        lines.append(f"{'decode batch ' + batch:28}{row}")
        share = report["roofline"][batch]["share"]
        row = "".join(f"{share[c] * 100:>19.1f}%" for c in contenders)
        lines.append(f"{'  % of bandwidth roofline':28}{row}")
        row = "".join(f"{report['contenders'][c]['first_call_s'][batch]:>18.1f} s" for c in contenders)
        lines.append(f"{'  first call (compiles)':28}{row}")
        ops = [report["contenders"][c].get("device_ops_per_step", {}).get(batch) for c in contenders]
        if any(n is not None for n in ops):
            layers = report.get("num_layers") or 1
            row = "".join(f"{'—' if n is None else f'{n:.0f} ({n / layers:.1f}/layer)':>20}" for n in ops)
            lines.append(f"{'  GPU ops per step':28}{row}")
    if first["peak_memory_gib"] is not None:
        row = "".join(f"{report['contenders'][c]['peak_memory_gib']:>16.2f} GiB" for c in contenders)
        lines.append(f"{'peak memory':28}{row}")
    for request in report["config"].get("requests", ()):
        results = [report["contenders"][c].get("requests", {}).get(request) for c in contenders]
        row = "".join(f"{'—':>20}" if r is None else f"{r['decode_tok_s']:>14.1f} tok/s" for r in results)
        lines.append(f"{request + ' (HF loop), batch 1':28}{row}")
    for name, by_batch in report["speedup"].items():
        lines.append(f"{name}: " + ", ".join(f"batch {b}: {x:.2f}x" for b, x in by_batch.items()))
    if report.get("request_speedup"):
        lines.append("qwen3_accel_vs_hf_eager, HF-loop requests: " +
                     ", ".join(f"{name}: {x:.2f}x" for name, x in report["request_speedup"].items()))
    lines += [f"note: {note}" for note in report.get("notes", [])]
    return "\n".join(lines)


def write_report(report: dict[str, Any], out_dir: str) -> list[str]:
    """JSON, table and PNG plots (tok/s by batch size; speedup bars) into `out_dir`; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"bench_{report['model']}")
    paths = [f"{stem}.json", f"{stem}.txt", f"{stem}_decode.png"]
    with open(paths[0], "w") as f:
        json.dump(report, f, indent=2)
    with open(paths[1], "w") as f:
        f.write(format_table(report) + "\n")

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, result in report["contenders"].items():
        batches = [int(b) for b in result["decode_tok_s"]]
        ax.plot(batches, list(result["decode_tok_s"].values()), marker="o", label=name)
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
        for i, name in enumerate(names):
            xs = [j + i * width for j in range(len(batches))]
            ax.bar(xs, [report["speedup"][name][b] for b in batches], width, label=name)
        ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(batches))], [f"batch {b}" for b in batches])
        ax.axhline(1.0, color="k", linewidth=0.8)
        ax.set(ylabel="decode speedup (x)", title=f"{report['model']}: qwen3_accel speedup")
        ax.legend()
        fig.tight_layout()
        fig.savefig(paths[3], dpi=120)
        plt.close(fig)
    return paths
