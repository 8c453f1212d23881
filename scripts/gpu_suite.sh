#!/usr/bin/env bash
# Every GPU figure in one run: GPU tests, kernel benchmarks, end-to-end benchmarks, lm-eval parity.
# Usage (repository root): scripts/gpu_suite.sh OUT_DIR [STAGE...]
#   default stages: first second (on an H100 about 15 minutes in all), which are
#                   first            tests kernels Qwen3-0.6B Qwen3-8B
#                   second           quantized Qwen3-30B-A3B
#   A session's device time is now 15 minutes, the machine's start included, and one command runs 10 minutes at
#   most: run `first` and `second` as two calls back to back, while the machine is still warm (30 s).
#   optional:       eval             bf16 lm-eval parity on Qwen3-0.6B shapes (needs lm-eval importable)
#                   kernels-in-graph qwen3_accel's decode with kernels="torch": Inductor fuses the reference
#                                    ops inside the CUDA graph instead of calling our Triton ops
#                   soak             8 minutes of mixed generate() requests on one Qwen3-0.6B model: crashes,
#                                    graphs held, memory after warm-up and at the end (scripts/soak.py)
#                   soak-serve       5 minutes of the continuous-batching manager on Qwen3-0.6B: requests arriving,
#                                    streaming, cancelled, preempted; one final output each, the pool whole at the end
#                   sizes            the other dense sizes (Qwen3-1.7B, 4B, 14B, 32B), qwen3_accel at batch 1,
#                                    tok/s, % of roofline and GPU operations per step (one call of its own)
#                   serve            bench-serve (issue 24): our continuous batching vs HF's vs static generate()
#                                    batches, Qwen3-0.6B and Qwen3-8B at 1, 32 and 64 users, 128 in / 128 out
#                   serve-overlap    our engine with and without overlap (the host's work for the next step hidden
#                                    behind this one) and with steps of prompt chunks eager instead of graphed,
#                                    Qwen3-0.6B and Qwen3-8B at 64 users (about 6 minutes)
#                   requests         requests beyond plain decoding on Qwen3-0.6B and Qwen3-8B, HF eager vs
#                                    qwen3_accel: beam search, a repetition penalty, and speculative decoding
#                                    (issue 25: self-drafting, Qwen3-0.6B drafting for Qwen3-8B, prompt lookup)
#                                    at batch 1 and 4, against plain decoding in the same run
# Each stage has its own time limit; $OUT_DIR/timing.txt records how long each one took.
set -uo pipefail
out=${1:?usage: scripts/gpu_suite.sh OUT_DIR [STAGE...]}
shift
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(first second)
expanded=()
for stage in "${stages[@]}"; do
    case $stage in
    first) expanded+=(tests kernels Qwen3-0.6B Qwen3-8B) ;;
    second) expanded+=(quantized Qwen3-30B-A3B) ;;
    *) expanded+=("$stage") ;;
    esac
done
stages=("${expanded[@]}")
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} TQDM_MININTERVAL=30
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.txt"
quiet() { grep -v "it/s\]\|case/s\]\|s/case\]\|run/s\]\|s/run\]"; }
bench=(python3 -m qwen3_accel.cli bench)
suite_start=$SECONDS
for stage in "${stages[@]}"; do
    echo "=== $stage ($(date -u +%H:%M:%S))"
    stage_start=$SECONDS
    case $stage in
    tests)
        parallel=(); python3 -c "import xdist" 2>/dev/null && parallel=(-n 4)
        timeout 150 python3 -m pytest -q -rs -p no:cacheprovider "${parallel[@]}" tests/test_gpu.py tests/test_kernels.py \
            tests/test_attention.py tests/test_moe.py "tests/test_decode_linear.py::test_decode_linear_matches_hf_modules" \
            --durations=12 2>&1 | grep -v "^DEBUG" | tee "$out/pytest.txt" | tail -24 ;;
    kernels)
        timeout 150 python3 -m qwen3_accel.cli bench-kernels --out "$out" 2>&1 | quiet ;;
    Qwen3-0.6B)
        timeout 240 "${bench[@]}" --out "$out" --model Qwen3-0.6B --batch-sizes 1,8 --prompt-lengths 128,2048 \
            --decode-tokens 32 --decode-linear always 2>&1 | quiet ;;
    Qwen3-8B)
        timeout 150 "${bench[@]}" --out "$out" --model Qwen3-8B --batch-sizes 1 --prompt-lengths 128,2048 \
            --decode-tokens 32 --decode-linear always 2>&1 | quiet ;;
    quantized)
        # weight-only int8 / int4 / fp8 against bf16, each on a fresh copy of the model (issue 15's goal table)
        mkdir -p "$out/quantized"
        for model in Qwen3-8B Qwen3-0.6B; do
            timeout 200 "${bench[@]}" --out "$out/quantized" --model $model --contenders qwen3_accel \
                --weights int8,int4,fp8 --batch-sizes 1 --prompt-lengths 128 --decode-tokens 32 2>&1 | quiet
        done
        # MoE: experts quantized too, through fused_moe
        timeout 420 "${bench[@]}" --out "$out/quantized" --model Qwen3-30B-A3B --contenders qwen3_accel \
            --weights fp8,int8,int4 --batch-sizes 1 --prompt-lengths 128 --decode-tokens 16 --repeats 2 2>&1 | quiet ;;
    Qwen3-30B-A3B)
        timeout 120 "${bench[@]}" --out "$out" --model Qwen3-30B-A3B --contenders hf_eager,qwen3_accel \
            --batch-sizes 1 --prompt-lengths 128 --decode-tokens 16 --repeats 2 2>&1 | quiet ;;
    eval)
        if python3 -c "import lm_eval" 2>/dev/null; then
            timeout 240 python3 -m qwen3_accel.cli eval --model Qwen3-0.6B --batch-size 8 --out "$out" 2>&1 | quiet
        else
            echo "skipped: lm-eval is not importable (pip install 'qwen3-accel[eval]', or carry its wheels)"
        fi ;;
    kernels-in-graph)
        mkdir -p "$out/kernels_in_graph"
        timeout 150 "${bench[@]}" --out "$out/kernels_in_graph" --model Qwen3-0.6B \
            --contenders qwen3_accel --kernels torch --batch-sizes 1,8 --prompt-lengths 128 2>&1 | quiet ;;
    soak)
        timeout 570 python3 scripts/soak.py --model Qwen3-0.6B --minutes 8 2>&1 | tee "$out/soak.txt" ;;
    soak-serve)
        timeout 420 python3 scripts/soak.py --model Qwen3-0.6B --minutes 5 --serve 2>&1 | tee "$out/soak_serve.txt" ;;
    requests)
        mkdir -p "$out/requests"
        timeout 200 "${bench[@]}" --out "$out/requests" --model Qwen3-0.6B --contenders hf_eager,qwen3_accel \
            --batch-sizes 1 --prompt-lengths 128 --decode-tokens 32 --requests plain,beam4,assisted,lookup,penalty \
            2>&1 | quiet
        timeout 330 "${bench[@]}" --out "$out/requests" --model Qwen3-8B --contenders hf_eager,qwen3_accel \
            --batch-sizes 1 --prompt-lengths 128 --decode-tokens 64 --requests plain,assisted,assisted_draft,lookup \
            --request-batch-sizes 1,4 --draft-model Qwen3-0.6B 2>&1 | quiet ;;
    serve)
        mkdir -p "$out/serve"
        for model in Qwen3-0.6B Qwen3-8B; do
            timeout 270 python3 -m qwen3_accel.cli bench-serve --out "$out/serve" --model $model \
                --concurrency 1,32,64 --repeats 2 2>&1 | quiet
        done ;;
    serve-overlap)
        mkdir -p "$out/serve-overlap"
        for model in Qwen3-0.6B Qwen3-8B; do
            timeout 220 python3 -m qwen3_accel.cli bench-serve --out "$out/serve-overlap" --model $model \
                --concurrency 64 --repeats 3 \
                --contenders qwen3_accel,qwen3_accel_no_overlap,qwen3_accel_eager_chunks 2>&1 | quiet
        done ;;
    sizes)
        mkdir -p "$out/sizes"
        for model in Qwen3-1.7B Qwen3-4B Qwen3-14B Qwen3-32B; do
            timeout 140 "${bench[@]}" --out "$out/sizes" --model $model --contenders qwen3_accel --batch-sizes 1 \
                --prompt-lengths 128 --decode-tokens 32 --decode-linear always 2>&1 | quiet
        done ;;
    *) echo "unknown stage $stage" ;;
    esac
    echo "$stage $((SECONDS - stage_start)) s" | tee -a "$out/timing.txt"
done
echo "total $((SECONDS - suite_start)) s" | tee -a "$out/timing.txt"
