"""Soak: one optimized model serves mixed generate() requests for a while; reports crashes, graphs and memory.

A long-lived server's view of qwen3_accel: batch 1-8, prompts 1-300 tokens, greedy / sampled with varied settings /
eos lists / repetition penalty (HF's loop), all on one model. Memory is read after a warm-up pass over every batch
bucket and again at the end: after warm-up it must not grow. After every call, every persistent buffer (the cache's
write slot, the fast loop's positions and step counter) must hold a value one call could produce: a buffer that
kept counting across calls would, one day, leave the RoPE table.

    python scripts/soak.py --model Qwen3-0.6B --minutes 10          # on a GPU (bf16)
    python scripts/soak.py --model tiny --device cpu --minutes 0.2  # anywhere
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="Qwen3-0.6B", help="a shape from qwen3_accel.configs (random weights)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="bfloat16 on CUDA, float32 on the CPU unless given")
    parser.add_argument("--minutes", type=float, default=10.0, help="how long to serve requests after warm-up")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    model = qwen3_accel.optimize(build_model(args.model, device=args.device, dtype=dtype),
                                 max_batch_size=8, max_cache_len=512)
    vocab = model.config.vocab_size
    rng = random.Random(args.seed)
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
