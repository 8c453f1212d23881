#!/usr/bin/env bash
# Every GPU figure in one run: GPU tests, kernel benchmarks, end-to-end benchmarks.
# Usage (repository root): scripts/gpu_suite.sh OUT_DIR [STAGE...]
# Stages: tests kernels Qwen3-0.6B Qwen3-8B Qwen3-30B-A3B eval (default: all but eval, ~13 minutes on one
# H100; run it as two calls of a few stages each where one command is limited to 10 minutes).
# `eval` (bf16 lm-eval parity on Qwen3-0.6B shapes) needs lm-eval and its pure-Python dependencies importable.
set -uo pipefail
out=${1:?usage: scripts/gpu_suite.sh OUT_DIR [STAGE...]}
shift
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(tests kernels Qwen3-0.6B Qwen3-8B Qwen3-30B-A3B)
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} TQDM_MININTERVAL=30
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.txt"
quiet() { grep -v "it/s\]\|case/s\]\|s/case\]"; }
for stage in "${stages[@]}"; do
    echo "=== $stage ($(date -u +%H:%M:%S))"
    case $stage in
    tests)
        timeout 300 python3 -m pytest -q -rs -p no:cacheprovider tests/test_gpu.py tests/test_kernels.py \
            tests/test_attention.py tests/test_moe.py tests/test_generate.py tests/test_compile.py -s 2>&1 \
            | grep -v "^DEBUG" | tee "$out/pytest.txt" | tail -15 ;;
    kernels)
        timeout 300 python3 -m qwen3_accel.cli bench-kernels --out "$out" 2>&1 | quiet ;;
    Qwen3-0.6B)
        timeout 300 python3 -m qwen3_accel.cli bench --model Qwen3-0.6B --batch-sizes 1,8 \
            --prompt-lengths 128,2048 --out "$out" 2>&1 | quiet ;;
    Qwen3-8B)
        timeout 300 python3 -m qwen3_accel.cli bench --model Qwen3-8B --batch-sizes 1,8 \
            --prompt-lengths 128,2048 --out "$out" 2>&1 | quiet ;;
    Qwen3-30B-A3B)
        timeout 300 python3 -m qwen3_accel.cli bench --model Qwen3-30B-A3B --contenders hf_eager,qwen3_accel \
            --batch-sizes 1,8 --prompt-lengths 128 --decode-tokens 16 --repeats 2 --out "$out" 2>&1 | quiet ;;
    eval)
        timeout 300 python3 -m qwen3_accel.cli eval --model Qwen3-0.6B --batch-size 8 --out "$out" 2>&1 | quiet ;;
    *) echo "unknown stage $stage" ;;
    esac
done
