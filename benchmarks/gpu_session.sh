#!/usr/bin/env bash
# One lent-GPU session in one call of the device tool: under 8 minutes on one H100/H200, start-up
# excluded. Run from the repository root:
#   bash benchmarks/gpu_session.sh [v2]         (v2, the only stage, is the default)
#   DRY_RUN=1 bash benchmarks/gpu_session.sh    every step on the CPU with tiny shapes, no install:
#                                               checks this script where there is no GPU
# Steps, each under `timeout` so that a slow one cannot eat the others' time:
#   1. install      pip install -e . --no-deps (GPU only), versions, nvidia-smi
#   2. tests        pytest tests/kernels -k cuda (the CUDA kernel tests)
#   3. block        bench block: LLaMA-2-7B keep 0.6, q/k/v/o/gate/up/down alone, q/k/v grouped,
#                   gate/up gated, T 1 16 32, dense vs cublas vs triton with PDL off and on
#   4. e2e-eager    bench e2e: LLaMA-2-7B shapes, keep 0.6, batch 1 and 8, eager decode in CUDA
#                   graphs, dense vs cublas vs triton; unpacked and packed (lowrank_infer.pack_model)
#   5. e2e-compiled the same, eager and torch.compile'd decode side by side (unpacked)
# Output: benchmarks/results/<gpu>/ (e.g. h200/), packed as $OUT/results.tar.gz (unpack it into
# benchmarks/results/), and $OUT/summary.md with every table and the steps' exit codes and times.
# Exit code: the number of failed steps.
# PYTHON picks the interpreter (default python3, the device image's); OUT defaults to /tmp/lowrank-out.
# The stages behind benchmarks/results/h100/ (kernels, e2e, aligned, final) are in git history, commit 50d3125.
set -uo pipefail
export PYTHONUNBUFFERED=1

STAGE=${1:-v2}
if [[ $STAGE != v2 ]]; then
  echo "unknown stage '$STAGE' (the one stage is v2)" >&2
  exit 2
fi
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/lowrank-out}
DRY_RUN=${DRY_RUN:-0}
# `lowrank-infer bench` through the interpreter: a user-level `pip install -e .` may put the
# console script in a directory that is not on PATH.
BENCH=("$PY" -m lowrank_infer.cli bench)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
FAILED=0
mkdir -p "$OUT"

if [[ $DRY_RUN == 1 ]]; then
  GPU=cpu-dry-run BLOCK_MODEL=smollm2-135m E2E_MODEL=tiny
  DEVICE=(--device cpu)
  BLOCK=(--model smollm2-135m --tokens 1 16 32 --rep-ms 5)
  # Two layers of 64 wide: torch.compile on a CPU takes seconds per model and batch.
  printf '%s\n' '{"model_type": "llama", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 160,' \
    '"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}' \
    >"$WORK/tiny-config.json"
  E2E=(--config "$WORK/tiny-config.json" --prompt-lens 16 --context 16 --decode-steps 4 --trials 2 --rep-ms 20
       --backends dense torch)
  T_INSTALL=30 T_TESTS=60 T_BLOCK=60 T_EAGER=60 T_COMPILED=120
else
  # "NVIDIA H200" -> h200, the style of benchmarks/results/h100/.
  GPU=$("$PY" -c "import torch; print(torch.cuda.get_device_name())" | tr '[:upper:]' '[:lower:]' |
        sed 's/^nvidia //; s/[^a-z0-9.]\+/-/g')
  BLOCK_MODEL=llama2-7b E2E_MODEL=llama2-7b
  DEVICE=(--device cuda)
  BLOCK=(--model llama2-7b --tokens 1 16 32 --backends dense cublas triton --pdl off on --rep-ms 25)
  E2E=(--config llama2-7b --prompt-lens 512 --context 512 --decode-steps 32 --trials 5 --rep-ms 100
       --backends dense cublas triton)
  # Seconds; together 450 of the 480, the rest for start-up checks and packing the results. The
  # compiled run is last and gets the most: each model compiles once per batch size (an estimate:
  # under a minute at 7B shapes), and like every bench it saves the rows measured before a time-out.
  T_INSTALL=45 T_TESTS=60 T_BLOCK=90 T_EAGER=60 T_COMPILED=195
fi
# On the GPU, where the results will be committed: the benches record their own command, and a
# relative path keeps it portable. The dry run leaves the checkout alone.
RES=benchmarks/results/$GPU
[[ $DRY_RUN == 1 ]] && RES=$WORK/$GPU
mkdir -p "$RES"

step() {  # NAME SECONDS COMMAND...: run under timeout, log to $RES/NAME.log, record rc and time
  local name=$1 seconds=$2 start=$SECONDS rc
  shift 2
  # -k: a process that ignores the stop signal (a hung GPU call) is killed 10 s later.
  timeout -k 10 "$seconds" "$@" >"$RES/$name.log" 2>&1
  rc=$?
  [[ $rc == 0 ]] || FAILED=$((FAILED + 1))
  printf '| %s | %s | %s | %s |\n' "$name" "$rc" "$((SECONDS - start))" "$seconds" | tee -a "$RES/steps.md"
  tail -n 3 "$RES/$name.log"
}

if [[ $DRY_RUN == 1 ]]; then
  INSTALL="echo 'dry run: no install, the environment of \$PYTHON'"
else
  INSTALL="nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv &&
    $PY -m pip install -q --no-build-isolation --no-deps -e ."
fi
VERSIONS="import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
  'transformers', transformers.__version__)"
WORKERS=()
"$PY" -c "import xdist" 2>/dev/null && WORKERS=(-n 8)
E2E+=(--keep 0.6 --multiple-of 16 --batches 1 8)

printf '| step | rc | seconds | limit |\n|---|---|---|---|\n' >"$RES/steps.md"
step install "$T_INSTALL" bash -c "$INSTALL && $PY -c \"$VERSIONS\""
step tests "$T_TESTS" "$PY" -m pytest tests/kernels -q -k cuda -p no:cacheprovider "${WORKERS[@]}"
step block "$T_BLOCK" "${BENCH[@]}" block "${DEVICE[@]}" "${BLOCK[@]}" --keep 0.6 --multiple-of 16 \
  --json "$RES/block-$BLOCK_MODEL.json" --markdown "$RES/block-$BLOCK_MODEL.md"
# A separate eager run: its rows (and the packed model's) come back whatever the compiled run does.
step e2e-eager "$T_EAGER" "${BENCH[@]}" e2e --shape-only "${DEVICE[@]}" "${E2E[@]}" --modes eager \
  --packing unpacked packed --json "$RES/e2e-$E2E_MODEL-eager.json" --markdown "$RES/e2e-$E2E_MODEL-eager.md"
step e2e-compiled "$T_COMPILED" "${BENCH[@]}" e2e --shape-only "${DEVICE[@]}" "${E2E[@]}" --modes eager compiled \
  --json "$RES/e2e-$E2E_MODEL-compiled.json" --markdown "$RES/e2e-$E2E_MODEL-compiled.md"

# A bench stopped by its time limit has left the markdown and JSON of the rows it measured.
{
  echo "# gpu_session.sh v2 on $GPU"; echo
  cat "$RES/steps.md"; echo
  echo "Kernel tests: $(tail -n 1 "$RES/tests.log")"; echo
  for md in "$RES"/block-*.md "$RES"/e2e-*.md; do [[ -f $md ]] && { cat "$md"; echo; }; done
} >"$OUT/summary.md"
tar -czf "$OUT/results.tar.gz" -C "$(dirname "$RES")" "$GPU"
echo "results: $OUT/results.tar.gz ($GPU/), $OUT/summary.md; failed steps: $FAILED"
exit "$FAILED"
