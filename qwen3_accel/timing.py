"""Timing that tells the truth on a busy machine: contenders interleaved, every figure with its spread, and a
measurement lost in noise reported as unreliable in words (never as NaN, never as a ratio).

- `interleaved` times several callables in rounds (A B C, A B C, ...), so a burst of load from another process
  falls on all of them alike instead of on whichever happened to run then.
- `decode_rounds` isolates decode time per round as (generate 1 + N tokens) - (generate 1 token), both calls in
  the same round, and judges each contender's estimate against the timer's noise on this machine (the spread of
  the repeated 1-token call): too close, and more rounds are run; still too close, and it is marked unreliable
  with the reason.
- `Spread` is what reports carry: median, min and max over the rounds.
- `machine_noise` times a fixed workload a few times: a wide spread means the machine was busy.
"""

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

NOISE_MARGIN = 4.0  # a decode time must exceed 4x the timer's noise (the 1-token call's spread) to be reliable
# and its rounds must agree within 2x: beside a competing 2-thread job on 2 cores, single rounds came out 1.5-88x
# off while the median still looked plausible (2026-12-02)
ROUNDS_AGREE = 2.0
# The fixed workload (`machine_noise`) on this repo's 2-core CI-like machine, 20 runs: idle, slowest/fastest 1.07-1.2x
# and the upper quartile within 3% of the fastest; with two CPU-bound processes beside it, stalls of 1.5-87x.
BUSY_SLOWEST = 2.0  # slowest run over the fastest above this: the machine looked busy
BUSY_QUARTILE = 1.25  # or the upper quartile over the fastest above this


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


@dataclass(frozen=True)
class Spread:
    """Median, min and max of one figure over its rounds."""

    median: float
    low: float
    high: float
    rounds: int

    @classmethod
    def of(cls, values: Sequence[float]) -> "Spread":
        return cls(statistics.median(values), min(values), max(values), len(values))

    def scaled(self, factor: float) -> "Spread":
        """The same figure times a positive factor (seconds to ms, ...)."""
        return Spread(self.median * factor, self.low * factor, self.high * factor, self.rounds)

    def inverse(self, numerator: float) -> "Spread":
        """numerator / value (a time to a rate): the low and high ends swap."""
        return Spread(numerator / self.median, numerator / self.high, numerator / self.low, self.rounds)

    def to_dict(self) -> dict[str, float]:
        return {"median": self.median, "min": self.low, "max": self.high, "rounds": self.rounds}


def interleaved(timer: Callable, fns: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[float]]:
    """Each callable timed `rounds` times, one call of each per round, in the same order every round."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(timer(fn))
    return times


@dataclass(frozen=True)
class DecodeEstimate:
    """Decode seconds of one contender: one (full - first) difference per round, and whether they stand above the
    timer's noise."""

    seconds: list[float]  # per round; may hold non-positive values when noise won
    noise: float  # max - min of the 1-token call over the rounds
    reliable: bool
    reason: str | None = None

    @property
    def spread(self) -> Spread | None:
        """The positive per-round estimates' spread (None when there is none to report)."""
        positive = [s for s in self.seconds if s > 0]
        return Spread.of(positive) if positive else None


def judge(diffs: list[float], firsts: list[float]) -> DecodeEstimate:
    noise = max(firsts) - min(firsts)
    median = statistics.median(diffs)
    reason = None
    if median <= 0:
        reason = "the 1 + N-token call was not slower than the 1-token call"
    elif min(diffs) <= 0:
        reason = f"{sum(d <= 0 for d in diffs)} of {len(diffs)} rounds came out with no decode time at all"
    elif median < NOISE_MARGIN * noise:
        reason = (f"decode time {median * 1e3:.2f} ms is within {NOISE_MARGIN:g}x the timer's noise on this machine "
                  f"({noise * 1e3:.2f} ms)")
    elif max(diffs) > ROUNDS_AGREE * min(diffs):
        reason = (f"the rounds disagree by more than {ROUNDS_AGREE:g}x (decode {min(diffs) * 1e3:.2f} to "
                  f"{max(diffs) * 1e3:.2f} ms)")
    return DecodeEstimate(diffs, noise, reason is None, reason)


def decode_rounds(timer: Callable, pairs: dict[str, tuple[Callable[[], Any], Callable[[], Any]]], rounds: int,
                  max_rounds: int) -> tuple[dict[str, DecodeEstimate], int]:
    """Per contender, `(first, full)` = generate with 1 and with 1 + N new tokens, timed interleaved: each round
    runs every contender's pair in turn. Unreliable estimates get more rounds (every contender's, so rounds stay
    paired) up to `max_rounds`. Returns the estimates and the rounds run."""
    firsts: dict[str, list[float]] = {name: [] for name in pairs}
    diffs: dict[str, list[float]] = {name: [] for name in pairs}
    done = 0
    while True:
        for _ in range(rounds if done == 0 else max(1, rounds // 2)):
            for name, (first, full) in pairs.items():
                t_first = timer(first)
                t_full = timer(full)
                firsts[name].append(t_first)
                diffs[name].append(t_full - t_first)
            done += 1
        estimates = {name: judge(diffs[name], firsts[name]) for name in pairs}
        if all(e.reliable for e in estimates.values()) or done >= max_rounds:
            return estimates, done


def paired_ratio(ours: DecodeEstimate, base: DecodeEstimate) -> Spread | None:
    """Our rate over the base's (the same work: base seconds over ours), round by round, the two having been timed
    side by side in each round; None unless both are reliable."""
    if not (ours.reliable and base.reliable):
        return None
    return Spread.of([theirs / mine for mine, theirs in zip(ours.seconds, base.seconds)])


def machine_noise(device: torch.device, runs: int = 20) -> list[float]:
    """Seconds of a fixed workload (a few small matmuls), `runs` times: on a quiet machine they barely vary."""
    x = torch.randn(256, 256, device=device)
    timer = Timer(device)

    def work():
        y = x
        for _ in range(20):
            y = torch.tanh(y @ x)
        return y

    for _ in range(3):
        work()
    return [timer(work) for _ in range(runs)]


def looked_busy(times: list[float]) -> bool:
    fastest, ordered = min(times), sorted(times)
    return ordered[-1] > BUSY_SLOWEST * fastest or ordered[(3 * len(ordered)) // 4] > BUSY_QUARTILE * fastest
