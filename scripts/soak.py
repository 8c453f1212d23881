"""Soak: one optimized model serves mixed generate() requests for a while; reports crashes, graphs and memory.

A long-lived server's view of qwen3_accel: batch 1-8, prompts 1-300 tokens, greedy / sampled with varied settings /
eos lists / repetition penalty (HF's loop), all on one model. Memory is read after a warm-up pass over every batch
bucket and again at the end: after warm-up it must not grow. After every call, every persistent buffer (the cache's
write slot, the fast loop's positions and step counter) must hold a value one call could produce: a buffer that
kept counting across calls would, one day, leave the RoPE table.

With --serve, the same model serves through its continuous-batching manager instead (our engine), requests
arriving while others run: streaming or not, their own lengths and eos ids, some cancelled mid-stream, and a
generate() call beside the manager now and then. Every request must end with exactly one final output, and at the
end the pool must be whole and nothing left in the manager's books.

    python scripts/soak.py --model Qwen3-0.6B --minutes 10          # on a GPU (bf16)
    python scripts/soak.py --model tiny --device cpu --minutes 0.2  # anywhere
    python scripts/soak.py --model tiny --device cpu --minutes 0.5 --serve
    python scripts/soak.py --model tiny --device cpu --minutes 1 --serve --cuda-defaults  # overlap, chunk graphs
"""

import argparse
import random
import time

import torch

import qwen3_accel
from qwen3_accel.configs import build_model


def memory_mib(device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated() / 2**20
    return float("nan")


def random_request(rng: random.Random, vocab: int, device: str) -> tuple[torch.Tensor, dict]:
    lengths = [rng.randint(1, 300) for _ in range(rng.randint(1, 8))]
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, -n:] = torch.randint(1, vocab, (n,))
        mask[row, -n:] = 1
    kwargs = dict(attention_mask=mask.to(device), max_new_tokens=rng.randint(1, 64), pad_token_id=rng.choice([0, 1]))
    mode = rng.choice(["greedy", "sample", "eos", "penalty"])
    if mode == "sample":
        kwargs.update(do_sample=True, temperature=rng.uniform(0.2, 2.0), top_k=rng.choice([0, 20, 50]),
                      top_p=rng.choice([1.0, 0.8, 0.95]))
    else:
        kwargs["do_sample"] = False
    if mode == "eos":
        kwargs["eos_token_id"] = [rng.randint(0, vocab - 1) for _ in range(rng.randint(1, 4))]
    if mode == "penalty":
        kwargs["repetition_penalty"] = rng.uniform(1.05, 1.5)
    return ids.to(device), kwargs


def unbounded_buffers(acc, ids: torch.Tensor, new_tokens: int) -> list[str]:
    """Persistent buffers holding a value the call just made (`ids`, up to `new_tokens` new tokens) could not have
    produced: every one must restart with each call, on every row of its bucket, used or not."""
    problems, cache = [], acc.runner.cache.current
    batch, longest = ids.shape[0], ids.shape[1] + new_tokens
    if cache is None:
        return problems
    if not 0 <= int(cache.write_pos) <= longest:
        problems.append(f"cache write_pos {int(cache.write_pos)} outside this call's [0, {longest}]")
    state = acc.runner.fast_states.get((cache.decode_rows(batch), cache.max_cache_len))
    if state is not None:  # this call's bucket: no call reaches past the cache's length
        low, high = int(state.positions.min()), int(state.positions.max())
        if low < 0 or high > cache.max_cache_len:
            problems.append(f"fast loop bucket {state.tokens.shape[0]}: positions in [{low}, {high}]")
        if not 0 <= int(state.step) <= state.out.shape[1]:
            problems.append(f"fast loop bucket {state.tokens.shape[0]}: step {int(state.step)} past its "
                            f"{state.out.shape[1]} columns")
    return problems


def soak_serving(model, rng: random.Random, minutes: float, device: str) -> None:
    """The manager under a stream of requests for `minutes` (see the module docstring)."""
    from transformers import ContinuousBatchingConfig, GenerationConfig

    from qwen3_accel.compat import CB_PAGE_FIELD

    vocab = model.config.vocab_size
    # 4096 tokens of KV for up to 32 requests of up to 364 tokens: some are preempted and recomputed.
    pool = ContinuousBatchingConfig(num_blocks=16, **{CB_PAGE_FIELD: 256})
    manager = model.init_continuous_batching(GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=0),
                                             continuous_batching_config=pool)
    manager.start()
    start_mib = memory_mib(device)
    live, finals, cancelled, tokens, beside = {}, 0, 0, 0, 0
    start = time.perf_counter()
    while time.perf_counter() - start < minutes * 60 or live:
        while len(live) < 32 and time.perf_counter() - start < minutes * 60:
            prompt = [rng.randrange(1, vocab) for _ in range(rng.randint(1, 300))]
            request_id = manager.add_request(prompt, max_new_tokens=rng.randint(1, 64),
                                             streaming=rng.random() < 0.5,
                                             eos_token_id=rng.choice([-1, rng.randrange(vocab)]))
            live[request_id] = rng.random() < 0.1  # cancel it once it streams
        output = manager.get_result(timeout=60)
        if output is None:
            raise SystemExit(f"no output for 60 s with {len(live)} requests in flight")
        if output.request_id not in live:
            raise SystemExit(f"an output for {output.request_id}, which is not in flight (twice, or unknown)")
        if output.is_finished():
            del live[output.request_id]
            finals += 1
            tokens += len(output.generated_tokens)
            if output.error == "cancelled":
                cancelled += 1
            elif output.error is not None:
                raise SystemExit(f"request {output.request_id} failed: {output.error}")
        elif live[output.request_id]:
            manager.cancel_request(output.request_id)
            live[output.request_id] = False
        if rng.random() < 0.01:  # generate() on the same model, beside the manager
            model.generate(torch.randint(1, vocab, (2, 12), device=device), max_new_tokens=8, pad_token_id=0)
            beside += 1
    engine = manager.engine
    blocks = engine.block_manager
    books = {"pool blocks free": blocks.num_free == len(blocks.blocks), "engine requests": not engine.requests,
             "ids in flight": not manager._live_ids, "handlers": not manager._handlers,
             "queued outputs": manager.output_queue.empty()}
    manager.stop(block=True)
    end_mib = memory_mib(device)
    print(f"serving: {finals} requests ({cancelled} cancelled mid-stream), {tokens} tokens, {beside} generate() "
          f"calls beside, in {time.perf_counter() - start:.0f} s, each with one final output")
    print(f"preemptions {engine.scheduler.preemptions}, peak pool use {blocks.peak_used} of {len(blocks.blocks)} "
          f"blocks, graphs: decode {len(engine.decode_graphs.compiled)}, chunks {len(engine.chunk_graphs.compiled)} "
          f"(eager fallbacks {len(engine.decode_graphs.eager_keys) + len(engine.chunk_graphs.eager_keys)}; "
          f"overlap {engine.overlap})")
    print(f"memory allocated after the manager started {start_mib:.1f} MiB, after it stopped {end_mib:.1f} MiB")
    left = [name for name, empty in books.items() if not empty]
    if left:
        raise SystemExit(f"left behind at the end: {', '.join(left)}")
    print("the pool whole and the manager's books empty at the end")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="Qwen3-0.6B", help="a shape from qwen3_accel.configs (random weights)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="bfloat16 on CUDA, float32 on the CPU unless given")
    parser.add_argument("--minutes", type=float, default=10.0, help="how long to serve requests after warm-up")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--serve", action="store_true", help="serve through the continuous-batching manager")
    parser.add_argument("--cuda-defaults", action="store_true",
                        help="with --serve off CUDA: the engine as on CUDA, overlapping steps and replaying graphs of "
                             "steps with prompt chunks (the CPU's engine does neither by default)")
    args = parser.parse_args()
    if args.cuda_defaults:
        from qwen3_accel.serving import engine

        device = torch.device(args.device).type
        engine.OVERLAP_DEVICES, engine.CHUNK_GRAPH_DEVICES = (device,), (device,)
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    model = qwen3_accel.optimize(build_model(args.model, device=args.device, dtype=dtype),
                                 max_batch_size=8, max_cache_len=512)
    vocab = model.config.vocab_size
    rng = random.Random(args.seed)
    if args.serve:
        soak_serving(model, rng, args.minutes, args.device)
        return
    for batch in (1, 2, 4, 8):  # warm-up: every bucket, greedy and sampled, and HF's loop
        ids = torch.randint(1, vocab, (batch, 16), device=args.device)
        for extra in (dict(do_sample=False), dict(do_sample=True), dict(do_sample=False, repetition_penalty=1.1)):
            model.generate(ids, max_new_tokens=4, pad_token_id=0, **extra)
    start_mib, calls, tokens = memory_mib(args.device), 0, 0
    start = time.perf_counter()
    while time.perf_counter() - start < args.minutes * 60:
        ids, kwargs = random_request(rng, vocab, args.device)
        out = model.generate(ids, **kwargs)
        calls += 1
        tokens += (out.shape[1] - ids.shape[1]) * out.shape[0]
        problems = unbounded_buffers(model.qwen3_accel, ids, kwargs["max_new_tokens"])
        if problems:
            raise SystemExit(f"after call {calls}: " + "; ".join(problems))
    end_mib = memory_mib(args.device)
    acc = model.qwen3_accel
    print(f"{args.model} on {args.device} ({dtype}), torch {torch.__version__}: {calls} calls, {tokens} new tokens "
          f"in {time.perf_counter() - start:.0f} s, no crash")
    print(f"graphs held: {acc.graph_count()} (eager fallbacks: "
          f"{len(acc.runner.decode_steps.eager_keys) + len(acc.runner.fast_steps.eager_keys)})")
    print(f"memory allocated after warm-up {start_mib:.1f} MiB, at the end {end_mib:.1f} MiB "
          f"(growth {end_mib - start_mib:+.1f} MiB)")
    print("persistent buffers bounded after every call")


if __name__ == "__main__":
    main()
