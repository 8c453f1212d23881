"""Kernel benchmark: each op against torch eager and `torch.compile` of the same reference.

Reports microseconds, achieved GB/s (bytes each op must move / time) and the share of the copy
bandwidth measured in the same run. Decode attention is also compared with SDPA over the whole static
cache and with FlexAttention's decode path, the MoE block with HF's experts implementations. On CUDA the
calls replay from a CUDA graph over input sets larger than the L2 cache: GPU time at HBM speed, as the op
costs inside the decode graph.
"""

import itertools
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from .bench import copy_bandwidth, environment, median_time
from .configs import get_config
from .custom_ops import activation, attention, linear, moe, rms_norm, rope
from .custom_ops.formats import FP8_BLOCK, INT4_GROUP, quantize_fp8, quantize_int4, quantize_int8
from .timing import Spread, Timer

# Shapes used by published RMSNorm benchmarks, so the figures can sit beside theirs.
RMS_NORM_SHAPES = [(1, 128, 4096), (1, 512, 4096), (1, 1024, 4096), (1, 2048, 4096), (1, 4096, 4096),
                   (4, 512, 4096), (8, 256, 4096), (1, 8192, 4096)]
ATTENTION_CASES = [(b, ctx) for b in (1, 8, 32) for ctx in (1024, 4096, 32768)]
# FlexAttention compiles a kernel per shape (~10 s each), so it runs on a few cases only.
FLEX_CASES = [(1, 4096), (1, 32768), (32, 32768)]


@dataclass
class Case:
    """One shape of one op. Every contender is called as `fn(*make_inputs())`; the timer cycles through several
    input sets so that the bytes read per pass exceed the L2 cache and the figures are HBM figures."""

    op: str
    shape: str
    bytes_moved: int
    make_inputs: Callable[[], tuple]
    contenders: dict[str, Callable[..., Any]]
    host_synced: tuple[str, ...] = ()  # contenders that sync with the host, so no CUDA graph can hold them
    rotate: bool = True  # False where the shared weights read per call already exceed the L2 cache


def input_sets(case: Case, device: torch.device) -> list[tuple]:
    """Enough input sets that one pass through them reads 4x the L2 cache (one set off CUDA or without rotation)."""
    if device.type != "cuda" or not case.rotate:
        return [case.make_inputs()]
    l2_bytes = torch.cuda.get_device_properties(device).L2_cache_size
    return [case.make_inputs() for _ in range(min(256, -(-4 * l2_bytes // case.bytes_moved)))]


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
    fn()
    return 1e6 * median_time(Timer(device), fn, 5), "eager"


def _compiled(fn: Callable) -> Callable:
    return torch.compile(fn, dynamic=False)


def norm_cases(device: torch.device, dtype: torch.dtype, shapes) -> list[Case]:
    ref, fused_ref = rms_norm.rms_norm_reference, rms_norm.fused_add_rms_norm_reference
    cases = []
    for shape in shapes:
        w = torch.randn(shape[-1], device=device, dtype=dtype)

        def make(shape=shape, w=w):
            return torch.randn(shape, device=device, dtype=dtype), torch.randn(shape, device=device, dtype=dtype), w

        label = "x".join(map(str, shape))
        x_bytes, w_bytes = math.prod(shape) * w.element_size(), w.numel() * w.element_size()
        compiled, fused_compiled = _compiled(ref), _compiled(fused_ref)
        cases.append(Case("rms_norm", label, 2 * x_bytes + w_bytes, make, {
            "qwen3_accel": lambda x, r, w: torch.ops.qwen3_accel.rms_norm(x, w, 1e-6),
            "torch_eager": lambda x, r, w: ref(x, w, 1e-6),
            "torch_compile": lambda x, r, w, f=compiled: f(x, w, 1e-6),
        }))
        cases.append(Case("fused_add_rms_norm", label, 4 * x_bytes + w_bytes, make, {
            "qwen3_accel": lambda x, r, w: torch.ops.qwen3_accel.fused_add_rms_norm(x, r, w, 1e-6),
            "torch_eager": lambda x, r, w: fused_ref(x, r, w, 1e-6),
            "torch_compile": lambda x, r, w, f=fused_compiled: f(x, r, w, 1e-6),
        }))
    return cases


def _norm_rope_then_index_put(q, k, v, q_weight, k_weight, cos_sin, positions, eps, key_cache, value_cache,
                              write_pos):
    """The decode step before `qk_norm_rope_store_kv`: the op, then the cache writes as index-puts."""
    q_out, k_out = torch.ops.qwen3_accel.qk_norm_rope(q, k, q_weight, k_weight, cos_sin, positions, eps)
    slot = (torch.arange(q.shape[0], device=q.device)[:, None], write_pos.reshape(1, 1))
    key_cache[slot] = k_out[:, None]
    value_cache[slot] = v[:, None]
    return q_out


def _store_kv_case(device, dtype, tokens, norm_weight, cos_sin) -> Case:
    """QK-norm + RoPE with this step's K/V written into a 4096-slot cache (shared by the input sets: the step
    writes one slot of it)."""
    key_cache, value_cache = (torch.zeros(tokens, 4096, 8, 128, device=device, dtype=dtype) for _ in range(2))

    def make_inputs():
        qkv = torch.randn(tokens, 48, 128, device=device, dtype=dtype)
        positions = torch.randint(0, 40960, (tokens,), device=device)
        write_pos = torch.randint(0, 4096, (1,), device=device)
        return (qkv[:, :32], qkv[:, 32:40], qkv[:, 40:], norm_weight, norm_weight, cos_sin, positions, 1e-6,
                key_cache, value_cache, write_pos)

    moved = 2 * tokens * 48 * 128 * norm_weight.element_size()  # q, k, v read; q out, k and v into the cache
    return Case("qk_norm_rope_store_kv", f"{tokens}x(32+8+8)x128", moved, make_inputs, {
        "qwen3_accel": torch.ops.qwen3_accel.qk_norm_rope_store_kv,
        "qk_norm_rope+index_put": _compiled(_norm_rope_then_index_put),
        "torch_compile": _compiled(rope.qk_norm_rope_store_kv_reference),
    })


def rope_and_activation_cases(device: torch.device, dtype: torch.dtype, token_counts=(1, 32, 2048)) -> list[Case]:
    """Qwen3-8B heads (32 query, 8 kv, head_dim 128) and MLP width (12288)."""
    norm_weight = torch.randn(128, device=device, dtype=dtype)
    cos_sin = torch.randn(40960, 128, device=device)
    cases = []
    for tokens in token_counts:
        def make_rope(tokens=tokens):
            qkv = torch.randn(tokens, 48, 128, device=device, dtype=dtype)
            positions = torch.randint(0, 40960, (tokens,), device=device)
            return qkv[:, :32], qkv[:, 32:40], norm_weight, norm_weight, cos_sin, positions, 1e-6

        compiled = _compiled(rope.qk_norm_rope_reference)
        cases.append(Case("qk_norm_rope", f"{tokens}x(32+8)x128", 2 * tokens * 40 * 128 * norm_weight.element_size(),
                          make_rope, {
                              "qwen3_accel": torch.ops.qwen3_accel.qk_norm_rope,
                              "torch_eager": rope.qk_norm_rope_reference,
                              "torch_compile": compiled,
                          }))
        if tokens <= 32:
            cases.append(_store_kv_case(device, dtype, tokens, norm_weight, cos_sin))
        compiled = _compiled(activation.silu_and_mul_reference)
        cases.append(Case("silu_and_mul", f"{tokens}x2x12288", 3 * tokens * 12288 * norm_weight.element_size(),
                          lambda tokens=tokens: (torch.randn(tokens, 2 * 12288, device=device, dtype=dtype),), {
                              "qwen3_accel": torch.ops.qwen3_accel.silu_and_mul,
                              "torch_eager": activation.silu_and_mul_reference,
                              "torch_compile": compiled,
                          }))
    return cases


def _flex_decode(kv_valid: torch.Tensor) -> Callable[..., Any]:
    """FlexAttention's decode over the static cache, with invalid slots masked by a block mask built once (every
    input set of a case shares the valid-slot pattern)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    batch, slots = kv_valid.shape
    block_mask = create_block_mask(lambda b, h, q_idx, kv_idx: kv_valid[b, kv_idx], batch, None, 1, slots,
                                   device=kv_valid.device)
    flex = torch.compile(flex_attention, dynamic=False)

    def run(q, key_cache, value_cache, valid, start, end, scale):
        return flex(q[:, :, None, :], key_cache.transpose(1, 2), value_cache.transpose(1, 2), block_mask=block_mask,
                    scale=scale, enable_gqa=True)

    return run


def attention_cases(device: torch.device, dtype: torch.dtype, cases=ATTENTION_CASES,
                    flex_cases=FLEX_CASES) -> list[Case]:
    """Qwen3-8B attention shapes (32 query heads, 8 kv heads, head_dim 128); cache 25% longer than the context."""
    out = []
    n_q, n_kv, d = 32, 8, 128
    for batch, context in cases:
        slots = context + context // 4
        valid = torch.zeros(batch, slots, dtype=torch.bool, device=device)
        valid[:, :context] = True
        start = torch.zeros(batch, dtype=torch.int32, device=device)
        end = torch.tensor([context], device=device)

        def make(batch=batch, slots=slots, valid=valid, start=start, end=end):
            q = torch.randn(batch, n_q, d, device=device, dtype=dtype)
            k = torch.randn(batch, slots, n_kv, d, device=device, dtype=dtype)
            return q, k, torch.randn_like(k), valid, start, end, d**-0.5

        contenders = {
            "qwen3_accel": torch.ops.qwen3_accel.decode_attention,
            "sdpa_static_cache": attention.decode_attention_reference,
        }
        if (batch, context) in flex_cases:
            try:
                contenders["flex_attention"] = _flex_decode(valid)
            except Exception as exc:  # FlexAttention is young: report, never hide, when it cannot run a shape
                print(f"flex_attention unavailable for batch {batch}, context {context}: {exc!r}")
        kv_bytes = 2 * batch * context * n_kv * d * torch.finfo(dtype).bits // 8
        out.append(Case("decode_attention", f"b{batch} ctx{context}", kv_bytes, make, contenders))
    return out


def moe_cases(device: torch.device, dtype: torch.dtype, model: str = "Qwen3-30B-A3B",
              token_counts=(1, 8, 64, 512)) -> list[Case]:
    """One MoE block of `model`'s shapes: ours against HF's experts implementations (same weights, same router).

    Bytes are the expert weights the routing actually touches plus the router: the bound a perfect kernel meets.
    The input is not rotated: the expert weights (75 MB for one token of Qwen3-30B-A3B) already exceed the L2.
    """
    from transformers import AutoModelForCausalLM

    from .configs import get_config
    from .custom_ops import select_kernels
    from .decoder import mlp
    from .weights import mlp_weights

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
        contenders = {"qwen3_accel": lambda x, w=mlp_weights(block): mlp(kernels, w, x)}
        if device.type == "cuda":  # each of our two expert paths forced, to place moe.MOE_GEMV_MAX_TOKENS
            for name, path in (("gemv", moe.fused_moe_gemv), ("grouped", moe.fused_moe_grouped)):
                contenders[f"qwen3_accel_{name}"] = lambda x, path=path: _moe_block_with(path, kernels, block, x)
        for impl, hf_block in blocks.items():
            contenders[f"hf_{impl}"] = hf_block
        cases.append(Case("moe_block", f"{model} T={tokens} ({touched} experts)",
                          touched * per_expert + block.gate.weight.numel() * x.element_size(), lambda x=x: (x,),
                          contenders, rotate=False,
                          host_synced=("hf_eager",)))  # HF's eager loop asks the host which experts were hit
    return cases


def _moe_block_with(experts_path: Callable, kernels, block, x: torch.Tensor) -> torch.Tensor:
    """Our MoE block (router, routing, experts) with the experts computed by `experts_path`."""
    x2d = x.reshape(-1, x.shape[-1])
    weights, ids = kernels.moe_route(torch.nn.functional.linear(x2d, block.gate.weight), block.gate.top_k,
                                     block.gate.norm_topk_prob)
    return experts_path(x2d, block.experts.gate_up_proj, block.experts.down_proj, weights, ids).view(x.shape)


# Qwen3-8B's projections (N, K): fused q/k/v, o, fused gate/up, down.
QLINEAR_SHAPES = [(6144, 4096), (4096, 4096), (24576, 4096), (4096, 12288)]


def quantized_linear_cases(device: torch.device, dtype: torch.dtype, shapes=QLINEAR_SHAPES,
                           row_counts=(1, 4, 16, 512), formats=("int8", "int4", "fp8")) -> list[Case]:
    """Each weight format against torch.compile of dequantize-then-matmul, and the same projection in the model
    dtype (`linear_<dtype>`, cuBLAS through F.linear): the speedup quantization buys is the ratio of the two."""
    cases = []
    for (n_out, n_in), rows in itertools.product(shapes, row_counts):
        weight = torch.randn(n_out, n_in, device=device, dtype=dtype) * 0.02
        x_bytes = rows * (n_in + n_out) * weight.element_size()
        label = f"{rows}x{n_in}->{n_out}"
        weight_bytes = weight.numel() * weight.element_size()
        cases.append(Case(f"linear_{str(dtype).split('.')[-1]}", label, weight_bytes + x_bytes,
                          lambda rows=rows, n_in=n_in, weight=weight: (
                              torch.randn(rows, n_in, device=device, dtype=dtype), weight),
                          {"torch_eager": torch.nn.functional.linear}, rotate=False))
        for fmt in formats:
            if fmt == "int8":
                packed = (*quantize_int8(weight), None, 1, n_in)
            elif fmt == "int4":
                packed = (*quantize_int4(weight), 1, INT4_GROUP)
            else:
                block = FP8_BLOCK
                packed = (*quantize_fp8(weight), None, block, block)
            stored = sum(t.numel() * t.element_size() for t in packed[:3] if t is not None)
            compiled = _compiled(linear.quantized_linear_reference)
            cases.append(Case(f"quantized_linear_{fmt}", label, stored + x_bytes,
                              lambda rows=rows, n_in=n_in, packed=packed: (
                                  torch.randn(rows, n_in, device=device, dtype=dtype), *packed),
                              {"qwen3_accel": torch.ops.qwen3_accel.quantized_linear, "torch_compile": compiled},
                              rotate=False))
    return cases


def _fused_layer_linears(stream, _previous, attn_out, norm1, norm2, w_qkv, w_o, w_gate_up, w_down):
    """A decode layer's projections as `fuses_decode_linears` runs them: 4 `decode_linear` launches."""
    op = torch.ops.qwen3_accel.decode_linear
    qkv = op(stream, w_qkv, None, None, 1, w_qkv.shape[1], norm1, 1e-6, None, False)
    stream = op(attn_out, w_o, None, None, 1, w_o.shape[1], None, 0.0, stream, False)
    act = op(stream, w_gate_up, None, None, 1, w_gate_up.shape[1], norm2, 1e-6, None, True)
    return qkv, op(act, w_down, None, None, 1, w_down.shape[1], None, 0.0, stream, False)


def _unfused_layer_linears(stream, previous, attn_out, norm1, norm2, w_qkv, w_o, w_gate_up, w_down):
    """The same projections otherwise: cuBLAS GEMMs beside our add+norm and SiLU·mul kernels (7 launches)."""
    ops = torch.ops.qwen3_accel
    x, residual = ops.fused_add_rms_norm(stream, previous, norm1, 1e-6)
    qkv = torch.nn.functional.linear(x, w_qkv)
    x, residual = ops.fused_add_rms_norm(torch.nn.functional.linear(attn_out, w_o), residual, norm2, 1e-6)
    act = ops.silu_and_mul(torch.nn.functional.linear(x, w_gate_up))
    return qkv, torch.nn.functional.linear(act, w_down)


def _fused_head(stream, _previous, norm, w_head):
    """The final RMSNorm folded into the LM head's GEMV (`decode_logits`): one launch."""
    return torch.ops.qwen3_accel.decode_linear(stream, w_head, None, None, 1, w_head.shape[1], norm, 1e-6, None,
                                               False)


def _unfused_head(stream, previous, norm, w_head):
    """The last residual add + final RMSNorm kernel, then cuBLAS for the LM head: two launches."""
    x, _ = torch.ops.qwen3_accel.fused_add_rms_norm(stream, previous, norm, 1e-6)
    return torch.nn.functional.linear(x, w_head)


def decode_layer_linear_cases(device: torch.device, dtype: torch.dtype, models=("Qwen3-0.6B", "Qwen3-8B"),
                              row_counts=(1, 2, 4)) -> list[Case]:
    """The projections of one decode layer in the model dtype, and the final norm + LM head, through
    `decode_linear` and through cuBLAS with separate kernels: the figures that place DECODE_LINEAR_DENSE_MAX_HIDDEN
    (`decode_linear="auto"`)."""
    cases = []

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, device=device, dtype=dtype) * scale

    for name in models:
        config = get_config(name)
        hidden, inter = config.hidden_size, config.intermediate_size
        q_dim, kv_dim = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
        shapes = [(q_dim + 2 * kv_dim, hidden), (hidden, q_dim), (2 * inter, hidden), (hidden, inter)]
        weight_bytes = sum(n * k for n, k in shapes) * torch.finfo(dtype).bits // 8
        for rows in row_counts:
            # Defaults bind this model's sizes: the inputs are made later, after the loop has moved on.
            def make(rows=rows, hidden=hidden, q_dim=q_dim, shapes=shapes):
                return (randn(rows, hidden), randn(rows, hidden), randn(rows, q_dim), 1 + randn(hidden, scale=0.1),
                        1 + randn(hidden, scale=0.1), *(randn(n, k, scale=0.02) for n, k in shapes))

            cases.append(Case("decode_layer_linears", f"{name} {rows} row(s)", weight_bytes, make, {
                "qwen3_accel": _fused_layer_linears, "cublas+ops": _unfused_layer_linears,
            }))

            def make_head(rows=rows, hidden=hidden, vocab=config.vocab_size):
                return randn(rows, hidden), randn(rows, hidden), 1 + randn(hidden, scale=0.1), randn(vocab, hidden,
                                                                                                    scale=0.02)

            head_bytes = config.vocab_size * hidden * torch.finfo(dtype).bits // 8
            cases.append(Case("decode_norm_lm_head", f"{name} {rows} row(s)", head_bytes, make_head, {
                "qwen3_accel": _fused_head, "cublas+ops": _unfused_head,
            }))
    return cases


def run_kernel_bench(device: str = "cuda", dtype: str = "bfloat16", quick: bool = False) -> dict[str, Any]:
    """Every case, every contender; `quick` keeps one shape per op (for CPU smoke runs)."""
    dev, dt = torch.device(device), getattr(torch, dtype)
    bandwidth = copy_bandwidth(dev, nbytes=1 << (24 if quick else 30))
    norms = RMS_NORM_SHAPES[:1] if quick else RMS_NORM_SHAPES
    cases = norm_cases(dev, dt, norms) + rope_and_activation_cases(dev, dt, (4,) if quick else (1, 32, 2048))
    cases += attention_cases(dev, dt, [(1, 256)], [(1, 256)]) if quick else attention_cases(dev, dt)
    cases += moe_cases(dev, dt, "tiny-moe" if quick else "Qwen3-30B-A3B", (3,) if quick else (1, 2, 4, 8, 64, 512))
    cases += quantized_linear_cases(dev, dt, [(96, 256)], (3,)) if quick else quantized_linear_cases(dev, dt)
    cases += decode_layer_linear_cases(dev, dt, ("tiny",), (3,)) if quick else decode_layer_linear_cases(dev, dt)
    # Contenders are timed interleaved, round by round, so load from other processes falls on all of them alike; the
    # spread is over the rounds. GPU time comes from CUDA events over graph replays, which host load barely moves:
    # two rounds there (device time is scarce), five on the CPU.
    rounds = 2 if dev.type == "cuda" else 5
    rows = []
    for case in tqdm(cases, desc="bench-kernels", unit="case"):
        sets = input_sets(case, dev)
        row = {"op": case.op, "shape": case.shape, "bytes": case.bytes_moved, "input_sets": len(sets), "results": {}}
        times: dict[str, list[float]] = {name: [] for name in case.contenders}
        timers: dict[str, str] = {}
        for _ in range(rounds):
            for name, fn in case.contenders.items():
                if name in row["results"]:  # failed in an earlier round
                    continue
                rotation = itertools.cycle(sets)
                try:
                    with torch.no_grad():
                        us, timers[name] = time_us(lambda: fn(*next(rotation)), dev,
                                                   graph=name not in case.host_synced)
                except Exception as exc:
                    row["results"][name] = {"error": repr(exc)[:200]}
                    continue
                times[name].append(us)
        for name, values in times.items():
            if name in row["results"]:
                continue
            spread = Spread.of(values)
            gbps = case.bytes_moved / spread.median / 1e3
            row["results"][name] = {"us": spread.median, "us_spread": spread.to_dict(), "gb_s": gbps,
                                    "bandwidth_share": gbps * 1e9 / bandwidth, "timer": timers[name]}
        rows.append(row)
    return {"environment": environment(dev), "dtype": dtype, "copy_bandwidth_gb_s": bandwidth / 1e9, "cases": rows}


def format_kernel_table(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [f"kernels on {env['device']} ({report['dtype']}); torch {env['torch']}, triton {env['triton']}; "
             f"{env['date']}; copy bandwidth {report['copy_bandwidth_gb_s']:.0f} GB/s",
             f"{'op':20}{'shape':34}{'contender':20}{'us (min-max)':>24}{'GB/s':>10}{'% copy bw':>11}  timer"]
    for row in report["cases"]:
        for name, r in row["results"].items():
            if "error" in r:
                lines.append(f"{row['op']:20}{row['shape']:34}{name:20}  error: {r['error'][:60]}")
            else:
                spread = r["us_spread"]
                us = f"{r['us']:.1f} ({spread['min']:.1f}-{spread['max']:.1f})"
                lines.append(f"{row['op']:20}{row['shape']:34}{name:20}{us:>24}{r['gb_s']:>10.0f}"
                             f"{100 * r['bandwidth_share']:>10.1f}%  {r['timer']}")
    return "\n".join(lines)


def write_kernel_report(report: dict[str, Any], out_dir: str) -> list[str]:
    """JSON, table and a PNG of achieved bandwidth per case into `out_dir`; returns the paths."""
    import os

    from .reports import pyplot, write_json_and_table

    plt = pyplot()
    paths = [os.path.join(out_dir, f) for f in ("kernels.json", "kernels.txt", "kernels.png")]
    write_json_and_table(report, format_kernel_table(report), paths[0], paths[1])
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
