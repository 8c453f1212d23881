"""Serving benchmark: many users at once, on qwen3_accel's continuous batching, HF's own, and static batches.

A seeded trace (Poisson arrivals at `rate` requests/s, or all at once; prompt and output lengths drawn uniformly
within ±`length_spread` of their means; eos ignored, so every request makes exactly its tokens) is replayed with
at most `concurrency` requests in flight against:
  qwen3_accel     the optimized model's continuous batching (serving/: paged KV cache, our kernels, decode graphs)
  qwen3_accel_no_overlap  the same with each step's tokens read before the next step is scheduled (on CUDA the
                  engine overlaps the two by default; on the CPU it never does, so this is qwen3_accel again);
                  not run unless asked for
  qwen3_accel_eager_chunks  the same with steps that carry prompt chunks run eagerly instead of through their
                  graphs (on CUDA they replay one by default; on the CPU never, so this is qwen3_accel again);
                  not run unless asked for
  hf_cb           HF's continuous batching on a plain copy of the same weights (its default attention)
  static          our generate() on left-padded batches: up to `concurrency` requests that have arrived start
                  together, and the next batch waits for the whole batch to end
The contenders take turns round by round (timing.py's rule: load falls on all alike) over the same trace, and
every figure is the median over the rounds with its min-max: output tokens/s, time to first token (TTFT) and time
per output token after it (TPOT, per request) at p50 and p99, inter-token latency (ITL) for the streaming
engines, and KV memory: the pool each engine reserves and the most our engine used.
"""

import math
import os
import random
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from . import compat
from .bench import environment
from .loading import load_model
from .reports import pyplot, write_json_and_table
from .timing import ROUNDS_AGREE, Spread, looked_busy, machine_noise

SERVE_CONTENDERS = ("qwen3_accel", "qwen3_accel_no_overlap", "qwen3_accel_eager_chunks", "hf_cb", "static")
DEFAULT_SERVE_CONTENDERS = ("qwen3_accel", "hf_cb", "static")
OUR_ENGINES = {"qwen3_accel": {}, "qwen3_accel_no_overlap": {"overlap": False},  # contender -> engine options
               "qwen3_accel_eager_chunks": {"chunk_graphs": False}}
HF_PAGE_TOKENS = 256  # HF's default page size (tokens per page of its paged cache)


@dataclass(frozen=True)
class ServeBenchConfig:
    model: str = "Qwen3-0.6B"
    device: str = "cuda"
    dtype: str = "bfloat16"
    kernels: str = "auto"
    contenders: tuple[str, ...] = DEFAULT_SERVE_CONTENDERS
    concurrency: tuple[int, ...] = (1, 32, 64)
    requests: int | None = None  # per case; default 2x the concurrency (at least 8)
    rate: float = math.inf  # requests per second (Poisson); inf: all arrive at once
    prompt_len: int = 128
    output_len: int = 128
    length_spread: float = 0.0  # lengths uniform in mean x [1 - spread, 1 + spread]
    repeats: int = 3
    max_batch_tokens: int | None = None  # our engine's and HF's; default the engine's for the device
    seed: int = 0

    def requests_for(self, concurrency: int) -> int:
        return self.requests or max(8, 2 * concurrency)


@dataclass(frozen=True)
class TraceRequest:
    arrival: float  # seconds after the start
    prompt: list[int]
    new_tokens: int


def make_trace(count: int, rate: float, prompt_len: int, output_len: int, spread: float, vocab: int,
               seed: int) -> list[TraceRequest]:
    """`count` requests: exponential gaps of mean 1/rate (none when rate is inf), lengths around their means."""
    rng = random.Random(seed)

    def length(mean: int) -> int:
        return max(1, round(mean * rng.uniform(1 - spread, 1 + spread)))

    clock, trace = 0.0, []
    for _ in range(count):
        trace.append(TraceRequest(clock, [rng.randrange(1, vocab) for _ in range(length(prompt_len))],
                                  length(output_len)))
        if math.isfinite(rate):
            clock += rng.expovariate(rate)
    return trace


@dataclass
class Served:
    """One request as a contender answered it: when it was submitted, when each token arrived (perf_counter) and
    how many it made (HF's engine restarts a preempted request's timestamps, so they may miss early tokens)."""

    submitted: float
    token_times: list[float]
    tokens: int

    @property
    def timed_whole(self) -> bool:
        return len(self.token_times) == self.tokens


def replay_on_manager(manager, trace: list[TraceRequest], concurrency: int) -> list[Served]:
    """The trace through a continuous-batching manager (ours or HF's): arrivals in time, at most `concurrency` in
    flight, each token's time from the manager's own timestamps."""
    start, pending, served = time.perf_counter(), list(enumerate(trace)), {}
    in_flight: dict[str, tuple[int, float]] = {}
    while pending or in_flight:
        now = time.perf_counter() - start
        while pending and len(in_flight) < concurrency and pending[0][1].arrival <= now:
            index, request = pending.pop(0)
            submitted = time.perf_counter()
            request_id = manager.add_request(request.prompt, request_id=f"trace-{index}",
                                             max_new_tokens=request.new_tokens, record_timestamps=True,
                                             eos_token_id=-1)
            in_flight[request_id] = (index, submitted)
        timeout = 0.05
        if pending and len(in_flight) < concurrency:  # wake up for the next arrival
            timeout = min(timeout, max(0.001, pending[0][1].arrival - now))
        result = manager.get_result(timeout=timeout)
        if result is None or not result.is_finished():
            continue
        index, submitted = in_flight.pop(result.request_id)
        if result.error is not None:
            raise RuntimeError(f"request {result.request_id} failed in the benchmark: {result.error}")
        served[index] = Served(submitted, list(result.timestamps), len(result.generated_tokens))
    return [served[i] for i in range(len(trace))]


class _StepTimes:
    """A generate() streamer that records when each generated column arrives (the first put is the prompt)."""

    def __init__(self):
        self.times, self._prompt_seen = [], False

    def put(self, value) -> None:
        if self._prompt_seen:
            self.times.append(time.perf_counter())
        self._prompt_seen = True

    def end(self) -> None:
        """Nothing to flush: each time is taken as its column arrives."""


def replay_static(model, trace: list[TraceRequest], concurrency: int) -> list[Served]:
    """The trace as static batches on generate(): each batch takes up to `concurrency` requests that have
    arrived, left-padded, and runs to its longest output; the next batch starts when it ends. A request counts as
    sent (as in the engines' replay) when a slot is free for it: on arrival while fewer than `concurrency` are in
    flight, else when the batch holding the slots ends. Its tokens arrive as generate() streams them (every 8
    steps in the fast loop, so only its first and last token times are meaningful)."""
    start, pending, served = time.perf_counter(), list(enumerate(trace)), {}
    device = model.lm_head.weight.device
    previous = (0.0, 0.0, concurrency)  # the last batch's (start, end, free slots), seconds after the start
    while pending:
        now = time.perf_counter() - start
        if pending[0][1].arrival > now:
            time.sleep(pending[0][1].arrival - now)
            continue
        batch = []
        while pending and len(batch) < concurrency and pending[0][1].arrival <= now:
            batch.append(pending.pop(0))
        sent, (prev_start, prev_end, free) = {}, previous
        for index, request in batch:
            if request.arrival >= prev_end or (request.arrival > prev_start and free > 0):
                free -= request.arrival < prev_end
                sent[index] = start + request.arrival
            else:  # it waited for a slot of the last batch
                sent[index] = start + prev_end
        width = max(len(r.prompt) for _, r in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, (_, request) in enumerate(batch):
            ids[row, width - len(request.prompt):] = torch.tensor(request.prompt)
            mask[row, width - len(request.prompt):] = 1
        streamer = _StepTimes()
        model.generate(ids.to(device), attention_mask=mask.to(device), do_sample=False, pad_token_id=0,
                       eos_token_id=None, max_new_tokens=max(r.new_tokens for _, r in batch), streamer=streamer)
        previous = (now, time.perf_counter() - start, concurrency - len(batch))
        for index, request in batch:
            served[index] = Served(sent[index], streamer.times[: request.new_tokens], request.new_tokens)
    return [served[i] for i in range(len(trace))]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def round_figures(served: list[Served], streams_tokens: bool) -> dict[str, float | None]:
    """One round's figures: output tokens/s over the whole replay, TTFT / TPOT / ITL percentiles in ms (from the
    requests whose every token has its time), and how many requests had missing token times."""
    first_submit = min(s.submitted for s in served)
    last_token = max(s.token_times[-1] for s in served)
    tokens = sum(s.tokens for s in served)
    timed = [s for s in served if s.timed_whole] or served
    ttft = [(s.token_times[0] - s.submitted) * 1e3 for s in timed]
    tpot = [(s.token_times[-1] - s.token_times[0]) * 1e3 / (len(s.token_times) - 1) for s in timed
            if len(s.token_times) > 1]
    itl = [(b - a) * 1e3 for s in timed for a, b in zip(s.token_times, s.token_times[1:])] if streams_tokens else []
    figures = {"tok_s": tokens / (last_token - first_submit), "ttft_p50_ms": percentile(ttft, 50),
               "ttft_p99_ms": percentile(ttft, 99), "partly_timed": len(served) - len(timed)}
    figures["tpot_p50_ms"] = percentile(tpot, 50) if tpot else None
    figures["tpot_p99_ms"] = percentile(tpot, 99) if tpot else None
    figures["itl_p50_ms"] = percentile(itl, 50) if itl else None
    figures["itl_p99_ms"] = percentile(itl, 99) if itl else None
    return figures


def _bytes_per_token(model) -> int:
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * model.lm_head.weight.dtype.itemsize


def run_serve_bench(cfg: ServeBenchConfig) -> dict[str, Any]:
    """Every contender over every concurrency; returns the report (see `write_serve_report`)."""
    import qwen3_accel
    from transformers import ContinuousBatchingConfig, GenerationConfig
    from transformers.generation.continuous_batching.utils import WorkloadHints

    from .serving.manager import MAX_BATCH_TOKENS

    device, dtype = torch.device(cfg.device), getattr(torch, cfg.dtype)
    contenders = [c for c in SERVE_CONTENDERS if c in cfg.contenders]
    ours = None
    if {*OUR_ENGINES, "static"} & set(contenders):
        ours = qwen3_accel.optimize(load_model(cfg.model, device, dtype), kernels=cfg.kernels,
                                    max_batch_size=max(cfg.concurrency))
    plain = load_model(cfg.model, device, dtype) if "hf_cb" in contenders else None
    any_model = ours if ours is not None else plain
    vocab, per_token = any_model.config.vocab_size, _bytes_per_token(any_model)
    max_batch_tokens = cfg.max_batch_tokens or MAX_BATCH_TOKENS.get(device.type, 256)
    noise_before = machine_noise(device)
    report: dict[str, Any] = {"model": cfg.model, "dtype": cfg.dtype, "config": asdict(cfg),
                              "environment": environment(device), "cases": {}, "notes": []}
    report["config"]["rate"] = "inf" if math.isinf(cfg.rate) else cfg.rate  # JSON has no infinity
    generation = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=0)
    cases = [(c, cfg.requests_for(c)) for c in cfg.concurrency]
    total = sum(len(contenders) * (cfg.repeats + 1) for _ in cases)
    with tqdm(total=total, desc=f"bench-serve {cfg.model}", unit="run") as progress:
        for concurrency, count in cases:
            trace = make_trace(count, cfg.rate, cfg.prompt_len, cfg.output_len, cfg.length_spread, vocab, cfg.seed)
            longest = max(len(r.prompt) + r.new_tokens for r in trace)
            # Both engines get the same pool: room for every request in flight at its longest, plus a quarter.
            pool_tokens = math.ceil(1.25 * concurrency * longest)
            pool = ContinuousBatchingConfig(num_blocks=-(-pool_tokens // HF_PAGE_TOKENS),
                                            max_batch_tokens=max_batch_tokens, max_requests_per_batch=concurrency,
                                            **{compat.CB_PAGE_FIELD: HF_PAGE_TOKENS})
            runs: dict[str, Any] = {}
            managers = []
            hints = WorkloadHints(max(len(r.prompt) for r in trace), max(r.new_tokens for r in trace), count)
            for name in (c for c in contenders if c in OUR_ENGINES):
                manager = ours.init_continuous_batching(generation_config=generation, continuous_batching_config=pool,
                                                        workload_hints=hints)
                manager.engine_options.update(OUR_ENGINES[name])
                manager.warmup()  # every decode graph the trace can reach, compiled before the first round
                manager.start()
                managers.append(manager)
                runs[name] = lambda m=manager: replay_on_manager(m, trace, concurrency)
            if "hf_cb" in contenders:
                hf_manager = plain.init_continuous_batching(generation_config=generation,
                                                            continuous_batching_config=pool)
                hf_manager.start()
                managers.append(hf_manager)
                runs["hf_cb"] = lambda m=hf_manager: replay_on_manager(m, trace, concurrency)
            if "static" in contenders:
                runs["static"] = lambda: replay_static(ours, trace, concurrency)
            rounds: dict[str, list[dict]] = {name: [] for name in runs}
            try:
                for round_index in range(cfg.repeats + 1):  # round 0 warms up (compiles graphs), untimed
                    for name, run in runs.items():
                        served = run()
                        progress.update(1)
                        if round_index:
                            rounds[name].append(round_figures(served, streams_tokens=name != "static"))
                peak_blocks = managers[0].engine.block_manager.peak_used if "qwen3_accel" in runs else None
                block_tokens = managers[0].engine.block_manager.block_size if "qwen3_accel" in runs else None
            finally:
                for manager in managers:
                    manager.stop(block=True)
            report["cases"][str(concurrency)] = _case_report(rounds, trace, pool_tokens, per_token, peak_blocks,
                                                             block_tokens)
    noise_after = machine_noise(device)
    busy = [when for when, times in (("before", noise_before), ("after", noise_after)) if looked_busy(times)]
    report["machine_noise"] = {"before": Spread.of(noise_before).to_dict(), "after": Spread.of(noise_after).to_dict(),
                               "busy": bool(busy)}
    for when in busy:
        report["notes"].append(f"the machine looked busy {when} the run (a fixed workload's slowest run or upper "
                               "quartile far above its fastest): spreads are wide")
    if "static" in contenders:
        report["notes"].append("static: generate() streams the fast loop's tokens every 8 steps, so its TPOT is "
                               "per request (first to last token) and it has no ITL")
    return report


def _case_report(rounds: dict[str, list[dict]], trace: list[TraceRequest], pool_tokens: int, per_token: int,
                 peak_blocks: int | None, block_tokens: int | None) -> dict[str, Any]:
    case: dict[str, Any] = {"requests": len(trace), "prompt_tokens": sum(len(r.prompt) for r in trace),
                            "output_tokens": sum(r.new_tokens for r in trace), "contenders": {}}
    for name, per_round in rounds.items():
        figures: dict[str, Any] = {}
        for key in (k for k in per_round[0] if k != "partly_timed"):
            values = [r[key] for r in per_round if r[key] is not None]
            figures[key] = Spread.of(values).to_dict() if values else None
        tok_s = [r["tok_s"] for r in per_round]
        figures["partly_timed"] = max(r["partly_timed"] for r in per_round)  # (not a spread: a count)
        figures["reliable"] = max(tok_s) <= ROUNDS_AGREE * min(tok_s)
        if not figures["reliable"]:
            figures["unreliable_reason"] = (f"throughput varied more than {ROUNDS_AGREE:g}x over the rounds "
                                            f"({min(tok_s):.1f} to {max(tok_s):.1f} tok/s)")
        if name in (*OUR_ENGINES, "hf_cb"):
            figures["kv_reserved_mb"] = pool_tokens * per_token / 2**20
        case["contenders"][name] = figures
    if peak_blocks is not None:
        case["contenders"]["qwen3_accel"]["kv_peak_used_mb"] = peak_blocks * block_tokens * per_token / 2**20
    ratios = {}
    for base in ("qwen3_accel_no_overlap", "qwen3_accel_eager_chunks", "hf_cb", "static"):
        if "qwen3_accel" in rounds and base in rounds:
            paired = [a["tok_s"] / b["tok_s"] for a, b in zip(rounds["qwen3_accel"], rounds[base])]
            reliable = case["contenders"]["qwen3_accel"]["reliable"] and case["contenders"][base]["reliable"]
            ratios[f"qwen3_accel_vs_{base}"] = Spread.of(paired).to_dict() if reliable else {
                "unreliable": "a contender's throughput varied more than 2x over the rounds"}
    case["throughput_ratio"] = ratios
    return case


def _fmt(spread: dict | None, digits: int = 1) -> str:
    if spread is None:
        return "-"
    return f"{spread['median']:.{digits}f} ({spread['min']:.{digits}f}-{spread['max']:.{digits}f})"


def format_serve_table(report: dict[str, Any]) -> str:
    env = report["environment"]
    cfg = report["config"]
    lines = [f"bench-serve {report['model']} {report['dtype']} on {env['device']} (torch {env['torch']}, "
             f"transformers {env['transformers']}, {env['date']})",
             f"trace: {cfg['prompt_len']} prompt / {cfg['output_len']} output tokens (±{cfg['length_spread']:.0%}), "
             f"arrivals {cfg['rate']} req/s, {cfg['repeats']} rounds; median (min-max) over the rounds",
             ""]
    header = (f"{'users':>5}  {'contender':<22} {'output tok/s':>24} {'TTFT p50 ms':>22} {'TTFT p99 ms':>22} "
              f"{'TPOT p50 ms':>20} {'ITL p99 ms':>20} {'KV MB':>12}")
    lines += [header, "-" * len(header)]
    for users, case in report["cases"].items():
        for name, f in case["contenders"].items():
            kv = f.get("kv_peak_used_mb")
            kv_text = f"{f['kv_reserved_mb']:.3g}" if "kv_reserved_mb" in f else "-"
            if kv is not None:
                kv_text = f"{kv:.3g}/{kv_text}"
            lines.append(f"{users:>5}  {name:<22} {_fmt(f['tok_s']):>24} {_fmt(f['ttft_p50_ms']):>22} "
                         f"{_fmt(f['ttft_p99_ms']):>22} {_fmt(f['tpot_p50_ms'], 2):>20} {_fmt(f['itl_p99_ms'], 2):>20} "
                         f"{kv_text:>12}")
            if not f["reliable"]:
                lines.append(f"{'':>5}  {'':<22} unreliable: {f['unreliable_reason']}")
            if f["partly_timed"]:
                lines.append(f"{'':>5}  {'':<22} latencies from the other requests: {f['partly_timed']} were "
                             "preempted and restarted, their early token times lost")
        for name, ratio in case["throughput_ratio"].items():
            text = ratio["unreliable"] if "unreliable" in ratio else (
                f"{ratio['median']:.2f}x ({ratio['min']:.2f}-{ratio['max']:.2f}x over {ratio['rounds']} paired rounds)")
            lines.append(f"{'':>5}  {name}: {text}")
    lines.append("KV MB: our engine's peak use / the pool reserved (both engines get the same pool)")
    lines += [f"note: {note}" for note in report["notes"]]
    return "\n".join(lines)


def write_serve_report(report: dict[str, Any], out_dir: str) -> list[str]:
    """JSON, table and a PNG (output tok/s and TTFT p50 by concurrency, with min-max bars) into `out_dir`."""
    plt = pyplot()
    stem = os.path.join(out_dir, f"bench_serve_{report['model'].replace('/', '_')}")
    paths = [f"{stem}.json", f"{stem}.txt", f"{stem}.png"]
    write_json_and_table(report, format_serve_table(report), paths[0], paths[1])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    users = [int(u) for u in report["cases"]]
    names = list(next(iter(report["cases"].values()))["contenders"])
    for ax, key, label in ((axes[0], "tok_s", "output tokens/s"), (axes[1], "ttft_p50_ms", "TTFT p50 (ms)")):
        for name in names:
            points = [(u, report["cases"][str(u)]["contenders"][name][key]) for u in users]
            xs = [u for u, s in points if s is not None]
            spreads = [s for _, s in points if s is not None]
            ys = [s["median"] for s in spreads]
            errors = [[y - s["min"] for y, s in zip(ys, spreads)], [s["max"] - y for y, s in zip(ys, spreads)]]
            ax.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=name)
        ax.set(xscale="log", yscale="log", xlabel="concurrent users", ylabel=label)
        ax.set_xticks(users, [str(u) for u in users])
        ax.legend()
    fig.suptitle(f"{report['model']} serving, {report['environment']['device']}")
    fig.tight_layout()
    fig.savefig(paths[2], dpi=120)
    plt.close(fig)
    return paths

