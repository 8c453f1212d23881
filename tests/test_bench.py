"""The benchmark harnesses run end to end on CPU and report every field (structure only, no speed asserts)."""

import json

import pytest
import torch

from qwen3_accel.bench import BenchConfig, format_table, run_bench, write_report
from qwen3_accel.bench_kernels import _moe_block_with
from qwen3_accel.cli import build_parser, main
from qwen3_accel.configs import build_model, get_config
from qwen3_accel.custom_ops import moe, select_kernels


def test_bench_report_has_every_field(tmp_path):
    cfg = BenchConfig(model="tiny", device="cpu", dtype="float32", batch_sizes=(1, 2), prompt_lengths=(8, 16),
                      decode_prompt_length=8, decode_tokens=32, repeats=3)
    report = run_bench(cfg)
    paths = write_report(report, str(tmp_path))
    saved = json.loads((tmp_path / "bench_tiny.json").read_text())
    assert saved["model"] == "tiny" and saved["copy_bandwidth_gb_s"] > 0
    assert set(saved["environment"]) >= {"device", "torch", "transformers", "triton", "date"}
    assert set(saved["contenders"]) == {"hf_eager", "hf_static_compile", "qwen3_accel"}
    for result in saved["contenders"].values():
        for key in ("prefill_s", "ttft_s"):
            assert set(result[key]) == {"8", "16"} and all(v > 0 for v in result[key].values())
        assert set(result["decode_tok_s"]) == {"1", "2"} and all(v > 0 for v in result["decode_tok_s"].values())
        for batch, spread in result["decode_tok_s_spread"].items():  # median with its min-max over >= 3 rounds
            assert spread["min"] <= result["decode_tok_s"][batch] <= spread["max"] and spread["rounds"] >= 3
        assert all(s["rounds"] == 3 for s in result["prefill_s_spread"].values())
        assert set(result["first_call_s"]) == {"1", "2"} and all(v > 0 for v in result["first_call_s"].values())
        assert "peak_memory_gib" in result
        assert result["device_ops_per_step"] == {"1": None, "2": None}  # counted on CUDA only
    for batch in ("1", "2"):
        roof = saved["roofline"][batch]
        assert roof["bytes_per_step"] > 0 and roof["bound_tok_s"] > 0 and set(roof["share"]) == set(saved["contenders"])
    assert set(saved["speedup"]) == {"qwen3_accel_vs_hf_eager", "qwen3_accel_vs_hf_static_compile"}
    for ratio in saved["speedup"]["qwen3_accel_vs_hf_eager"].values():  # timed side by side, round by round
        assert "unreliable" in ratio or (ratio["paired"] and ratio["min"] <= ratio["median"] <= ratio["max"])
    assert "NaN" not in json.dumps(saved) and "nan" not in format_table(saved).lower()
    assert any("ran uncompiled" in note for note in saved["notes"])  # HF compiles only on CUDA/XPU
    assert "GPU ops per step" not in format_table(saved)
    saved["contenders"]["qwen3_accel"]["device_ops_per_step"] = {"1": 19.0, "2": 21.0}  # as a CUDA run reports
    assert "19 (" + f"{19 / saved['num_layers']:.1f}/layer)" in format_table(saved)
    for path in paths:
        assert (tmp_path / path.split("/")[-1]).stat().st_size > 0
    assert any(p.endswith(".png") for p in paths)


def test_bench_kernels_quick_run(tmp_path):
    main(["bench-kernels", "--device", "cpu", "--dtype", "float32", "--quick", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "kernels.json").read_text())
    ops = {row["op"] for row in report["cases"]}
    assert ops == {"rms_norm", "fused_add_rms_norm", "qk_norm_rope", "qk_norm_rope_store_kv", "silu_and_mul",
                   "decode_attention", "moe_block", "decode_layer_linears", "decode_norm_lm_head",
                   "quantized_linear_int8", "quantized_linear_int4", "quantized_linear_fp8", "linear_float32"}
    for row in report["cases"]:
        ours = "torch_eager" if row["op"] == "linear_float32" else "qwen3_accel"  # the unquantized base line
        assert "us" in row["results"][ours] and row["results"][ours]["timer"] == "eager", row
    assert (tmp_path / "kernels.png").stat().st_size > 0


def test_kernel_cases_of_several_shapes_each_make_their_own_inputs():
    """Cases are built in a loop over shapes and their inputs made later: each must get its own shape's tensors
    (the inputs once took the loop's last shape, so every earlier case failed or timed the wrong size)."""
    from qwen3_accel.bench_kernels import decode_layer_linear_cases, quantized_linear_cases

    cpu = torch.device("cpu")
    cases = quantized_linear_cases(cpu, torch.float32, [(96, 256), (64, 128)], (3,), ("int8", "int4"))
    cases += decode_layer_linear_cases(cpu, torch.float32, ("tiny", "tiny-tied"), (2,))
    for case in cases:
        inputs = case.make_inputs()
        for name, fn in case.contenders.items():
            if name != "torch_compile":
                fn(*inputs)  # raises on a shape mismatch
        if case.op.startswith("quantized_linear") or case.op.startswith("linear"):
            assert f"{inputs[0].shape[0]}x{inputs[0].shape[1]}->{inputs[1].shape[0]}" == case.shape
        elif case.op == "decode_norm_lm_head":
            assert inputs[-1].shape[0] == get_config(case.shape.split()[0]).vocab_size


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    for command in ("bench", "bench-kernels", "bench-serve", "eval", "generate", "info", "serve"):
        assert command in text


@pytest.mark.parametrize("command", ["bench", "bench-kernels", "bench-serve", "eval", "generate"])
def test_help_explains_every_option(command, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    text = capsys.readouterr().out
    subparser = build_parser()._subparsers._group_actions[0].choices[command]
    for action in subparser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{command} {action.option_strings} has no help"
            assert action.option_strings[-1] in text


def test_generate_and_info_commands(capsys):
    main(["generate", "--model", "tiny", "--device", "cpu", "--dtype", "float32", "--no-compile",
          "--prompt-tokens", "5", "--max-new-tokens", "4"])
    tokens = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(tokens) == 4 and all(0 <= t < 512 for t in tokens)
    main(["info"])
    info = json.loads(capsys.readouterr().out)
    assert {"qwen3_accel", "device", "torch", "transformers", "kernels_auto"} <= set(info)


def test_kernel_bench_forced_moe_paths_compute_the_block():
    """The bench's forced-path MoE contenders (GPU only there) compute HF's block: checked here interpreted."""
    block = build_model("tiny-moe").model.layers[0].mlp
    kernels = select_kernels("torch", torch.device("cpu"))
    x = torch.randn(1, 3, 64)
    with torch.no_grad():
        expected = block(x)
        for path in (moe.fused_moe_gemv, moe.fused_moe_grouped):
            torch.testing.assert_close(_moe_block_with(path, kernels, block, x), expected, rtol=1e-5, atol=1e-5)


def test_bench_measures_quantized_weights_on_a_fresh_copy():
    cfg = BenchConfig(model="tiny", device="cpu", dtype="float32", contenders=("qwen3_accel",), batch_sizes=(1,),
                      prompt_lengths=(8,), decode_prompt_length=8, decode_tokens=8, repeats=1, weights=("int8", "fp8"),
                      decode_linear=("never",))
    report = run_bench(cfg)
    assert set(report["contenders"]) == {"qwen3_accel", "qwen3_accel_int8", "qwen3_accel_fp8",
                                         "qwen3_accel_decode_linear_never"}
    never = report["speedup"]["qwen3_accel_decode_linear_never_vs_qwen3_accel"]["1"]
    assert never["min"] <= never["median"] <= never["max"] and not never["paired"]  # timed after qwen3_accel
    assert "weight_bytes" not in report["contenders"]["qwen3_accel_decode_linear_never"]
    for fmt in ("int8", "fp8"):
        per_weight = report["contenders"][f"qwen3_accel_{fmt}"]["weight_bytes"]["bytes_per_weight"]
        assert 1 <= per_weight < 1.1  # one byte per weight plus scales (fp32, one per row / 64x128 block)
        assert report["roofline"]["1"]["quantized_bytes_per_step"][f"qwen3_accel_{fmt}"] < report["roofline"]["1"][
            "bytes_per_step"]
        assert report["speedup"][f"qwen3_accel_{fmt}_vs_qwen3_accel"]["1"]["median"] > 0
    with pytest.raises(SystemExit):
        main(["bench", "--weights", "int3"])
    with pytest.raises(SystemExit):
        main(["bench", "--decode-linear", "sometimes"])


def test_bench_times_requests(tmp_path):
    """Plain decoding, beam search and a repetition penalty for HF eager and qwen3_accel, and speculative decoding
    (the model as its own assistant, a draft model, prompt lookup) at batch 1 against HF's assisted loop and at
    batch 2 for qwen3_accel alone, with the share of drafts kept, the ratios to HF and to plain decoding, in the
    JSON and the table."""
    main(["bench", "--model", "tiny", "--device", "cpu", "--dtype", "float32", "--contenders",
          "hf_eager,qwen3_accel", "--batch-sizes", "1", "--prompt-lengths", "8", "--decode-prompt-length", "8",
          "--decode-tokens", "16", "--repeats", "1", "--requests", "plain,beam4,assisted,assisted_draft,lookup,penalty",
          "--request-batch-sizes", "1,2", "--draft-model", "tiny-moe", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "bench_tiny.json").read_text())
    names = {"plain", "beam4", "assisted", "assisted_draft", "lookup", "penalty"}
    ours = report["contenders"]["qwen3_accel"]["requests"]
    assert set(ours) == names | {f"{name}, batch 2" for name in names}
    hf = report["contenders"]["hf_eager"]["requests"]
    assert set(hf) == names | {"plain, batch 2", "beam4, batch 2", "penalty, batch 2"}  # HF's assisted loop: batch 1
    assert all(r["decode_tok_s"] > 0 and r["decode_step_ms"] > 0 for r in [*ours.values(), *hf.values()])
    assert ours["assisted"]["acceptance"] == 1.0  # the model drafting for itself
    assert 0 <= ours["assisted_draft"]["acceptance"] < 1 and "acceptance" not in ours["plain"]
    assert set(report["request_speedup"]) == set(hf)
    assert set(report["speculative_vs_plain"]) == {"assisted", "assisted, batch 2", "assisted_draft",
                                                   "assisted_draft, batch 2", "lookup", "lookup, batch 2"}
    table = (tmp_path / "bench_tiny.txt").read_text()
    assert "assisted (100% kept)" in table and "lookup, batch 2 (" in table and "requests: plain" in table
    assert "speculative vs plain decoding: assisted:" in table
    assert (tmp_path / "bench_tiny_requests.png").stat().st_size > 0
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--requests", "beam9"])
    with pytest.raises(ValueError, match="--draft-model"):
        main(["bench", "--model", "tiny", "--device", "cpu", "--dtype", "float32", "--requests", "assisted_draft",
              "--out", str(tmp_path)])


def test_bench_options_name_their_choices(capsys):
    """--contenders and --kernels take only known values, and the error names the allowed ones."""
    args = build_parser().parse_args(["bench", "--contenders", "hf_eager,qwen3_accel", "--kernels", "torch"])
    assert args.contenders == ("hf_eager", "qwen3_accel") and args.kernels == "torch"
    assert build_parser().parse_args(["bench"]).contenders == ("hf_eager", "hf_static_compile", "qwen3_accel")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--contenders", "hf_eager,vllm"])
    error = capsys.readouterr().err
    assert "unknown contenders ['vllm']; choose from ('hf_eager', 'hf_static_compile', 'qwen3_accel')" in error
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--kernels", "cuda"])
    assert "choose from 'auto', 'triton', 'torch'" in capsys.readouterr().err
