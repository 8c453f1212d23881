#!/usr/bin/env bash
# One GPU run that refreshes every figure: GPU tests, then end-to-end benchmarks.
# Usage: scripts/gpu_suite.sh OUT_DIR [MODELS...]   (run from the repository root, package on PYTHONPATH)
set -uo pipefail
out=${1:?usage: scripts/gpu_suite.sh OUT_DIR [MODELS...]}
shift
models=("${@:-Qwen3-0.6B Qwen3-8B}")
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.txt"
python3 -m pytest -q -rs tests -s 2>&1 | tee "$out/pytest.txt"
for model in ${models[@]}; do
    python3 -m qwen3_accel.cli bench --model "$model" --out "$out" ${BENCH_ARGS:-} 2>&1 | grep -v "it/s\]\|case/s\]" | tee "$out/bench_$model.log"
done
