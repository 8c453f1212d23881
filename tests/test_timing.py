"""The timing code under a simulated clock: no NaN or negative figure reaches a report, estimates lost in noise
are marked unreliable with the reason, and clean ones are reliable and right."""

import json
import math
import random

from qwen3_accel import timing
from qwen3_accel.bench import _ratios, format_table


class NoisyClock:
    """A stand-in timer: each callable has a true duration; the clock adds jitter and, with probability `burst`,
    a stall of up to `stall` seconds (another process taking the machine)."""

    def __init__(self, jitter: float, burst: float = 0.0, stall: float = 0.0, seed: int = 0):
        self.rng = random.Random(seed)
        self.jitter, self.burst, self.stall = jitter, burst, stall

    def __call__(self, fn) -> float:
        extra = self.rng.uniform(0, self.stall) if self.rng.random() < self.burst else 0.0
        return fn.seconds + self.rng.gauss(0, self.jitter) + extra


class Work:
    def __init__(self, seconds: float):
        self.seconds = seconds

    def __call__(self):
        pass


def pairs(first: float, decode: float):
    return Work(first), Work(first + decode)


def test_a_quiet_clock_gives_reliable_estimates_near_the_truth():
    clock = NoisyClock(jitter=1e-5)
    found, rounds = timing.decode_rounds(clock, {"a": pairs(0.003, 0.060), "b": pairs(0.002, 0.030)}, 5, 15)
    assert rounds == 5 and all(e.reliable for e in found.values())
    assert abs(found["a"].spread.median - 0.060) < 1e-3 and abs(found["b"].spread.median - 0.030) < 1e-3
    ratio = timing.paired_ratio(found["b"], found["a"])
    assert abs(ratio.median - 2.0) < 0.05 and ratio.low <= ratio.median <= ratio.high


def test_a_bursty_clock_is_marked_unreliable_never_nan_or_negative():
    """Stalls of up to 0.5 s against a 2 ms decode: more rounds are run, then the estimate is marked unreliable
    with a reason; whatever is reported is finite and positive, and the table says so in words."""
    clock = NoisyClock(jitter=1e-4, burst=0.4, stall=0.5, seed=3)
    found, rounds = timing.decode_rounds(clock, {"hf_eager": pairs(0.003, 0.002), "qwen3_accel": pairs(0.003, 0.001)},
                                         5, 15)
    assert rounds == 15  # the extra rounds were tried
    for estimate in found.values():
        assert not estimate.reliable and estimate.reason
        spread = estimate.spread
        assert spread is None or (spread.low > 0 and all(math.isfinite(v) for v in (spread.low, spread.high)))
    ratio = _ratios({"1": found["qwen3_accel"]}, {"1": found["hf_eager"]}, paired=True)["1"]
    assert set(ratio) == {"unreliable"} and ratio["unreliable"]


def test_the_report_of_an_unreliable_run_has_no_nan(tmp_path):
    """A whole report built from noisy estimates: the JSON has no NaN, the table no 'nan' and names the
    unreliable figures with their reasons."""
    from qwen3_accel.bench import _decode_figures

    clock = NoisyClock(jitter=1e-4, burst=0.5, stall=0.3, seed=5)
    found, _ = timing.decode_rounds(clock, {"hf_eager": pairs(0.003, 0.0), "qwen3_accel": pairs(0.003, 0.05)}, 5, 15)
    contenders = {}
    for name, estimate in found.items():
        figures = _decode_figures(estimate, 1, 64)
        spread = {"median": 0.001, "min": 0.001, "max": 0.002, "rounds": 5}
        contenders[name] = {
            "prefill_s": {"8": 0.001}, "prefill_s_spread": {"8": spread}, "ttft_s": {"8": 0.001},
            "ttft_s_spread": {"8": spread}, "first_call_s": {"1": 0.1}, "device_ops_per_step": {"1": None},
            "peak_memory_gib": None, **{key: {"1": value} for key, value in figures.items()}}
    report = {
        "model": "tiny", "dtype": "float32", "environment": {"device": "cpu", "torch": "x", "transformers": "y",
                                                              "triton": "z", "date": "d"},
        "copy_bandwidth_gb_s": 10.0, "machine_noise": {"busy": True}, "config": {}, "contenders": contenders,
        "roofline": {"1": {"share": {n: None if c["decode_tok_s"]["1"] is None else 0.1
                                     for n, c in contenders.items()}}},
        "speedup": {"qwen3_accel_vs_hf_eager": _ratios({"1": found["qwen3_accel"]}, {"1": found["hf_eager"]}, True)},
        "notes": ["the machine looked busy"],
    }
    text = json.dumps(report)  # json writes NaN as NaN: none may be in there
    assert "NaN" not in text and "Infinity" not in text
    table = format_table(report)
    assert "nan" not in table.lower() and "MACHINE LOOKED BUSY" in table
    assert "unreliable [1]" in table and "[1] hf_eager, decode batch 1:" in table
    assert "not measured reliably" in table
