#!/usr/bin/env bash
# The lent-GPU session that produced benchmarks/results/h100/, in calls of the device tool
# (each command may run 10 minutes):
#   bash benchmarks/gpu_session.sh kernels   CUDA kernel tests, tuning, LLaMA kernel tables
#   bash benchmarks/gpu_session.sh e2e       end-to-end runs, the other kernel tables
#   bash benchmarks/gpu_session.sh aligned   ranks rounded to multiples of 16 / 64 (h100/aligned/)
#   bash benchmarks/gpu_session.sh final     not yet run: kernel tests of the current code, T = 32-512
#                                            on the Triton path, and SmolLM2-135M at the ranks of the
#                                            committed plans (uniform, D-Rank, ARA)
# Outputs go to $OUT/res and $OUT/results.tar.gz. For `e2e`, put the tuned table that
# `kernels` wrote into kernels/configs/ first. The committed files use the benches' older
# backend names (benchmarks/README.md, "Backends").
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/lowrank-out}
RES=$OUT/res
mkdir -p "$RES"
# `lowrank-infer bench` through the interpreter: a user-level `pip install -e .` may put the
# console script in a directory that is not on PATH.
BENCH="python3 -m lowrank_infer.cli bench"

setup() {
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | grep -v WARN | tail -3
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
}

pack() { tar -czf "$OUT/results.tar.gz" -C "$RES" . && ls -la "$RES"; }

kernels_table() {  # NAME SECONDS MODELS...: issue 5's grid (T 1..8192, keep 0.4/0.6/0.8)
  local name=$1 seconds=$2; shift 2
  timeout "$seconds" $BENCH kernels --models "$@" --backends dense cublas triton triton_fp32 \
    --json "$RES/kernels-$name.json" --markdown "$RES/kernels-$name.md" 2>"$RES/kernels-$name.log"
  echo "kernels $name rc=$?"; tail -n 2 "$RES/kernels-$name.log"
}

e2e() {  # CONFIG SECONDS KEEPS...
  local cfg=$1 seconds=$2; shift 2
  timeout "$seconds" $BENCH e2e --shape-only --config "$cfg" --keep "$@" --backends dense triton cublas \
    --json "$RES/e2e-$cfg.json" --markdown "$RES/e2e-$cfg.md" 2>"$RES/e2e-$cfg.log"
  echo "e2e $cfg rc=$?"; tail -n 3 "$RES/e2e-$cfg.log"
}

case "${1:?stage}" in
  kernels)
    setup
    timeout 150 python3 -m pytest tests/kernels -q -x -k cuda -n 8 -p no:cacheprovider 2>&1 | tee "$RES/tests-kernels-cuda.log" | tail -n 4
    # LLaMA-2-7B (q/k/v/o, gate/up, down) and LLaMA-3-8B k/v at keep 0.6, then SmolLM2.
    timeout 220 python3 benchmarks/tune_kernels.py --dtype bfloat16 --tokens 1 16 2048 \
      --shapes 4096,4096,1228 11008,4096,1790 4096,11008,1790 1024,4096,491 576,576,172 1536,576,251 \
      2>&1 | tee "$RES/tune.log" | grep -v "^    skip" | tail -n 22
    cp kernels/configs/*.json "$RES/"
    kernels_table llama2-7b 100 llama2-7b
    kernels_table llama3-8b 100 llama3-8b
    pack ;;
  e2e)
    setup
    e2e llama2-7b 170 0.4 0.6 0.8
    e2e llama3-8b 170 0.4 0.6 0.8
    e2e smollm2-135m 60 0.6 0.8
    kernels_table qwen2.5-7b 60 qwen2.5-7b
    kernels_table smollm2-135m 50 smollm2-135m
    pack ;;
  aligned)
    setup
    for q in 16 64; do
      timeout 40 $BENCH kernels --models llama2-7b --layers q gate --keep 0.6 --multiple-of $q \
        --tokens 1 16 32 64 2048 --backends dense cublas triton triton_fp32 --rep-ms 50 \
        --json "$RES/kernels-aligned$q.json" --markdown "$RES/kernels-aligned$q.md" 2>/dev/null
    done
    timeout 110 $BENCH e2e --shape-only --config llama2-7b --keep 0.6 --multiple-of 16 --backends dense triton cublas \
      --json "$RES/e2e-aligned16.json" --markdown "$RES/e2e-aligned16.md" 2>"$RES/e2e-aligned16.log"
    pack ;;
  final)
    setup
    timeout 150 python3 -m pytest tests/kernels -q -k cuda -n 8 -p no:cacheprovider 2>&1 | tee "$RES/tests-kernels-cuda.log" | tail -n 4
    timeout 150 $BENCH kernels --models llama2-7b --layers q gate --keep 0.6 --multiple-of 16 \
      --tokens 1 16 32 33 48 64 128 256 512 2048 --backends dense cublas triton triton_fp32 --rep-ms 50 \
      --json "$RES/kernels-aligned16-midT.json" --markdown "$RES/kernels-aligned16-midT.md" 2>/dev/null
    # The SmolLM2-135M checkpoint (98 MB as GGUF) is larger than the device tool carries; its
    # speed depends on its ranks, not on the values of its factors, so the committed plans run
    # with random factors.
    timeout 200 $BENCH e2e --shape-only --config smollm2-135m --backends dense cublas triton triton_fp32 \
      --plan benchmarks/results/plans/smollm2-135m_{uniform,drank,ara}_keep{0.8,0.6}.json \
      --json "$RES/e2e-smollm2-135m-plans.json" --markdown "$RES/e2e-smollm2-135m-plans.md" 2>"$RES/e2e-smollm2-135m-plans.log"
    pack ;;
esac
