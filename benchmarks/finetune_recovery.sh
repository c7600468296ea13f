#!/usr/bin/env bash
# Quality recovered by fine-tuning a pruned SmolLM2-135M-Instruct: held-out perplexity per domain before and after.
#
#   bash benchmarks/finetune_recovery.sh MODEL_DIR            # LoRA (rank 16), then LoRA with distillation
#   STAGES=lora bash benchmarks/finetune_recovery.sh MODEL_DIR
#
# MODEL_DIR is a pruned model (from `igp prune` or `igp baseline`). Fine-tuning uses the calibration mix of
# benchmarks/pruning_quality.sh (seed 0), so it reads no held-out text: `igp eval` leaves out the calibration texts.
# Results: $OUT/eval/*.json (perplexity) and $OUT/NAME-*/igp_finetune.json (training record, wall time).
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${1:?usage: $0 MODEL_DIR}
DATA=${IGP_DATA_DIR:-../shared/data}
OUT=${OUT:-runs/finetune}
STEPS=${STEPS:-150}
MAX_LENGTH=${MAX_LENGTH:-256}
PPL_TOKENS=${PPL_TOKENS:-8192}
STAGES=${STAGES:-"lora kd"}
CALIBRATION="$DATA/wikitext2/valid.txt@64,$DATA/gsm8k/train.jsonl:question+answer@64,\
$DATA/redpajama_sample/sample_c4-rp1.jsonl@64,$DATA/redpajama_sample/sample_stackexchange1.jsonl@64,\
$DATA/redpajama_sample/sample_github1.jsonl@32"
IGP=".venv/bin/igp"
NAME=$(basename "$MODEL")

evaluate() {
    # $1: model folder, $2: name of the result file in $OUT/eval.
    mkdir -p "$OUT/eval/$2"
    $IGP eval --model "$1" --tasks none --ppl all --ppl-max-tokens "$PPL_TOKENS" --calibration "$CALIBRATION" \
        --data-dir "$DATA" --output-dir "$OUT/eval/$2"
}

timed() {
    local start=$(date +%s)
    "$@"
    echo "== $(date -Is) done in $(( $(date +%s) - start )) s: $*"
}

timed evaluate "$MODEL" "$NAME"
for stage in $STAGES; do
    extra=()
    [ "$stage" = kd ] && extra=(--distill 0.5)
    timed $IGP finetune --model "$MODEL" --data "$CALIBRATION" --output "$OUT/$NAME-$stage" --lora-r 16 \
        --steps "$STEPS" --batch-size 4 --max-length "$MAX_LENGTH" --learning-rate 2e-4 --warmup-steps 10 --logging-steps 10 \
        --save-steps 50 --resume --merge "${extra[@]}"
    timed evaluate "$OUT/$NAME-$stage/merged" "$NAME-$stage"
done
