"""Kernel benchmark: each op against torch eager and `torch.compile` of the same reference.

Reports microseconds, achieved GB/s (bytes each op must move / time) and the share of the copy
bandwidth measured in the same run. Decode attention is also compared with SDPA over the whole static
cache and with FlexAttention's decode path.
"""

from dataclasses import dataclass
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from .custom_ops import activation, attention, rms_norm, rope

# Shapes used by published RMSNorm benchmarks, so the figures can sit beside theirs.
RMS_NORM_SHAPES = [(1, 128, 4096), (1, 512, 4096), (1, 1024, 4096), (1, 2048, 4096), (1, 4096, 4096),
                   (4, 512, 4096), (8, 256, 4096), (1, 8192, 4096)]
ATTENTION_CASES = [(b, ctx) for b in (1, 8, 32) for ctx in (1024, 4096, 32768)]
# FlexAttention compiles a kernel per shape (~10 s each), so it runs on a few cases only.
FLEX_CASES = [(1, 4096), (1, 32768), (32, 32768)]


@dataclass
class Case:
    op: str
    shape: str
    bytes_moved: int
    contenders: dict[str, Callable[[], Any]]
    host_synced: tuple[str, ...] = ()  # contenders that sync with the host, so no CUDA graph can hold them


def time_us(fn: Callable[[], Any], device: torch.device, graph: bool = True) -> tuple[float, str]:
    """Median microseconds per call and the timer used.

    On CUDA the calls are replayed from a CUDA graph (triton's do_bench_cudagraph), so the figure is GPU time
    without the per-call host and dispatch cost. With `graph=False`, or when capture fails (a host sync
    inside), do_bench times eager calls instead. Elsewhere: a perf_counter loop.
    """
    if device.type == "cuda":
        import triton.testing

        if graph:
            try:
                return 1e3 * triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median"), "cuda_graph"
            except RuntimeError:
                torch.cuda.synchronize()
        return 1e3 * triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"), "eager"
    import statistics
    import time

    fn()
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return 1e6 * statistics.median(samples), "eager"


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _compiled(fn: Callable) -> Callable:
    return torch.compile(fn, dynamic=False)


def norm_cases(device: torch.device, dtype: torch.dtype, shapes) -> list[Case]:
    cases = []
    for shape in shapes:
        x = torch.randn(shape, device=device, dtype=dtype)
        r = torch.randn(shape, device=device, dtype=dtype)
        w = torch.randn(shape[-1], device=device, dtype=dtype)
        label = "x".join(map(str, shape))
        ref, fused_ref = rms_norm.rms_norm_reference, rms_norm.fused_add_rms_norm_reference
        compiled, fused_compiled = _compiled(ref), _compiled(fused_ref)
        cases.append(Case("rms_norm", label, 2 * _nbytes(x) + _nbytes(w), {
            "qwen3_accel": lambda x=x, w=w: torch.ops.qwen3_accel.rms_norm(x, w, 1e-6),
            "torch_eager": lambda x=x, w=w: ref(x, w, 1e-6),
            "torch_compile": lambda x=x, w=w, f=compiled: f(x, w, 1e-6),
        }))
        cases.append(Case("fused_add_rms_norm", label, 4 * _nbytes(x) + _nbytes(w), {
            "qwen3_accel": lambda x=x, r=r, w=w: torch.ops.qwen3_accel.fused_add_rms_norm(x, r, w, 1e-6),
            "torch_eager": lambda x=x, r=r, w=w: fused_ref(x, r, w, 1e-6),
            "torch_compile": lambda x=x, r=r, w=w, f=fused_compiled: f(x, r, w, 1e-6),
        }))
    return cases


def rope_and_activation_cases(device: torch.device, dtype: torch.dtype, token_counts=(1, 32, 2048)) -> list[Case]:
    cases = []
    for tokens in token_counts:  # Qwen3-8B heads: 32 query, 8 kv, head_dim 128; MLP 12288
        qkv = torch.randn(tokens, 48, 128, device=device, dtype=dtype)
        q, k = qkv[:, :32], qkv[:, 32:40]
        w = torch.randn(128, device=device, dtype=dtype)
        cos_sin = torch.randn(40960, 128, device=device)
        positions = torch.randint(0, 40960, (tokens,), device=device)
        args = (q, k, w, w, cos_sin, positions, 1e-6)
        compiled = _compiled(rope.qk_norm_rope_reference)
        cases.append(Case("qk_norm_rope", f"{tokens}x(32+8)x128", 2 * (_nbytes(q) + _nbytes(k)), {
            "qwen3_accel": lambda a=args: torch.ops.qwen3_accel.qk_norm_rope(*a),
            "torch_eager": lambda a=args: rope.qk_norm_rope_reference(*a),
            "torch_compile": lambda a=args, f=compiled: f(*a),
        }))
        gate_up = torch.randn(tokens, 2 * 12288, device=device, dtype=dtype)
        compiled = _compiled(activation.silu_and_mul_reference)
        cases.append(Case("silu_and_mul", f"{tokens}x2x12288", _nbytes(gate_up) * 3 // 2, {
            "qwen3_accel": lambda g=gate_up: torch.ops.qwen3_accel.silu_and_mul(g),
            "torch_eager": lambda g=gate_up: activation.silu_and_mul_reference(g),
            "torch_compile": lambda g=gate_up, f=compiled: f(g),
        }))
    return cases


def _flex_decode(q, key_cache, value_cache, kv_valid, scale):
    """FlexAttention's decode over the static cache, masking invalid slots with a block mask."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    batch, slots = kv_valid.shape
    block_mask = create_block_mask(lambda b, h, q_idx, kv_idx: kv_valid[b, kv_idx], batch, None, 1, slots,
                                   device=q.device)
    flex = torch.compile(flex_attention, dynamic=False)
    qt = q[:, :, None, :]
    kt, vt = key_cache.transpose(1, 2), value_cache.transpose(1, 2)
    return lambda: flex(qt, kt, vt, block_mask=block_mask, scale=scale, enable_gqa=True)


def attention_cases(device: torch.device, dtype: torch.dtype, cases=ATTENTION_CASES,
                    flex_cases=FLEX_CASES) -> list[Case]:
    """Qwen3-8B attention shapes (32 query heads, 8 kv heads, head_dim 128); cache 25% longer than the context."""
    out = []
    n_q, n_kv, d = 32, 8, 128
    for batch, context in cases:
        slots = context + context // 4
        q = torch.randn(batch, n_q, d, device=device, dtype=dtype)
        k = torch.randn(batch, slots, n_kv, d, device=device, dtype=dtype)
        v = torch.randn_like(k)
        valid = torch.zeros(batch, slots, dtype=torch.bool, device=device)
        valid[:, :context] = True
        start = torch.zeros(batch, dtype=torch.int32, device=device)
        end = torch.tensor([context], device=device)
        scale = d**-0.5
        contenders = {
            "qwen3_accel": lambda a=(q, k, v, valid, start, end, scale): torch.ops.qwen3_accel.decode_attention(*a),
            "sdpa_static_cache": lambda a=(q, k, v, valid, start, end, scale): attention.decode_attention_reference(*a),
        }
        if (batch, context) in flex_cases:
            try:
                contenders["flex_attention"] = _flex_decode(q, k, v, valid, scale)
            except Exception as exc:  # FlexAttention is young: report, never hide, when it cannot run a shape
                print(f"flex_attention unavailable for batch {batch}, context {context}: {exc!r}")
        out.append(Case("decode_attention", f"b{batch} ctx{context}", 2 * batch * context * n_kv * d * q.element_size(),
                        contenders))
    return out


def moe_cases(device: torch.device, dtype: torch.dtype, model: str = "Qwen3-30B-A3B",
              token_counts=(1, 8, 64, 512)) -> list[Case]:
    """One MoE block of `model`'s shapes: ours against HF's experts implementations (same weights, same router).

    Bytes are the expert weights the routing actually touches plus the router: the bound a perfect kernel meets.
    """
    from transformers import AutoModelForCausalLM

    from .configs import get_config
    from .custom_ops import select_kernels
    from .patches import qwen3_moe

    config = get_config(model, num_hidden_layers=1, vocab_size=1024)
    blocks = {}
    for impl in ("eager", "batched_mm", "grouped_mm"):
        with torch.device(device):
            hf = AutoModelForCausalLM.from_config(config, dtype=dtype, experts_implementation=impl).eval()
        if blocks:
            hf.load_state_dict(blocks["eager"].state_dict(), strict=False)
        blocks[impl] = hf.model.layers[0].mlp
    block = blocks["eager"]
    kernels = select_kernels("auto", device)
    per_expert = 3 * config.hidden_size * config.moe_intermediate_size * block.experts.gate_up_proj.element_size()
    cases = []
    for tokens in token_counts:
        x = torch.randn(1, tokens, config.hidden_size, device=device, dtype=dtype)
        with torch.no_grad():
            logits = torch.nn.functional.linear(x[0], block.gate.weight)
            touched = int(torch.topk(logits, config.num_experts_per_tok, dim=-1).indices.unique().numel())
        contenders = {"qwen3_accel": lambda x=x: qwen3_moe.mlp(kernels, block, x)}
        for impl, hf_block in blocks.items():
            contenders[f"hf_{impl}"] = lambda x=x, b=hf_block: b(x)
        cases.append(Case("moe_block", f"{model} T={tokens} ({touched} experts)",
                          touched * per_expert + block.gate.weight.numel() * x.element_size(), contenders,
                          host_synced=("hf_eager",)))  # HF's eager loop asks the host which experts were hit
    return cases


def run_kernel_bench(device: str = "cuda", dtype: str = "bfloat16", quick: bool = False) -> dict[str, Any]:
    """Every case, every contender; `quick` keeps one shape per op (for CPU smoke runs)."""
    from .bench import copy_bandwidth, environment

    dev, dt = torch.device(device), getattr(torch, dtype)
    bandwidth = copy_bandwidth(dev, nbytes=1 << (24 if quick else 30))
    norms = RMS_NORM_SHAPES[:1] if quick else RMS_NORM_SHAPES
    cases = norm_cases(dev, dt, norms) + rope_and_activation_cases(dev, dt, (4,) if quick else (1, 32, 2048))
    cases += attention_cases(dev, dt, [(1, 256)], [(1, 256)]) if quick else attention_cases(dev, dt)
    cases += moe_cases(dev, dt, "tiny-moe" if quick else "Qwen3-30B-A3B", (3,) if quick else (1, 8, 64, 512))
    rows = []
    for case in tqdm(cases, desc="bench-kernels", unit="case"):
        row = {"op": case.op, "shape": case.shape, "bytes": case.bytes_moved, "results": {}}
        for name, fn in case.contenders.items():
            try:
                with torch.no_grad():
                    us, timer = time_us(fn, dev, graph=name not in case.host_synced)
            except Exception as exc:
                row["results"][name] = {"error": repr(exc)[:200]}
                continue
            gbps = case.bytes_moved / us / 1e3
            row["results"][name] = {"us": us, "gb_s": gbps, "bandwidth_share": gbps * 1e9 / bandwidth,
                                    "timer": timer}
        rows.append(row)
    return {"environment": environment(dev), "dtype": dtype, "copy_bandwidth_gb_s": bandwidth / 1e9, "cases": rows}


def format_kernel_table(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [f"kernels on {env['device']} ({report['dtype']}); torch {env['torch']}, triton {env['triton']}; "
             f"{env['date']}; copy bandwidth {report['copy_bandwidth_gb_s']:.0f} GB/s",
             f"{'op':20}{'shape':34}{'contender':20}{'us':>10}{'GB/s':>10}{'% copy bw':>11}  timer"]
    for row in report["cases"]:
        for name, r in row["results"].items():
            if "error" in r:
                lines.append(f"{row['op']:20}{row['shape']:34}{name:20}  error: {r['error'][:60]}")
            else:
                lines.append(f"{row['op']:20}{row['shape']:34}{name:20}{r['us']:>10.1f}{r['gb_s']:>10.0f}"
                             f"{100 * r['bandwidth_share']:>10.1f}%  {r['timer']}")
    return "\n".join(lines)


def write_kernel_report(report: dict[str, Any], out_dir: str) -> list[str]:
    """JSON, table and a PNG of achieved bandwidth per case into `out_dir`; returns the paths."""
    import json
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, f) for f in ("kernels.json", "kernels.txt", "kernels.png")]
    with open(paths[0], "w") as f:
        json.dump(report, f, indent=2)
    with open(paths[1], "w") as f:
        f.write(format_kernel_table(report) + "\n")
    rows = report["cases"]
    names = sorted({n for row in rows for n in row["results"]})
    fig, ax = plt.subplots(figsize=(max(8, 0.45 * len(rows)), 4.5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        shares = [100 * row["results"].get(name, {}).get("bandwidth_share", 0.0) for row in rows]
        ax.bar([j + i * width for j in range(len(rows))], shares, width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))], [f"{r['op']} {r['shape']}" for r in rows],
                  rotation=75, fontsize=7)
    ax.set(ylabel="% of measured copy bandwidth", title=f"kernels, {report['environment']['device']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(paths[2], dpi=120)
    plt.close(fig)
    return paths
