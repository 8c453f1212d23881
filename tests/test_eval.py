"""lm-eval parity on the bundled offline tasks: passes for qwen3_accel, fails for a perturbed model."""

import json
import sys

import pytest
import torch

pytest.importorskip("lm_eval")

import qwen3_accel  # noqa: E402
from qwen3_accel import eval as parity_eval  # noqa: E402
from qwen3_accel.configs import build_model  # noqa: E402
from qwen3_accel.eval.tokenizer import train_tokenizer  # noqa: E402
from qwen3_accel import decoder  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(384)


def test_parity_passes_on_all_bundled_tasks(tokenizer, monkeypatch):
    calls = []
    original = decoder.forward_hidden
    monkeypatch.setattr(decoder, "forward_hidden", lambda *a, **k: calls.append(1) or original(*a, **k))
    model = build_model("tiny")
    comparison = parity_eval.parity(model, tokenizer, batch_size=3, compile=False)
    assert comparison.passed, parity_eval.format_comparison(comparison)
    assert set(comparison.tasks) == set(parity_eval.BUNDLED_TASKS)
    assert calls, "the optimized run never went through qwen3_accel's forward"
    for stats in comparison.tasks.values():
        assert stats["loglikelihood_diff_max"] <= 1e-4
    assert comparison.tasks["qwen3_accel_gen"]["generation_match"] == 1.0
    assert comparison.tasks["qwen3_accel_mc"]["choice_agreement"] == 1.0
    assert comparison.tasks["qwen3_accel_ppl"]["examples"] == 12


def test_a_perturbed_model_fails_with_the_offending_examples(tokenizer):
    model = qwen3_accel.optimize(build_model("tiny"), compile=False)
    tasks = ["qwen3_accel_mc", "qwen3_accel_ppl"]
    with model.qwen3_accel.disabled():
        baseline = parity_eval.run_lm_eval(model, tokenizer, tasks, limit=6, batch_size=3)
    with torch.no_grad():
        model.model.layers[0].post_attention_layernorm.weight.mul_(1.5)
    candidate = parity_eval.run_lm_eval(model, tokenizer, tasks, limit=6, batch_size=3)
    comparison = parity_eval.compare_runs(baseline, candidate, parity_eval.Thresholds())
    assert not comparison.passed
    assert any("log-likelihoods of" in r for r in comparison.reasons)
    assert {o["task"] for o in comparison.offending} == set(tasks)
    assert "FAIL" in parity_eval.format_comparison(comparison)


def test_half_precision_allows_one_rounding_step_of_the_compared_log_likelihoods():
    def run(loglikelihoods):
        samples = [{"doc_id": 0, "filtered_resps": [(x, False) for x in loglikelihoods]}]
        return {"samples": {"mc": samples}, "results": {"mc": {}}}

    bf16 = parity_eval.Thresholds.for_dtype(torch.bfloat16)
    # lm-eval sums in bf16: between 32 and 64 consecutive values are 0.25 apart.
    assert parity_eval.compare_runs(run([-46.25, -23.875]), run([-46.0, -23.875]), bf16).passed
    three_steps = parity_eval.compare_runs(run([-46.25, -23.875]), run([-45.5, -23.875]), bf16)
    assert not three_steps.passed and [o["doc_id"] for o in three_steps.offending] == [0]
    assert not parity_eval.compare_runs(run([-46.25, -23.875]), run([-46.0, -23.875]), parity_eval.Thresholds()).passed


def test_missing_lm_eval_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(ImportError, match=r'pip install "qwen3-accel\[eval\]"'):
        parity_eval.require_lm_eval()


def test_eval_command_writes_a_report_with_the_thresholds_asked_for(tmp_path):
    from qwen3_accel.cli import main

    main(["eval", "--model", "tiny", "--device", "cpu", "--dtype", "float32", "--tasks", "qwen3_accel_mc",
          "--limit", "3", "--batch-size", "3", "--min-choice-agreement", "0.5", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "eval_tiny.json").read_text())
    assert report["passed"] and report["tasks"]["qwen3_accel_mc"]["examples"] == 3
    assert report["thresholds"]["min_choice_agreement"] == 0.5
    assert report["thresholds"]["loglikelihood_atol"] == parity_eval.Thresholds().loglikelihood_atol


def test_lm_eval_cli_with_the_qwen3_accel_model_type(tokenizer, tmp_path, monkeypatch):
    """`qwen3-accel lm-eval` is lm-eval's CLI with `--model qwen3_accel` registered: on a saved checkpoint, every
    request type (loglikelihood, rolling, generate_until) runs through our forward and gives `--model hf`'s
    per-example results."""
    from qwen3_accel import cli

    build_model("tiny").save_pretrained(tmp_path / "ckpt")
    tokenizer.save_pretrained(tmp_path / "ckpt")
    calls = []
    original = decoder.forward_hidden
    monkeypatch.setattr(decoder, "forward_hidden", lambda *a, **k: calls.append(1) or original(*a, **k))
    monkeypatch.chdir(parity_eval.TASKS_DIR)  # the bundled tasks name their data files relative to their folder
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    runs = {}
    for model_type, extra in (("hf", ""), ("qwen3_accel", ",compile=False")):
        cli.main(["lm-eval", "--model", model_type, "--model_args", f"pretrained={tmp_path / 'ckpt'},dtype=float32{extra}",
                  "--tasks", ",".join(parity_eval.BUNDLED_TASKS), "--include_path", str(parity_eval.TASKS_DIR),
                  "--limit", "4", "--batch_size", "2", "--log_samples", "--output_path", str(tmp_path / model_type)])
        samples = {}
        for path in (tmp_path / model_type).glob("**/samples_*.jsonl"):
            task = next(name for name in parity_eval.BUNDLED_TASKS if f"samples_{name}_" in path.name)
            samples[task] = [json.loads(line) for line in path.read_text().splitlines()]
        runs[model_type] = {"samples": samples, "results": {task: {} for task in samples}}
        if model_type == "hf":
            assert not calls, "the hf model type must not run qwen3_accel"
    assert set(runs["hf"]["samples"]) == set(parity_eval.BUNDLED_TASKS)
    assert calls, "--model qwen3_accel never went through qwen3_accel's forward"
    comparison = parity_eval.compare_runs(runs["hf"], runs["qwen3_accel"], parity_eval.Thresholds())
    assert comparison.passed, parity_eval.format_comparison(comparison)


def test_eval_weights_reports_the_cost_of_quantization(tmp_path, capsys):
    """--weights: baseline is the unquantized model (HF's forward), candidate the quantized one through our path;
    the per-task deltas are reported, and the command does not fail on them."""
    from qwen3_accel.cli import main

    main(["eval", "--model", "tiny", "--device", "cpu", "--dtype", "float32", "--tasks", "qwen3_accel_mc",
          "--limit", "3", "--batch-size", "3", "--weights", "int4", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "eval_tiny.json").read_text())
    assert "quantized to int4" in report["weights"]
    assert report["tasks"]["qwen3_accel_mc"]["loglikelihood_diff_max"] > 1e-4  # int4 moves log-likelihoods
    assert "accuracy cost of quantization" in capsys.readouterr().out
