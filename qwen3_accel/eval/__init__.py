"""Accuracy parity with lm-eval: the same tasks on the HF baseline and on the optimized model, compared per example.

The baseline and the optimized run use one model object and one set of weights: the baseline runs through
HF's own forward and generate (`Qwen3Accelerator.disabled()`), then the optimized path runs; no copy of the
weights is made. lm-eval is an optional dependency (`pip install "qwen3-accel[eval]"`).
"""

import contextlib
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

TASKS_DIR = Path(__file__).parent / "tasks"
BUNDLED_TASKS = {"qwen3_accel_mc": "parity_mc.yaml", "qwen3_accel_ppl": "parity_text.yaml",
                 "qwen3_accel_gen": "parity_gen.yaml"}


def require_lm_eval():
    try:
        import lm_eval
    except ImportError as exc:
        raise ImportError(
            "qwen3_accel.eval needs lm-eval: pip install \"qwen3-accel[eval]\" (or pip install lm-eval)"
        ) from exc
    return lm_eval


def task_specs(names: list[str]) -> list[str | dict[str, Any]]:
    """Bundled task names become configs whose data files are absolute paths; other names pass through."""
    import yaml

    specs: list[str | dict[str, Any]] = []
    for name in names:
        if name not in BUNDLED_TASKS:
            specs.append(name)
            continue
        config = yaml.safe_load((TASKS_DIR / BUNDLED_TASKS[name]).read_text())
        files = config["dataset_kwargs"]["data_files"]
        config["dataset_kwargs"]["data_files"] = {split: str(TASKS_DIR / path) for split, path in files.items()}
        specs.append(config)
    return specs


@contextlib.contextmanager
def _offline(enabled: bool):
    """Hub access off while only bundled (local) tasks run."""
    keys = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    saved = {k: os.environ.get(k) for k in keys}
    if enabled:
        os.environ.update({k: "1" for k in keys})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_lm_eval(model, tokenizer, tasks: list[str], limit: int | None = None, batch_size: int = 4) -> dict[str, Any]:
    """lm-eval's `simple_evaluate` on a model instance, with every response cache off."""
    require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    with _offline(all(t in BUNDLED_TASKS for t in tasks)):
        results = simple_evaluate(
            model=lm, tasks=task_specs(tasks), limit=limit, use_cache=None, cache_requests=False,
            log_samples=True, bootstrap_iters=0, verbosity="WARNING",
        )
    return {"results": results["results"], "samples": results["samples"]}


@dataclass
class Thresholds:
    """What counts as the same answers. Defaults by dtype: `Thresholds.for_dtype`."""

    loglikelihood_atol: float = 1e-4  # per-example |log-likelihood difference| ≤ atol + rtol·|log-likelihood|
    loglikelihood_rtol: float = 0.0
    min_choice_agreement: float = 1.0  # fraction of multiple-choice examples with the same chosen answer
    min_generation_match: float = 1.0  # fraction of generations exactly equal
    metric_atol: float = 1e-4  # |aggregate metric difference| (perplexities: relative)

    @classmethod
    def for_dtype(cls, dtype: torch.dtype) -> "Thresholds":
        """fp32: near-exact. Half precision: lm-eval sums log-probabilities in the model's dtype, so the numbers
        compared are themselves rounded to it (steps of 0.25 above 32 in bf16); rtol allows one such step."""
        if dtype == torch.float32:
            return cls()
        rtol = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
        return cls(loglikelihood_atol=0.1, loglikelihood_rtol=rtol, min_choice_agreement=0.9,
                   min_generation_match=0.8, metric_atol=0.05)


@dataclass
class Comparison:
    passed: bool
    reasons: list[str]
    tasks: dict[str, dict[str, Any]]
    offending: list[dict[str, Any]] = field(default_factory=list)
    thresholds: dict[str, float] = field(default_factory=dict)
    weights: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _loglikelihoods(resps) -> list[float]:
    if isinstance(resps, bool):
        return []
    if isinstance(resps, (int, float)):
        return [float(resps)]
    if isinstance(resps, (list, tuple)):
        if len(resps) == 2 and isinstance(resps[1], bool):  # (loglikelihood, is_greedy)
            return [float(resps[0])]
        return [x for r in resps for x in _loglikelihoods(r)]
    return []


def _generations(resps) -> list[str]:
    if isinstance(resps, str):
        return [resps]
    if isinstance(resps, (list, tuple)):
        return [x for r in resps for x in _generations(r)]
    return []


def compare_runs(baseline: dict[str, Any], candidate: dict[str, Any], thresholds: Thresholds) -> Comparison:
    """Per-example comparison of two `run_lm_eval` results; `passed` with the reasons when it fails."""
    reasons, offending, per_task = [], [], {}
    for task, base_samples in baseline["samples"].items():
        cand = {s["doc_id"]: s for s in candidate["samples"][task]}
        diffs, ll_outside, choices_same, choices_total, gens_same, gens_total = [], 0, 0, 0, 0, 0
        for sample in base_samples:
            other = cand[sample["doc_id"]]
            a, b = _loglikelihoods(sample["filtered_resps"]), _loglikelihoods(other["filtered_resps"])
            example_diff = max((abs(x - y) for x, y in zip(a, b)), default=0.0)
            diffs.extend(abs(x - y) for x, y in zip(a, b))
            bad = any(abs(x - y) > thresholds.loglikelihood_atol + thresholds.loglikelihood_rtol * abs(x)
                      for x, y in zip(a, b))
            ll_outside += bad
            if len(a) > 1:
                choices_total += 1
                same = max(range(len(a)), key=a.__getitem__) == max(range(len(b)), key=b.__getitem__)
                choices_same += same
                bad |= not same
            ga, gb = _generations(sample["filtered_resps"]), _generations(other["filtered_resps"])
            if ga:
                gens_total += 1
                gens_same += ga == gb
                bad |= ga != gb
            if bad:
                offending.append({"task": task, "doc_id": sample["doc_id"], "max_loglikelihood_diff": example_diff,
                                  "baseline": ga or a, "candidate": gb or b})
        metrics = {}
        for key, value in baseline["results"][task].items():
            other = candidate["results"][task].get(key)
            if isinstance(value, (int, float)) and isinstance(other, (int, float)) and "stderr" not in key:
                metrics[key] = {"baseline": value, "candidate": other, "delta": other - value}
                scale = max(1.0, abs(value)) if "perplexity" in key else 1.0
                if not math.isclose(value, other, abs_tol=thresholds.metric_atol * scale):
                    reasons.append(f"{task}: {key} moved from {value:.6g} to {other:.6g}")
        stats = {"examples": len(base_samples), "metrics": metrics,
                 "loglikelihood_diff_max": max(diffs, default=0.0),
                 "loglikelihood_diff_mean": sum(diffs) / len(diffs) if diffs else 0.0}
        if choices_total:
            stats["choice_agreement"] = choices_same / choices_total
            if stats["choice_agreement"] < thresholds.min_choice_agreement:
                reasons.append(f"{task}: chosen answers agree on {stats['choice_agreement']:.1%} of examples")
        if gens_total:
            stats["generation_match"] = gens_same / gens_total
            if stats["generation_match"] < thresholds.min_generation_match:
                reasons.append(f"{task}: generations equal on {stats['generation_match']:.1%} of examples")
        if ll_outside:
            reasons.append(f"{task}: log-likelihoods of {ll_outside} examples differ by more than "
                           f"{thresholds.loglikelihood_atol:g} + {thresholds.loglikelihood_rtol:g}·|ll| "
                           f"(largest difference {stats['loglikelihood_diff_max']:.3g})")
        per_task[task] = stats
    return Comparison(not reasons, reasons, per_task, offending, asdict(thresholds))


def parity(model, tokenizer, tasks: list[str] | None = None, limit: int | None = None, batch_size: int = 4,
           thresholds: Thresholds | None = None, **optimize_kwargs: Any) -> Comparison:
    """Run `tasks` on HF's own path and on qwen3_accel's, sharing one model object, and compare them.

    The model is optimized in place if it is not already (with `optimize_kwargs`). With `weights=` ("int8", "int4",
    "fp8") the baseline is the model as given (HF's forward, unquantized) and the candidate the quantized model:
    the comparison then measures the accuracy cost of quantization, against the usual thresholds.
    """
    import qwen3_accel

    tasks = tasks or list(BUNDLED_TASKS)
    thresholds = thresholds or Thresholds.for_dtype(model.dtype)
    if optimize_kwargs.get("weights"):
        if hasattr(model, "qwen3_accel"):
            raise ValueError("parity with weights= needs the unquantized, unoptimized model (the baseline runs first)")
        from ..quantize import check_weights_option

        check_weights_option(model, optimize_kwargs["weights"])
        baseline = run_lm_eval(model, tokenizer, tasks, limit, batch_size)
        qwen3_accel.optimize(model, **optimize_kwargs)
        candidate = run_lm_eval(model, tokenizer, tasks, limit, batch_size)
        comparison = compare_runs(baseline, candidate, thresholds)
        comparison.weights = (f"baseline: the model in {model.dtype} through HF's forward/generate; candidate: the "
                              f"same weights quantized to {optimize_kwargs['weights']} through qwen3_accel")
        return comparison
    qwen3_accel.optimize(model, **optimize_kwargs)
    with model.qwen3_accel.disabled():
        baseline = run_lm_eval(model, tokenizer, tasks, limit, batch_size)
    candidate = run_lm_eval(model, tokenizer, tasks, limit, batch_size)
    comparison = compare_runs(baseline, candidate, thresholds)
    comparison.weights = "shared: one model object, baseline through HF's forward/generate, then qwen3_accel's"
    return comparison


def format_comparison(comparison: Comparison) -> str:
    lines = [f"{'task':18}{'metric':22}{'HF':>14}{'qwen3_accel':>14}{'delta':>12}"]
    for task, stats in comparison.tasks.items():
        for key, m in stats["metrics"].items():
            lines.append(f"{task:18}{key:22}{m['baseline']:>14.6g}{m['candidate']:>14.6g}{m['delta']:>12.3g}")
        extra = [f"max |dll| {stats['loglikelihood_diff_max']:.3g}", f"mean |dll| {stats['loglikelihood_diff_mean']:.3g}"]
        if "choice_agreement" in stats:
            extra.append(f"same answer {stats['choice_agreement']:.1%}")
        if "generation_match" in stats:
            extra.append(f"same generation {stats['generation_match']:.1%}")
        lines.append(f"{'':18}{', '.join(extra)}")
    lines.append("PASS" if comparison.passed else "FAIL: " + "; ".join(comparison.reasons))
    for item in comparison.offending[:10]:
        lines.append(f"  offending: {item['task']} doc {item['doc_id']}: max |dll| {item['max_loglikelihood_diff']:.3g}, "
                     f"HF {str(item['baseline'])[:40]!r} vs ours {str(item['candidate'])[:40]!r}")
    return "\n".join(lines)
