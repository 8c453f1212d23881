"""Every Triton kernel through Triton's real compiler for the H100/H200 (sm_90), PTX and ptxas included, on the CPU:
what the interpreter, which runs the kernels in the other CPU tests, cannot check (compiler-only type, layout and
resource errors). scripts/compile_sm90.py does the compiling in a process of its own, without the interpreter."""

import json
import os
import subprocess
import sys
from pathlib import Path

from qwen3_accel.custom_ops import activation, attention, linear, moe, paged_attention, rms_norm, rope

ROOT = Path(__file__).resolve().parents[1]


def defined_kernels() -> set[str]:
    """Names of the Triton kernels defined in our op modules."""
    return {name for module in (activation, attention, linear, moe, paged_attention, rms_norm, rope)
            for name, obj in vars(module).items()
            if name.endswith("_kernel") and getattr(getattr(obj, "fn", None), "__module__", None) == module.__name__}


def test_every_kernel_compiles_for_sm90(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    out = tmp_path / "compiled.json"
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "compile_sm90.py"), "--json", str(out)], env=env,
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads(out.read_text())
    kernels = defined_kernels()
    assert len(kernels) >= 10, kernels
    assert kernels <= {r["kernel"] for r in results}, f"never compiled: {kernels - {r['kernel'] for r in results}}"
    assert all(r["registers"] > 0 for r in results)
    # The decode GEMVs stream weights: they must read them with vector loads, in every format (int4 once read
    # its packed bytes one at a time, at a fraction of the bandwidth, while every interpreted test passed).
    gemvs = [r for r in results if r["kernel"] in ("_gemv_kernel", "_moe_gemv_gate_up_kernel", "_moe_gemv_down_kernel")]
    assert {r["case"].split()[1] for r in gemvs if r["case"].startswith("decode_linear")} == {
        "bf16", "int8", "int4", "fp8"}
    assert all(r["vector_loads"] > 0 for r in gemvs), [r for r in gemvs if not r["vector_loads"]]
