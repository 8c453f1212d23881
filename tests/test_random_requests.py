"""A long-lived process: ONE optimized model per config fed a seeded stream of varied requests, each compared with
HF eager on the same weights (fp32, CPU). Zero crashes and zero mismatches; a planted fault is caught."""

import random

import pytest
import torch
from transformers import GenerationConfig

from conftest import CollectStreamer, left_padded_batch, model_pair

VOCAB = 512


def _prompt(rng: random.Random, seed: int, device: str):
    batch = rng.randint(1, 6)
    longest = 300 if rng.random() < 0.05 else 40
    ids, mask = left_padded_batch([rng.randint(1, longest) for _ in range(batch)], VOCAB, seed=seed)
    pad = rng.choice([0, 0, 7, VOCAB - 1])
    ids = ids.masked_fill(mask == 0, pad)
    mask = mask.to(rng.choice([torch.long, torch.long, torch.bool, torch.float32]))
    return ids.to(device), mask.to(device), pad


def _request(rng: random.Random, reference, seed: int, device: str) -> tuple[str, tuple, dict]:
    """(kind, args, kwargs) of one random call, kind in forward / generate."""
    ids, mask, pad = _prompt(rng, seed, device)
    new = rng.randint(1, 12)
    kwargs = dict(attention_mask=mask, max_new_tokens=new, pad_token_id=pad)
    mode = rng.choice(["greedy", "sample", "eos", "streamer", "config", "beams", "penalty", "scores", "returns",
                       "no-mask", "right-pad", "forward"])
    if mode == "forward":
        return "forward", (ids,), dict(attention_mask=mask)
    if mode in ("sample", "returns"):
        kwargs.update(do_sample=True, temperature=rng.choice([0.3, 0.7, 1.0, 1.3, 2.0]),
                      top_k=rng.choice([0, 1, 5, 50]), top_p=rng.choice([1.0, 0.9, 0.5]))
        if mode == "returns":
            kwargs["num_return_sequences"] = rng.randint(2, 3)
    else:
        kwargs["do_sample"] = False
    if mode == "eos":
        free_run = reference.generate(ids, **kwargs)[:, ids.shape[1]:]
        kwargs["eos_token_id"] = sorted({int(t) for t in free_run[:, : rng.randint(1, 3)].flatten()})[:9]
    elif mode == "streamer":
        ids, kwargs["attention_mask"] = ids[:1, :], mask[:1, :]  # HF streams batch 1 only
        kwargs["streamer"] = "collect"
    elif mode == "config":
        settings = {k: kwargs.pop(k) for k in ("max_new_tokens", "pad_token_id", "do_sample")}
        kwargs["generation_config"] = GenerationConfig(**settings, eos_token_id=rng.randint(0, VOCAB - 1))
    elif mode == "beams":
        kwargs["num_beams"] = rng.randint(2, 3)
    elif mode == "penalty":
        kwargs["repetition_penalty"] = rng.choice([1.1, 1.5])
    elif mode == "scores":
        kwargs.update(return_dict_in_generate=True, output_scores=True)
    elif mode == "no-mask":
        del kwargs["attention_mask"]
    elif mode == "right-pad":
        ids, kwargs["attention_mask"] = ids.flip(1), mask.flip(1)
    return "generate", (ids,), kwargs


def _call(model, kind: str, args: tuple, kwargs: dict, seed: int):
    kwargs = dict(kwargs)
    streamer = CollectStreamer() if kwargs.get("streamer") == "collect" else None
    if streamer is not None:
        kwargs["streamer"] = streamer
    torch.manual_seed(seed)
    with torch.no_grad():
        if kind == "forward":
            return model(*args, **kwargs).logits
        out = model.generate(*args, **kwargs)
    if streamer is not None:
        return out, torch.cat([c.reshape(1, -1) for c in streamer.chunks], dim=1)
    return out


def _same(expected, actual, kind: str, kwargs: dict, exact_sampling: bool) -> bool:
    if kwargs.get("do_sample") and not exact_sampling:  # compiled: HF's distribution, not HF's random draws
        sequences = [x if isinstance(x, torch.Tensor) else x.sequences for x in (expected, actual)]
        return sequences[0].shape[0] == sequences[1].shape[0] and bool((sequences[1] < VOCAB).all())
    if kind == "forward":
        valid = kwargs["attention_mask"].bool()
        return torch.allclose(actual[valid], expected[valid], atol=1e-4, rtol=1e-4)
    if isinstance(expected, tuple):  # (sequences, streamed)
        return all(torch.equal(a, e) for a, e in zip(actual, expected))
    if isinstance(expected, torch.Tensor):
        return torch.equal(actual, expected)
    return torch.equal(actual.sequences, expected.sequences) and all(
        torch.allclose(a, e, atol=1e-4, rtol=1e-4) for a, e in zip(actual.scores, expected.scores)
    )


def run_stream(pairs, calls: int, seed: int, device: str = "cpu", exact_sampling: bool = True) -> list[str]:
    """Feed `calls` random requests, round-robin over (reference, optimized) pairs; returns every failure.

    `exact_sampling`: sampled tokens must be HF's (eager); else only well-formed (compiled)."""
    rng = random.Random(seed)
    failures = []
    for call in range(calls):
        reference, optimized = pairs[call % len(pairs)]
        kind, args, kwargs = _request(rng, reference, seed=seed * 10_000 + call, device=device)
        what = f"call {call}: {kind} {sorted(kwargs)} shape {list(args[0].shape)}"
        expected = _call(reference, kind, args, kwargs, seed=call)
        try:
            actual = _call(optimized, kind, args, kwargs, seed=call)
        except Exception as error:  # noqa: BLE001 - a crash is a failure to report, with the request
            failures.append(f"{what}: crashed with {type(error).__name__}: {error}")
            continue
        if not _same(expected, actual, kind, kwargs, exact_sampling):
            failures.append(f"{what}: differs from HF")
    return failures


@pytest.mark.parametrize("name", ["tiny", "tiny-moe"])
def test_one_model_serves_a_random_stream_like_hf(name):
    pair = model_pair(name, compile=False)
    failures = run_stream([pair], calls=120, seed=1 if name == "tiny" else 2)
    assert not failures, "\n".join(failures)


def test_three_models_alternating_in_one_process():
    """Two of them with decode_linear="always" (the fused decode projections, default only for quantized weights)."""
    pairs = [model_pair("tiny", compile=False, seed=0),
             model_pair("tiny", compile=False, seed=1, decode_linear="always"),
             model_pair("tiny-moe", compile=False, decode_linear="always")]
    failures = run_stream(pairs, calls=60, seed=3)
    assert not failures, "\n".join(failures)


def test_the_stream_catches_a_planted_fault():
    """The harness is able to fail: one norm weight of the optimized copy perturbed by 5%."""
    reference, optimized = model_pair("tiny", compile=False)
    with torch.no_grad():
        optimized.model.layers[1].post_attention_layernorm.weight.mul_(1.05)
    failures = run_stream([(reference, optimized)], calls=20, seed=4)
    assert len(failures) >= 3 and all("differs from HF" in f for f in failures)
