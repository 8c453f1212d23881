"""`qwen3-accel bench-serve`: the trace, the figures computed from token times, and a whole run on the CPU."""

import json
import math
import statistics

import pytest

from qwen3_accel.bench_serve import Served, make_trace, round_figures
from qwen3_accel.cli import main


def test_the_trace_is_seeded_poisson_with_lengths_in_their_range():
    trace = make_trace(2000, rate=50.0, prompt_len=100, output_len=20, spread=0.5, vocab=300, seed=3)
    assert trace == make_trace(2000, rate=50.0, prompt_len=100, output_len=20, spread=0.5, vocab=300, seed=3)
    assert trace != make_trace(2000, rate=50.0, prompt_len=100, output_len=20, spread=0.5, vocab=300, seed=4)
    gaps = [b.arrival - a.arrival for a, b in zip(trace, trace[1:])]
    assert abs(statistics.mean(gaps) - 1 / 50) < 0.1 / 50  # exponential gaps of mean 1/rate
    assert abs(statistics.stdev(gaps) - 1 / 50) < 0.15 / 50  # (an exponential's deviation is its mean)
    assert all(50 <= len(r.prompt) <= 150 and 10 <= r.new_tokens <= 30 for r in trace)
    assert all(0 < t < 300 for r in trace for t in r.prompt)
    at_once = make_trace(10, rate=math.inf, prompt_len=8, output_len=4, spread=0.0, vocab=300, seed=0)
    assert {r.arrival for r in at_once} == {0.0} and {(len(r.prompt), r.new_tokens) for r in at_once} == {(8, 4)}


def test_round_figures_from_token_times():
    served = [Served(0.0, [0.1, 0.2, 0.3], 3), Served(0.5, [0.9, 1.0], 2)]  # 5 tokens from 0 s to 1 s
    figures = round_figures(served, streams_tokens=True)
    assert figures["tok_s"] == pytest.approx(5.0)
    assert figures["ttft_p50_ms"] == pytest.approx(100.0) and figures["ttft_p99_ms"] == pytest.approx(400.0)
    assert figures["tpot_p50_ms"] == pytest.approx(100.0)
    assert figures["itl_p50_ms"] == pytest.approx(100.0) and figures["itl_p99_ms"] == pytest.approx(100.0)
    assert round_figures(served, streams_tokens=False)["itl_p50_ms"] is None
    # A request whose early token times were lost (HF restarts them on preemption): counted, not timed.
    partly = round_figures(served + [Served(0.0, [5.0], 4)], streams_tokens=True)
    assert partly["partly_timed"] == 1 and partly["tok_s"] == pytest.approx(9 / 5.0)
    assert partly["ttft_p99_ms"] == pytest.approx(400.0)


def test_a_whole_run_reports_every_contender_with_spreads(tmp_path, capsys):
    main(["bench-serve", "--model", "tiny", "--device", "cpu", "--dtype", "float32", "--concurrency", "1,4",
          "--requests", "6", "--prompt-len", "24", "--output-len", "6", "--length-spread", "0.5", "--rate", "200",
          "--repeats", "2", "--out", str(tmp_path)])
    table = capsys.readouterr().out
    report = json.loads((tmp_path / "bench_serve_tiny.json").read_text())
    json.dumps(report, allow_nan=False)  # no NaN or infinity anywhere
    assert (tmp_path / "bench_serve_tiny.png").stat().st_size > 0
    assert set(report["cases"]) == {"1", "4"}
    for case in report["cases"].values():
        assert set(case["contenders"]) == {"qwen3_accel", "hf_cb", "static"}
        for name, figures in case["contenders"].items():
            assert figures["tok_s"]["rounds"] == 2 and 0 < figures["tok_s"]["min"] <= figures["tok_s"]["max"]
            assert figures["ttft_p50_ms"]["median"] > 0 and isinstance(figures["reliable"], bool)
            assert (figures["itl_p50_ms"] is None) == (name == "static")
        ours = case["contenders"]["qwen3_accel"]
        assert 0 < ours["kv_peak_used_mb"] <= ours["kv_reserved_mb"]
        assert set(case["throughput_ratio"]) == {"qwen3_accel_vs_hf_cb", "qwen3_accel_vs_static"}
    assert "qwen3_accel_vs_hf_cb" in table and "TTFT p50 ms" in table


@pytest.mark.parametrize("contender,devices,setting", [
    ("qwen3_accel_no_overlap", "OVERLAP_DEVICES", "overlap"),
    ("qwen3_accel_eager_chunks", "CHUNK_GRAPH_DEVICES", "graph_chunks"),
])
def test_our_engine_contenders_turn_off_one_cuda_default(tmp_path, capsys, monkeypatch, contender, devices, setting):
    """qwen3_accel_no_overlap (overlap off) and qwen3_accel_eager_chunks (steps with prompt chunks eager) are our
    engine with one CUDA default off, paired against qwen3_accel (here the CPU made to do as CUDA does), so a GPU
    run says what each gains."""
    from qwen3_accel.serving import engine as engine_module

    monkeypatch.setattr(engine_module, devices, ("cuda", "cpu"))
    modes = set()
    step = engine_module.Engine.step
    monkeypatch.setattr(engine_module.Engine, "step", lambda self: modes.add(getattr(self, setting)) or step(self))
    main(["bench-serve", "--model", "tiny", "--device", "cpu", "--dtype", "float32", "--concurrency", "4",
          "--requests", "6", "--prompt-len", "24", "--output-len", "6", "--repeats", "1", "--out", str(tmp_path),
          "--contenders", f"qwen3_accel,{contender}"])
    report = json.loads((tmp_path / "bench_serve_tiny.json").read_text())
    case = report["cases"]["4"]
    assert modes == {True, False}
    assert set(case["contenders"]) == {"qwen3_accel", contender}
    assert set(case["throughput_ratio"]) == {f"qwen3_accel_vs_{contender}"}
    assert f"qwen3_accel_vs_{contender}" in capsys.readouterr().out
