"""Compile every Triton kernel of qwen3_accel for a GPU, on a machine without one.

Triton's whole compiler (TTIR -> TTGIR -> LLVM IR -> PTX -> cubin through its bundled ptxas) runs on the CPU; only
loading and launching a kernel needs the GPU. This script calls each op's Triton launcher on CPU tensors with the
dtypes and flags the GPU path uses, with Triton's driver replaced by one that reports the target GPU and a
`JITFunction.run` that compiles without launching. What it catches that the interpreter (how CI runs kernels)
cannot: errors only the compiler raises (types, layouts, conversions, resources), and the resource use of each
configuration: registers per thread, local memory (spills) and shared memory, from the cubin, and how many of
its global loads are 8- or 16-byte vector loads, from the PTX.

Block sizes follow the CPU branch of each launcher (e.g. `_launch_gemv` narrows BLOCK_N only on CUDA), so a few
GPU configurations differ in their block sizes from the ones compiled here.

    python scripts/compile_sm90.py                  # sm_90 (H100 / H200), a table
    python scripts/compile_sm90.py --arch 100 --json out.json
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_sm90.py compiles real kernels: run it without TRITON_INTERPRET=1")
# A kernel that does not build raises here, instead of its op falling back to another path (custom_ops/fallback.py).
os.environ["QWEN3_ACCEL_STRICT_COMPILE"] = "1"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402


@dataclass
class Compiled:
    case: str
    kernel: str
    registers: int
    local_bytes: int  # per thread: register spills and local arrays
    shared_bytes: int
    vector_loads: int  # ld.global.v2 / .v4 instructions in the PTX: 8- or 16-byte loads from global memory
    scalar_loads: int
    seconds: float


class TargetOnlyDriver:
    """Stands in for Triton's CUDA driver: says which GPU to compile for; there is no device to launch on."""

    def __init__(self, target: GPUTarget):
        self.target = target

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int = 0) -> int:
        return 0


def resource_usage(cubin: bytes) -> dict[str, int]:
    """REG / LOCAL / SHARED of the cubin's kernel, as Triton's bundled `cuobjdump --dump-resource-usage` reports."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    fields = dict(re.findall(r"\b(REG|LOCAL|SHARED):(\d+)", text))
    return {key: int(fields.get(key, 0)) for key in ("REG", "LOCAL", "SHARED")}


def compile_all(arch: int) -> list[Compiled]:
    """Every launcher on the shapes and formats below, compiled for sm_<arch>; raises naming each case that fails."""
    results: list[Compiled] = []
    current_case = [""]
    launch = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        start = time.perf_counter()
        kernel = launch(self, *args, grid=grid, warmup=True, **kwargs)
        usage = resource_usage(kernel.asm["cubin"])
        loads = re.findall(r"ld\.global(?:\.[a-z]+)*\.(v[24]\.)?[bfsu]\d+", kernel.asm["ptx"])
        vector = sum(1 for width in loads if width)
        results.append(Compiled(current_case[0], self.fn.__name__, usage["REG"], usage["LOCAL"],
                                max(usage["SHARED"], kernel.metadata.shared), vector, len(loads) - vector,
                                time.perf_counter() - start))
        return kernel

    # For the rest of this process: it only compiles.
    driver.set_active(TargetOnlyDriver(GPUTarget("cuda", arch, 32)))
    JITFunction.run = compile_only
    failures = []
    for name, call in cases():
        current_case[0] = name
        try:
            call()
        except Exception as error:  # report every case that does not compile, then fail
            failures.append(f"{name}: {type(error).__name__}: {error}")
    if failures:
        raise RuntimeError(f"{len(failures)} case(s) did not compile for sm_{arch}:\n" + "\n\n".join(failures))
    return results


def cases():
    """(name, call) pairs: each op's launcher with the GPU path's dtypes and flags, on small CPU tensors."""
    from qwen3_accel.custom_ops import (activation, attention, formats, linear, moe, paged_attention, rms_norm,
                                        rope)

    def randn(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape).to(dtype)

    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        tag = str(dtype).split(".")[-1]
        x, w = randn(3, 1024, dtype=dtype), randn(1024, dtype=dtype)
        yield f"rms_norm {tag}", lambda x=x, w=w: rms_norm.rms_norm_triton(x, w, 1e-6)
        yield f"fused_add_rms_norm {tag}", lambda x=x, w=w: rms_norm.fused_add_rms_norm_triton(x, x.clone(), w, 1e-6)
        yield f"silu_and_mul {tag}", lambda x=x: activation.silu_and_mul_triton(x)
        qkv, norm = randn(3, 48, 128, dtype=dtype), randn(128, dtype=dtype)
        rope_args = (qkv[:, :32], qkv[:, 32:40], norm, norm, torch.randn(64, 128), torch.tensor([0, 5, 9]), 1e-6)
        yield f"qk_norm_rope {tag}", lambda a=rope_args: rope.qk_norm_rope_triton(*a)
        cache = randn(4, 64, 8, 128, dtype=dtype)
        yield f"qk_norm_rope_store_kv {tag}", lambda a=rope_args, q=qkv, c=cache: rope.qk_norm_rope_store_kv_triton(
            *a[:2], q[:, 40:], *a[2:], c, c.clone(), torch.tensor([7]))
        for head_dim, group, batch, slots in ((128, 4, 3, 256), (64, 1, 3, 256), (128, 8, 1, 2048)):
            q = randn(batch, 2 * group, head_dim, dtype=dtype)
            kv = randn(batch + 1, slots, 2, head_dim, dtype=dtype)
            valid = torch.ones(batch + 1, slots, dtype=torch.bool)
            splits = attention.num_kv_splits(batch, 2, slots, attention._num_sms(q.device))
            yield (f"decode_attention {tag} d{head_dim} g{group} {splits} split(s)",
                   lambda q=q, kv=kv, valid=valid: attention.decode_attention_triton(
                       q, kv, kv.clone(), valid, torch.zeros(len(kv), dtype=torch.int32), torch.tensor([200]), 0.1))
        for head_dim, group, block_size, blocks in ((128, 4, 16, 16), (64, 8, 64, 64)):
            q = randn(3, 2 * group, head_dim, dtype=dtype)
            paged = randn(blocks, block_size, 2, head_dim, dtype=dtype)
            tables = torch.randint(0, blocks, (3, blocks // 2), dtype=torch.int32)
            splits = attention.num_kv_splits(3, 2, tables.shape[1] * block_size, attention._num_sms(q.device))
            yield (f"paged_decode_attention {tag} d{head_dim} g{group} block {block_size} {splits} split(s)",
                   lambda q=q, c=paged, t=tables: paged_attention.paged_decode_attention_triton(
                       q, c, c.clone(), t, torch.tensor([1, 40, 100], dtype=torch.int32), 0.1))
        for head_dim, group, block_size in ((128, 4, 16), (64, 8, 64)):
            q = randn(23, 2 * group, head_dim, dtype=dtype)
            paged = randn(8, block_size, 2, head_dim, dtype=dtype)
            tables = torch.randint(0, 8, (2, 4), dtype=torch.int32)
            yield (f"paged_prefill_attention {tag} d{head_dim} g{group} block {block_size}",
                   lambda q=q, c=paged, t=tables: paged_attention.paged_prefill_attention_triton(
                       q, c, c.clone(), t, torch.tensor([0, 3, 23], dtype=torch.int32),
                       torch.tensor([3, 50], dtype=torch.int32), 0.1))
        k, pool = randn(5, 2, 128, dtype=dtype), randn(8, 16, 2, 128, dtype=dtype)
        yield f"paged_store_kv {tag}", lambda k=k, c=pool: paged_attention.paged_store_kv_triton(
            k, k.clone(), c, c.clone(), torch.tensor([0, -1, 17, 40, 127]))

    hidden, inter, experts, top_k = 256, 128, 8, 2
    yield "moe_route", lambda: moe.moe_route_triton(torch.randn(3, experts), top_k, True)
    yield "align_slots", lambda: moe.align_slots(torch.randint(0, experts, (17, top_k), dtype=torch.int32),
                                                experts, 16)
    gate_up, down = randn(experts, 2 * inter, hidden), randn(experts, hidden, inter)
    expert_weights = {"bf16": (gate_up, down, ())}
    for fmt in ("fp8", "int8"):
        quantize = formats.quantize_fp8 if fmt == "fp8" else formats.quantize_int8
        per_expert = [[quantize(m) for m in weights] for weights in (gate_up, down)]
        stacked = [(torch.stack([q for q, _ in qs]), torch.stack([s for _, s in qs])) for qs in per_expert]
        groups = (128, 128) if fmt == "fp8" else (1, 1 << 20)
        expert_weights[fmt] = (stacked[0][0], stacked[1][0], (stacked[0][1], stacked[1][1], *groups))
    int4 = [[formats.quantize_int4(m) for m in weights] for weights in (gate_up, down)]
    expert_weights["int4"] = (torch.stack([q for q, _, _ in int4[0]]), torch.stack([q for q, _, _ in int4[1]]),
                              (torch.stack([s for _, s, _ in int4[0]]), torch.stack([s for _, s, _ in int4[1]]), 1,
                               formats.INT4_GROUP, torch.stack([z for _, _, z in int4[0]]),
                               torch.stack([z for _, _, z in int4[1]])))
    for fmt, (gu, dn, scales) in expert_weights.items():
        for tokens in (3, 17):
            x = randn(tokens, hidden)
            ids = torch.randint(0, experts, (tokens, top_k), dtype=torch.int32)
            weights = torch.rand(tokens, top_k)
            yield (f"fused_moe {fmt} {tokens} tokens",
                   lambda x=x, gu=gu, dn=dn, ids=ids, weights=weights, scales=scales: moe.fused_moe_triton(
                       x, gu, dn, weights, ids, *scales))
        x = randn(2, hidden)
        ids = torch.randint(0, experts, (2, top_k), dtype=torch.int32)
        yield (f"fused_moe {fmt} norm+residual",
               lambda x=x, gu=gu, dn=dn, ids=ids, scales=scales: moe.fused_moe_gemv(
                   x, gu, dn, torch.rand(2, top_k), ids, *(scales + (None,) * (6 - len(scales))), randn(hidden),
                   1e-6, x.clone()))

    weight = randn(512, 256)
    packed = {"int8": (*formats.quantize_int8(weight), None, 1, 256),
              "int4": (*formats.quantize_int4(weight), 1, formats.INT4_GROUP),
              "fp8": (*formats.quantize_fp8(weight), None, 128, 128)}
    for fmt, args in packed.items():
        for rows in (2, 17):
            yield (f"quantized_linear {fmt} {rows} rows",
                   lambda args=args, rows=rows: linear.quantized_linear_triton(randn(rows, 256), *args))
    operands = {"bf16": (weight, None, None, 1, 256), **packed}
    for fmt, args in operands.items():
        yield (f"decode_linear {fmt} norm+silu_mul",
               lambda args=args: linear.decode_linear_triton(randn(2, 256), *args, randn(256), 1e-6, None, True))
        yield (f"decode_linear {fmt} residual",
               lambda args=args: linear.decode_linear_triton(randn(2, 256), *args, None, 0.0, randn(2, 512), False))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 to compile for (90: H100/H200)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    results = compile_all(args.arch)
    print(f"{'case':46}{'kernel':30}{'regs':>6}{'local B':>9}{'shared B':>10}{'ld vec/scalar':>15}{'s':>7}")
    for r in results:
        loads = f"{r.vector_loads}/{r.scalar_loads}"
        print(f"{r.case:46}{r.kernel:30}{r.registers:>6}{r.local_bytes:>9}{r.shared_bytes:>10}{loads:>15}"
              f"{r.seconds:>7.1f}")
    print(f"{len(results)} kernel configurations compiled for sm_{args.arch} (triton {triton.__version__})")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
