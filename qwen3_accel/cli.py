"""The `qwen3-accel` command: bench, bench-kernels, bench-serve, eval, lm-eval, generate, serve, info."""

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .bench import CONTENDERS, REQUESTS, BenchConfig
from .bench_serve import DEFAULT_SERVE_CONTENDERS, SERVE_CONTENDERS
from .custom_ops import KERNEL_MODES
from .eval import Thresholds
from .quantize import WEIGHT_FORMATS


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def _add_device_args(p: argparse.ArgumentParser, default_device: str) -> None:
    p.add_argument("--device", default=default_device, help="torch device to run on (default: %(default)s)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="weight and activation dtype (default: %(default)s)")


def _add_model_args(p: argparse.ArgumentParser, default_device: str) -> None:
    from .configs import MODEL_NAMES

    p.add_argument("--model", default="Qwen3-0.6B",
                   help=f"a shape from qwen3_accel.configs, built with random weights offline ({', '.join(MODEL_NAMES)}), "
                        "or a local checkpoint path / hub id (default: %(default)s)")
    _add_device_args(p, default_device)
    p.add_argument("--kernels", default="auto", choices=KERNEL_MODES,
                   help="qwen3_accel kernels: auto = Triton on CUDA, torch on CPU (default: %(default)s)")


def _comma_list(what: str, allowed: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
    """An argparse type: a comma-separated subset of `allowed`; anything else is an error naming it and `allowed`."""
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(x for x in text.split(",") if x)
        unknown = set(names) - set(allowed)
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {what} {sorted(unknown)}; choose from {allowed}")
        return names

    return parse


WEIGHTS_HELP = ("int8 (per output row), int4 (asymmetric, groups of 128) or fp8 (e4m3, 128x128 blocks): quantize "
                "the decoder layers' projections at optimize time, weight-only")


def build_parser() -> argparse.ArgumentParser:
    from .decoder import DECODE_LINEAR_MODES

    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser = argparse.ArgumentParser(prog="qwen3-accel", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser(
        "bench", help="decode and prefill speed: HF eager vs HF static cache + compile vs qwen3_accel",
        description="Measure HF eager, HF's static-cache + compile recipe and qwen3_accel on one model in one "
                    "process: time to first token by prompt length, decode tokens/s by batch size, peak memory, "
                    "speedups, and decode's share of the memory-bandwidth roofline. Writes JSON, a table and PNG "
                    "plots. Under `torchrun --nproc-per-node N` the model is sharded by transformers' tensor-parallel plan "
                    "and rank 0 prints and writes (bytes and roofline per GPU).",
    )
    _add_model_args(bench, default_device)
    bench.add_argument("--contenders", type=_comma_list("contenders", CONTENDERS), default=CONTENDERS,
                       help=f"comma-separated subset of {','.join(CONTENDERS)} (default: all)")
    bench.add_argument("--batch-sizes", type=_int_list, default=(1, 8, 32),
                       help="decode batch sizes, comma-separated (default: 1,8,32)")
    bench.add_argument("--prompt-lengths", type=_int_list, default=(128, 512, 2048),
                       help="prompt lengths for prefill latency / time to first token (default: 128,512,2048)")
    bench.add_argument("--decode-prompt-length", type=int, default=128,
                       help="prompt length before the timed decode (default: %(default)s)")
    bench.add_argument("--decode-tokens", type=int, default=64,
                       help="tokens generated in the timed decode (default: %(default)s)")
    bench.add_argument("--repeats", type=int, default=5,
                       help="timed rounds per case, the contenders interleaved in each; every figure is the median "
                            "with its min-max; a decode estimate within the timer's noise gets up to 3x as many "
                            "rounds, then is reported as unreliable (default: %(default)s)")
    bench.add_argument("--out", default="bench_out", help="folder for the JSON, table and plots (default: %(default)s)")
    bench.add_argument("--weights", type=_comma_list("weight formats", WEIGHT_FORMATS), default=(),
                       help=f"comma-separated formats, each measured after the others as qwen3_accel_<format> on a "
                            f"fresh copy of the model; {WEIGHTS_HELP}")
    # "auto" is the qwen3_accel contender itself
    other_modes = [m for m in DECODE_LINEAR_MODES if m != "auto"]
    bench.add_argument("--decode-linear", type=_comma_list("decode_linear modes", other_modes), default=(),
                       help="comma-separated decode_linear modes (always, never) each measured after the others as "
                            "qwen3_accel_decode_linear_<mode> on a fresh copy of the model, beside the default 'auto': "
                            "how decode steps of up to 4 rows run their projections (our fused GEMV with RMSNorm, "
                            "SiLU*mul and residual folded in, or cuBLAS and separate kernels)")
    bench.add_argument("--requests", type=_comma_list("requests", REQUESTS), default=(),
                       help="comma-separated requests beyond the plain decode table, timed for hf_eager and "
                            "qwen3_accel interleaved at each --request-batch-sizes: plain (greedy decoding, the "
                            "yardstick), beam4 (num_beams=4), penalty (repetition_penalty=1.1), and speculative "
                            "decoding with 4 drafts a round: assisted (the model as its own assistant: every draft "
                            "kept, so it shows what verifying costs), assisted_draft (--draft-model as the "
                            "assistant), lookup (prompt lookup on a prompt that repeats a phrase); the speculative "
                            "ones report the share of drafts kept (meaningless for real text with random weights)")
    bench.add_argument("--request-batch-sizes", type=_int_list, default=(1,),
                       help="comma-separated batch sizes of the --requests (default: 1; HF's assisted loop takes "
                            "one sequence, so hf_eager sits out larger speculative batches)")
    bench.add_argument("--draft-model", default=None,
                       help="the assistant of the assisted_draft request: a shape name from qwen3_accel.configs or a "
                            "checkpoint (e.g. Qwen3-0.6B for Qwen3-8B), in the model's dtype and device")

    kern = sub.add_parser(
        "bench-kernels", help="each op vs torch eager and torch.compile of its reference: µs, GB/s, %% of copy bandwidth",
        description="Time every qwen3_accel op against torch eager and torch.compile of the same reference, and "
                    "decode attention against SDPA over the static cache and FlexAttention. Writes JSON, a table "
                    "and a PNG.",
    )
    _add_device_args(kern, default_device)
    kern.add_argument("--quick", action="store_true", help="one small shape per op (a smoke run, e.g. on CPU)")
    kern.add_argument("--out", default="bench_out", help="folder for the JSON, table and plot (default: %(default)s)")

    serve_bench = sub.add_parser(
        "bench-serve", help="many users at once: our continuous batching vs HF's and vs static generate() batches",
        description="Replay a seeded request trace (Poisson arrivals or all at once, prompt and output lengths "
                    "around their means, eos ignored) with at most N requests in flight against qwen3_accel's "
                    "continuous batching, HF's own continuous batching on a plain copy of the weights, and our "
                    "generate() on static left-padded batches, taking turns round by round. Reports output "
                    "tokens/s, time to first token and time per output token (p50/p99), inter-token latency and "
                    "KV memory, each the median (min-max) over the rounds; writes JSON, a table and a PNG.",
    )
    _add_model_args(serve_bench, default_device)
    serve_bench.add_argument("--contenders", type=_comma_list("contenders", SERVE_CONTENDERS),
                             default=DEFAULT_SERVE_CONTENDERS,
                             help=f"comma-separated subset of {','.join(SERVE_CONTENDERS)} (default: "
                                  f"{','.join(DEFAULT_SERVE_CONTENDERS)}; qwen3_accel_no_overlap: our engine "
                                  "reading each step's tokens before scheduling the next, the CPU's way, to "
                                  "measure what overlap gains on CUDA; qwen3_accel_eager_chunks: our engine "
                                  "running steps with prompt chunks eagerly, to measure what their graphs gain)")
    serve_bench.add_argument("--concurrency", type=_int_list, default=(1, 32, 64),
                             help="requests in flight at most, one case each, comma-separated (default: 1,32,64)")
    serve_bench.add_argument("--requests", type=int, default=None,
                             help="requests per case (default: twice the concurrency, at least 8)")
    serve_bench.add_argument("--rate", type=float, default=math.inf,
                             help="arrivals per second, Poisson (default: inf, every request arrives at once)")
    serve_bench.add_argument("--prompt-len", type=int, default=128, help="mean prompt tokens (default: %(default)s)")
    serve_bench.add_argument("--output-len", type=int, default=128, help="mean output tokens (default: %(default)s)")
    serve_bench.add_argument("--length-spread", type=float, default=0.0,
                             help="lengths drawn uniformly within mean x (1 ± this) (default: %(default)s)")
    serve_bench.add_argument("--repeats", type=int, default=3,
                             help="timed rounds per case after one untimed warm-up round, the contenders "
                                  "taking turns in each (default: %(default)s)")
    serve_bench.add_argument("--max-batch-tokens", type=int, default=None,
                             help="tokens one engine step computes at most, both engines (default: 2048 on CUDA, "
                                  "256 on the CPU)")
    serve_bench.add_argument("--seed", type=int, default=0, help="the trace's seed (default: %(default)s)")
    serve_bench.add_argument("--out", default="bench_out",
                             help="folder for the JSON, table and plot (default: %(default)s)")

    gen = sub.add_parser("generate", help="generate with an optimized model",
                         description="Generate greedily with qwen3_accel. With a named shape (random weights, no "
                                     "tokenizer) the prompt is random token ids and the output is token ids. "
                                     "Under `torchrun --nproc-per-node N` the model is sharded by transformers' "
                                     "tensor-parallel plan and rank 0 prints.")
    _add_model_args(gen, default_device)
    gen.add_argument("--prompt", default="Hello, Qwen3!", help="prompt text (checkpoints with a tokenizer)")
    gen.add_argument("--prompt-tokens", type=int, default=16, help="random prompt length for named shapes")
    gen.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default: %(default)s)")
    gen.add_argument("--no-compile", action="store_true", help="run the decode step eagerly")
    gen.add_argument("--weights", choices=WEIGHT_FORMATS, default=None, help=WEIGHTS_HELP)

    ev = sub.add_parser(
        "eval", help="accuracy parity with lm-eval: HF baseline vs qwen3_accel on the same weights",
        description="Run lm-eval tasks on the HF baseline and on the optimized model (one model object, shared "
                    "weights, one after the other) and compare per example: log-likelihood differences, chosen "
                    "answers, generations, aggregate metrics. Bundled offline tasks by default. Needs lm-eval: "
                    "pip install \"qwen3-accel[eval]\".",
    )
    _add_model_args(ev, default_device)
    ev.set_defaults(model="tiny")
    ev.add_argument("--tasks", default="qwen3_accel_mc,qwen3_accel_ppl,qwen3_accel_gen",
                    help="comma-separated lm-eval tasks; the bundled offline ones are %(default)s")
    ev.add_argument("--limit", type=int, default=None, help="examples per task (default: all)")
    ev.add_argument("--batch-size", type=int, default=4, help="lm-eval batch size (default: %(default)s)")
    ev.add_argument("--tokenizer", default=None,
                    help="tokenizer path/id; default: the checkpoint's own, or one trained here for named shapes")
    ev.add_argument("--out", default="eval_out", help="folder for the JSON report (default: %(default)s)")
    ev.add_argument("--weights", choices=WEIGHT_FORMATS, default=None,
                    help=f"{WEIGHTS_HELP}; the baseline is then the unquantized model through HF's forward, so the "
                         "report is the accuracy cost of quantization per task (exit status 0 either way)")
    threshold_help = {
        "loglikelihood_atol": "per-example |log-likelihood difference| allowed, plus rtol x |log-likelihood|",
        "loglikelihood_rtol": "relative part of that allowance (half precision: one rounding step of the sums)",
        "min_choice_agreement": "fraction of multiple-choice examples that must pick the same answer",
        "min_generation_match": "fraction of generations that must be exactly equal",
        "metric_atol": "allowed change of each aggregate metric (relative for perplexities)",
    }
    fp32, bf16 = Thresholds.for_dtype(torch.float32), Thresholds.for_dtype(torch.bfloat16)
    for name, text in threshold_help.items():
        ev.add_argument(f"--{name.replace('_', '-')}", type=float, default=None,
                        help=f"{text} (default by dtype: fp32 {getattr(fp32, name):g}, bf16 {getattr(bf16, name):g})")

    sub.add_parser("info", help="versions, device and the kernels qwen3_accel would use")
    sub.add_parser("serve", help="transformers serve (OpenAI-compatible, continuous batching) on optimized models",
                   description=SERVE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter, add_help=False)
    sub.add_parser(
        "lm-eval", help="lm-eval's own command line, with the model type `qwen3_accel` registered",
        description="Runs lm-eval's CLI with every argument after `lm-eval` passed through unchanged, after "
                    "registering the model type `qwen3_accel` (lm-eval's HFLM with the loaded model optimized). "
                    "Example: qwen3-accel lm-eval --model qwen3_accel --model_args pretrained=PATH,dtype=bfloat16 "
                    "--tasks hellaswag. qwen3_accel options (kernels, attention, compile, fast_generate, "
                    "max_batch_size, max_cache_len, weights) go in --model_args. Needs "
                    "pip install 'qwen3-accel[eval]'.",
        add_help=False,
    )
    return parser


def _bench(args) -> None:
    from .bench import format_table, run_bench, write_report
    from .loading import is_main_process

    cfg = BenchConfig(
        model=args.model, device=args.device, dtype=args.dtype, contenders=args.contenders,
        batch_sizes=args.batch_sizes, prompt_lengths=args.prompt_lengths, decode_prompt_length=args.decode_prompt_length,
        decode_tokens=args.decode_tokens, repeats=args.repeats, kernels=args.kernels, weights=args.weights,
        decode_linear=args.decode_linear, requests=args.requests, request_batch_sizes=args.request_batch_sizes,
        draft_model=args.draft_model,
    )
    report = run_bench(cfg)
    if not is_main_process():
        return
    print(format_table(report))
    for path in write_report(report, args.out):
        print(f"wrote {path}")


def _bench_serve(args) -> None:
    from .bench_serve import ServeBenchConfig, format_serve_table, run_serve_bench, write_serve_report

    cfg = ServeBenchConfig(
        model=args.model, device=args.device, dtype=args.dtype, kernels=args.kernels, contenders=args.contenders,
        concurrency=args.concurrency, requests=args.requests, rate=args.rate, prompt_len=args.prompt_len,
        output_len=args.output_len, length_spread=args.length_spread, repeats=args.repeats,
        max_batch_tokens=args.max_batch_tokens, seed=args.seed,
    )
    report = run_serve_bench(cfg)
    print(format_serve_table(report))
    for path in write_serve_report(report, args.out):
        print(f"wrote {path}")


def _bench_kernels(args) -> None:
    from .bench_kernels import format_kernel_table, run_kernel_bench, write_kernel_report

    report = run_kernel_bench(args.device, args.dtype, quick=args.quick)
    print(format_kernel_table(report))
    for path in write_kernel_report(report, args.out):
        print(f"wrote {path}")


def _eval(args) -> None:
    import os

    from . import eval as parity_eval
    from .configs import MODEL_NAMES
    from .loading import load_model

    try:
        parity_eval.require_lm_eval()
    except ImportError as exc:
        raise SystemExit(str(exc))
    dtype = getattr(torch, args.dtype)
    model = load_model(args.model, torch.device(args.device), dtype)
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    elif args.model in MODEL_NAMES:
        from .eval.tokenizer import train_tokenizer

        tokenizer = train_tokenizer(min(384, model.config.vocab_size))
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model)
    tasks = [t for t in args.tasks.split(",") if t]
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Thresholds)
                 if getattr(args, f.name) is not None}
    thresholds = dataclasses.replace(Thresholds.for_dtype(dtype), **overrides)
    comparison = parity_eval.parity(model, tokenizer, tasks, args.limit, args.batch_size, thresholds,
                                    kernels=args.kernels, weights=args.weights)
    print(parity_eval.format_comparison(comparison))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"eval_{os.path.basename(args.model.rstrip('/'))}.json")
    with open(path, "w") as f:
        json.dump(comparison.to_dict(), f, indent=2, default=str)
    print(f"wrote {path}")
    if args.weights:
        print(f"weights={args.weights}: the deltas above are the accuracy cost of quantization against the thresholds "
              "of unquantized parity")
    elif not comparison.passed:
        raise SystemExit(1)


def _generate(args) -> None:
    import qwen3_accel

    from .configs import MODEL_NAMES
    from .loading import is_main_process, load_model

    model = load_model(args.model, torch.device(args.device), getattr(torch, args.dtype))
    qwen3_accel.optimize(model, kernels=args.kernels, compile=not args.no_compile, weights=args.weights)
    device = model.qwen3_accel.device
    if args.model in MODEL_NAMES:
        g = torch.Generator().manual_seed(0)  # the same prompt on every rank
        ids = torch.randint(1, model.config.vocab_size, (1, args.prompt_tokens), generator=g).to(device)
        out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=0)
        if is_main_process():
            print(out[0, ids.shape[1]:].tolist())
        return
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    inputs = tok(args.prompt, return_tensors="pt").to(device)
    out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    if is_main_process():
        print(tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))


def _info() -> None:
    import qwen3_accel

    from .bench import environment

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info = {"qwen3_accel": qwen3_accel.__version__, **environment(device),
            "kernels_auto": "triton" if device.type == "cuda" else "torch (reference)"}
    print(json.dumps(info, indent=2))


def _lm_eval(argv: list[str]) -> None:
    """lm-eval's CLI on `argv`, with our model type registered."""
    from .eval import require_lm_eval

    require_lm_eval()
    from lm_eval.__main__ import cli_evaluate

    from .eval import lm_eval_model  # noqa: F401 - registers --model qwen3_accel

    sys.argv = ["lm-eval", *argv]
    cli_evaluate()


SERVE_HELP = """\
usage: qwen3-accel serve MODEL [--optimize KEY=VALUE,...] [transformers serve's options]

`transformers serve` on Qwen3 / Qwen3-MoE models optimized by qwen3_accel, with continuous batching on (add
--no-continuous-batching to serve one request at a time): an OpenAI-compatible server (/v1/chat/completions,
/v1/completions, /v1/models, /health). Requests run on qwen3_accel's continuous-batching engine (paged KV cache,
our kernels; generation settings it does not implement go to HF's, and the log says so). Every argument but
--optimize is transformers serve's, passed through
unchanged (`transformers serve --help` lists them; e.g. --host, --port; the model is the positional MODEL). Needs
`pip install "transformers[serving]"`.

  --optimize KEY=VALUE,...   qwen3_accel.OptimizeOptions fields for every model the server loads, e.g.
                             --optimize max_cache_len=4096,compile=false,weights=int8
"""


def optimize_options(text: str) -> dict[str, Any]:
    """`KEY=VALUE,...` as OptimizeOptions fields, each value parsed by its field's type (true/false, ints, none)."""
    from .optimize import OptimizeOptions

    fields = {field.name: field for field in dataclasses.fields(OptimizeOptions)}
    options: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise SystemExit(f"--optimize: {item!r} is not KEY=VALUE with KEY one of {sorted(fields)}")
        kind = str(fields[key].type)
        if value.lower() == "none":
            options[key] = None
        elif kind.startswith("bool"):
            if value.lower() not in ("true", "false"):
                raise SystemExit(f"--optimize: {key} takes true or false, got {value!r}")
            options[key] = value.lower() == "true"
        elif kind.startswith("int"):
            options[key] = int(value)
        else:
            options[key] = value
    return options


def _serve(argv: list[str]) -> None:
    """transformers serve's CLI on `argv`, every Qwen3 model it loads optimized, continuous batching on."""
    if not argv or argv[0] in ("-h", "--help"):
        print(SERVE_HELP, end="")
        return
    options: dict[str, Any] = {}
    rest = []
    items = iter(argv)
    for arg in items:
        if arg == "--optimize" or arg.startswith("--optimize="):
            options.update(optimize_options(arg.partition("=")[2] if "=" in arg else next(items, "")))
        else:
            rest.append(arg)
    if not any(arg.endswith("continuous-batching") for arg in rest):
        rest.append("--continuous-batching")
    from . import patch_transformers

    patch_transformers(**options)  # the server loads models with from_pretrained: they come back optimized
    handler = logging.StreamHandler()  # which engine serves, and the requests it cancels, in the server's log
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    package_logger = logging.getLogger("qwen3_accel")
    package_logger.addHandler(handler)
    package_logger.setLevel(logging.INFO)
    from transformers.cli.transformers import app

    app(["serve", *rest], prog_name="qwen3-accel")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["lm-eval"]:  # everything after it is lm-eval's, --help included
        _lm_eval(argv[1:])
        return
    if argv[:1] == ["serve"]:  # transformers serve's arguments pass through
        _serve(argv[1:])
        return
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        _bench(args)
    elif args.command == "bench-kernels":
        _bench_kernels(args)
    elif args.command == "bench-serve":
        _bench_serve(args)
    elif args.command == "eval":
        _eval(args)
    elif args.command == "generate":
        _generate(args)
    else:
        _info()
    if torch.distributed.is_initialized():  # a torchrun job (bench, generate): leave the group cleanly, every
        torch.distributed.barrier()  # rank done before any closes its connections (gloo aborted the process once)
        torch.distributed.destroy_process_group()


def run() -> None:
    """The `qwen3-accel` program: `main`, then, in a job torchrun launched, the end of the process without Python's
    teardown. A tensor-parallel model transformers 5.17 loaded aborts the interpreter's teardown now and then under
    gloo ("terminate called without an active exception", SIGABRT, after everything ran and printed): 1 exit of 24
    with plain transformers and no qwen3_accel, 5 of 52 through this command (torch 2.13, CPU, 2026-12-02), which
    turned a finished job into a failed one. The group is left and the output flushed by then."""
    main(sys.argv[1:])
    if "TORCHELASTIC_RUN_ID" in os.environ:  # set by torchrun for its workers
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    run()
