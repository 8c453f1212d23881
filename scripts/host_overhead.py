"""Host time per decode step: HF's generate loop vs qwen3_accel's device-side loop vs the bare compiled step; the
continuous-batching engine's own host work per decode step (schedule, pack, pick, read the tokens) at a few batch
sizes, with the model's step left out (what the engine's overlap hides behind the device's step); and an engine
step with a prompt chunk beside decodes, eager against its chunk graph, on a deep model of tiny layers (36, as
Qwen3-8B), where the time is the launches'.

On a CPU with a 1-layer toy model the forward is tiny, so the differences are the loops' own overhead.
Usage: python scripts/host_overhead.py [--device cpu|cuda] [--model tiny] [--tokens 64] [--engine-rows 1,16,64]
                                       [--chunk-step-layers 36]
"""

import argparse
import statistics
import time
from dataclasses import replace

import torch

import qwen3_accel
from qwen3_accel.configs import build_model, get_config


def per_step_seconds(fn_short, fn_long, extra_steps: int, repeats: int = 5) -> float:
    def timed(fn):
        samples = []
        for _ in range(repeats):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            samples.append(time.perf_counter() - start)
        return statistics.median(samples)

    fn_short(), fn_long()  # warm-up: compile, record graphs
    return (timed(fn_long) - timed(fn_short)) / extra_steps


def engine_host_work(model, rows: int, overlap: bool, steps: int = 100) -> list[float]:
    """Seconds per engine decode step with `rows` sequences decoding, the model's step replaced by zero logits."""
    from qwen3_accel.serving.engine import Engine

    vocab, device = model.config.vocab_size, model.lm_head.weight.device
    engine = Engine(model, num_blocks=rows * 16, block_size=16, max_batch_tokens=rows * 32, max_batch_size=rows,
                    overlap=overlap)
    engine.decode_graphs = lambda key, *inputs: torch.zeros(key[1], vocab, device=device)
    for i in range(rows):
        engine.add_request([3 + i % 50] * 20, steps + 8)
    engine.step(), engine.step()  # the prompts, then the first decode
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    return times


def chunk_step_seconds(layers: int, device: str, dtype: torch.dtype, decodes: int = 8, prompt: int = 8,
                       repeats: int = 30) -> dict[str, list[float]]:
    """Seconds of one engine step of `decodes` one-token chunks and a `prompt`-token chunk (packing included), run
    eagerly and through its chunk graph, on a tiny model of `layers` layers."""
    from qwen3_accel.serving import engine as engine_module

    model = build_model(get_config("tiny", num_hidden_layers=layers), device=device, dtype=dtype)
    qwen3_accel.optimize(model)
    engine = engine_module.Engine(model, num_blocks=64, max_batch_tokens=64, max_batch_size=16, overlap=False,
                                  chunk_graphs=True)
    for i in range(decodes):
        engine.add_request([3 + i] * 20, 1000)
    engine.step(), engine.step()  # the prompts, then a decode: every sequence decoding
    engine.add_request([5] * prompt, 1000)
    chunks = engine.scheduler.schedule()  # the decodes and the new prompt (run again and again: same slots)
    key = engine.chunk_graph_key(decodes + prompt, max(len(c.sequence.blocks.table) for c in chunks))
    runs = {"eager": lambda: engine.runner.paged_step(engine.cache.keys, engine.cache.values, engine._pack(chunks)),
            "chunk graph": lambda: engine._chunks(chunks, key)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.no_grad():
        for run in runs.values():
            run(), run()  # compile; on CUDA record
        for _ in range(repeats):  # interleaved, so that load falls on both alike
            for name, run in runs.items():
                if device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                run()
                if device == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    parser.add_argument("--model", default="tiny", help="a shape from qwen3_accel.configs (default: tiny, 1 layer)")
    parser.add_argument("--tokens", type=int, default=64, help="decode steps timed (default: %(default)s)")
    parser.add_argument("--engine-rows", default="1,16,64",
                        help="batch sizes of the engine's host-work figure, comma-separated (default: %(default)s)")
    parser.add_argument("--chunk-step-layers", type=int, default=36,
                        help="layers of the tiny model the chunk-step figure runs on; 0 skips it "
                             "(default: %(default)s)")
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    config = get_config(args.model, num_hidden_layers=1) if args.model == "tiny" else get_config(args.model)
    model = build_model(config, device=args.device, dtype=dtype)
    qwen3_accel.optimize(model, max_batch_size=1, max_cache_len=args.tokens + 64)
    acc = model.qwen3_accel
    ids = torch.randint(1, config.vocab_size, (1, 16), device=args.device)
    gen = dict(do_sample=False, pad_token_id=0, eos_token_id=None)

    def generate(n):
        return lambda: model.generate(ids, max_new_tokens=n, **gen)

    results = {}
    for name, fast in (("HF generate loop", False), ("qwen3_accel fast loop", True)):
        acc.options = replace(acc.options, fast_generate=fast)  # no eos: both run exactly n steps
        results[name] = per_step_seconds(generate(1 + 8), generate(1 + 8 + args.tokens), args.tokens)

    cache = acc.runner.cache_for(1, 64)
    with torch.no_grad():
        model(ids, cache=cache)
        step_inputs = (model.model.embed_tokens(ids[:, -1:]), torch.full((1, 1), 16, device=args.device),
                       torch.ones(1, dtype=torch.bool, device=args.device))

        def bare(n):
            def run():
                key = ("decode", 1, cache.max_batch_size, cache.max_cache_len)  # the key `ModelRunner.decode` uses
                for _ in range(n):
                    acc.runner.decode_steps(key, *step_inputs, cache.keys, cache.values, cache.kv_valid,
                                            cache.seq_start, cache.write_pos)
                    cache.write_pos.fill_(16)
            return run

        results["bare compiled step"] = per_step_seconds(bare(8), bare(8 + args.tokens), args.tokens)
    base = results["bare compiled step"]
    print(f"{args.model} ({config.num_hidden_layers} layers) on {args.device}, {dtype}; torch {torch.__version__}")
    for name, seconds in results.items():
        print(f"{name:24} {seconds * 1e6:9.1f} us/step   loop overhead {max(0.0, seconds - base) * 1e6:8.1f} us/step")
    hf = results["HF generate loop"] - base
    fast = results["qwen3_accel fast loop"] - base
    print(f"fast-loop overhead / HF-loop overhead: {fast / hf:.3f}")
    print("continuous-batching engine, host work per decode step (the model's step left out), median (min-max):")
    for rows in (int(r) for r in args.engine_rows.split(",")):
        for overlap in (False, True):
            times = [t * 1e3 for t in engine_host_work(model, rows, overlap)]
            print(f"  {rows:3} rows, {'overlap' if overlap else 'in order':8} {statistics.median(times):7.3f} ms "
                  f"({min(times):.3f}-{max(times):.3f})")
    if args.chunk_step_layers:
        print(f"engine step of 8 decodes and an 8-token prompt chunk, tiny model of {args.chunk_step_layers} layers, "
              "median (min-max):")
        for name, times in chunk_step_seconds(args.chunk_step_layers, args.device, dtype).items():
            ms = [t * 1e3 for t in times]
            print(f"  {name:12} {statistics.median(ms):7.3f} ms ({min(ms):.3f}-{max(ms):.3f})")


if __name__ == "__main__":
    main()
