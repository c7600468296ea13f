#!/usr/bin/env bash
# Static depth-pruning baselines against IG-Pruning on SmolLM2-135M-Instruct: build, evaluate, compare.
#
#   bash benchmarks/pruning_quality.sh baselines   # dense, ShortGPT, block Block Influence, random (3 seeds)
#   bash benchmarks/pruning_quality.sh learned     # static L0 (one cluster) and IG-Pruning with N = 4 and 8
#   bash benchmarks/pruning_quality.sh refine      # igp refine of static L0 and N = 8 ("r"), and the current recipe
#                                                  # for static L0 ("x") and N = 4, 8 and 16 ("lx")
#   bash benchmarks/pruning_quality.sh task        # every method again, calibrated also on task-format text
#   bash benchmarks/pruning_quality.sh eval        # perplexity and zero-shot accuracy of every built model
#   bash benchmarks/pruning_quality.sh eval-second # zero-shot accuracy on a second, disjoint sample of documents
#   bash benchmarks/pruning_quality.sh speed       # speed and memory of every built model, in one run
#   bash benchmarks/pruning_quality.sh compare     # table, JSON, Markdown and plots (PAIRED=DIR: paired differences)
#
# Sparsities 0.125 and 0.25 are rounded to whole layers so that ShortGPT can match them: every method skips 8 or
# 16 of the 60 blocks (13.3% or 26.7%). All methods calibrate on the same texts (CALIBRATION, seed 0).
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=${IGP_DATA_DIR:-../shared/data}
OUT=${OUT:-runs/bench}
LIMIT=${LIMIT:-50}
PPL_TOKENS=${PPL_TOKENS:-8192}
CALIBRATION="$DATA/wikitext2/valid.txt@64,$DATA/gsm8k/train.jsonl:question+answer@64,\
$DATA/redpajama_sample/sample_c4-rp1.jsonl@64,$DATA/redpajama_sample/sample_stackexchange1.jsonl@64,\
$DATA/redpajama_sample/sample_github1.jsonl@32"
IGP=".venv/bin/igp"

build_baselines() {
    [ -f "$OUT/dense/config.json" ] || $IGP baseline --method dense --output "$OUT/dense"
    for sparsity in 0.125 0.25; do
        for method in shortgpt block-bi; do
            [ -f "$OUT/$method-$sparsity/config.json" ] || \
                $IGP baseline --method "$method" --sparsity "$sparsity" --calibration "$CALIBRATION" \
                    --output "$OUT/$method-$sparsity"
        done
        for seed in 0 1 2; do
            [ -f "$OUT/random-$sparsity-seed$seed/config.json" ] || \
                $IGP baseline --method random --sparsity "$sparsity" --seed "$seed" --output "$OUT/random-$sparsity-seed$seed"
        done
    done
}

build_learned() {
    # 8/60 and 16/60 of the blocks: the same block counts as the baselines. The larger sparsity and the larger N go
    # first, so that a run cut short has the rows the claim rests on.
    for sparsity in ${SPARSITIES:-0.25 0.125}; do
        blocks=$([ "$sparsity" = 0.125 ] && echo 0.13333334 || echo 0.26666667)
        [ -f "$OUT/static-l0-$sparsity/config.json" ] || \
            $IGP baseline --method static-l0 --sparsity "$sparsity" --calibration "$CALIBRATION" \
                --output "$OUT/static-l0-$sparsity"
        for clusters in ${CLUSTERS:-8 4}; do
            [ -f "$OUT/igp-n$clusters-$sparsity/config.json" ] || \
                $IGP prune --clusters "$clusters" --sparsity "$blocks" --calibration "$CALIBRATION" \
                    --output "$OUT/igp-n$clusters-$sparsity" --resume
        done
    done
}

refine_learned() {
    # The static mask is scored on 64 texts and each of the 8 IG-Pruning clusters on 16 of its own, so a static
    # candidate is scored on more texts, while the clusters together use 128.
    for sparsity in ${SPARSITIES:-0.25 0.125}; do
        [ -f "$OUT/static-l0r-$sparsity/config.json" ] || \
            $IGP refine "$OUT/static-l0-$sparsity" --output "$OUT/static-l0r-$sparsity" --examples 64
        [ -f "$OUT/igp-n8r-$sparsity/config.json" ] || \
            $IGP refine "$OUT/igp-n8-$sparsity" --output "$OUT/igp-n8r-$sparsity" --examples 16
        # The current recipe in one run: mask learning, a global search on 64 texts, per-cluster searches and the
        # exchange of refined masks. Static L0 gets the same refinement ("x").
        blocks=$([ "$sparsity" = 0.125 ] && echo 0.13333334 || echo 0.26666667)
        [ -f "$OUT/static-l0x-$sparsity/config.json" ] || \
            $IGP baseline --method static-l0 --sparsity "$sparsity" --calibration "$CALIBRATION" \
                --refine-examples 64 --output "$OUT/static-l0x-$sparsity"
        for clusters in ${RECIPE_CLUSTERS:-8 4 16}; do
            [ -f "$OUT/igp-n${clusters}lx-$sparsity/config.json" ] || \
                $IGP prune --clusters "$clusters" --sparsity "$blocks" --calibration "$CALIBRATION" --refine \
                    --refine-global-examples 64 --output "$OUT/igp-n${clusters}lx-$sparsity"
        done
    done
}

build_task_calibrated() {
    # The same methods with task-format texts added to the calibration: solved examples of the 8 zero-shot tasks
    # from documents that no `igp eval --limit 50` or `--limit 200` subset scores (benchmarks/task_calibration.py).
    # Static L0 is refined on 64 texts here, as the N = 8 recipe refines its masks.
    [ -f "$OUT/task_calibration.jsonl" ] || \
        .venv/bin/python benchmarks/task_calibration.py --data-dir "$DATA" --output "$OUT/task_calibration.jsonl"
    local calibration="$CALIBRATION,$OUT/task_calibration.jsonl:text"
    for sparsity in ${SPARSITIES:-0.25 0.125}; do
        blocks=$([ "$sparsity" = 0.125 ] && echo 0.13333334 || echo 0.26666667)
        for method in shortgpt block-bi; do
            [ -f "$OUT/$method-task-$sparsity/config.json" ] || \
                $IGP baseline --method "$method" --sparsity "$sparsity" --calibration "$calibration" \
                    --output "$OUT/$method-task-$sparsity"
        done
        [ -f "$OUT/static-l0x-task-$sparsity/config.json" ] || \
            $IGP baseline --method static-l0 --sparsity "$sparsity" --calibration "$calibration" \
                --refine-examples 64 --output "$OUT/static-l0x-task-$sparsity"
        [ -f "$OUT/igp-n8lx-task-$sparsity/config.json" ] || \
            $IGP prune --clusters 8 --sparsity "$blocks" --calibration "$calibration" --refine \
                --refine-global-examples 64 --output "$OUT/igp-n8lx-task-$sparsity"
    done
}

models() {
    for folder in "$OUT"/*/; do
        [ -f "$folder/config.json" ] && echo "${folder%/}"
    done
}

case "${1:-}" in
    baselines) build_baselines ;;
    learned) build_learned ;;
    refine) refine_learned ;;
    task) build_task_calibrated ;;
    eval)
        $IGP eval --model $(models) --tasks all --limit "$LIMIT" --log-samples --ppl all --ppl-max-tokens "$PPL_TOKENS" \
            --calibration "$CALIBRATION" --data-dir "$DATA" --output-dir "$OUT/eval" ;;
    eval-second)
        # A second zero-shot sample of LIMIT documents a task, sharing none with the seeded subsets of EXCLUDE.
        $IGP eval --model $(models) --tasks all --limit "$LIMIT" --exclude-limits "${EXCLUDE:-50,200}" --log-samples \
            --ppl none --data-dir "$DATA" --output-dir "$OUT/eval-second" ;;
    speed)
        # The plain transformers SmolLM2 runs too, to show what the block loop costs when nothing is skipped.
        plain=$(.venv/bin/python -c "from igp_training.assets import default_model_path; print(default_model_path())")
        $IGP eval --model $(models) "$plain" --tasks none --ppl none --speed --data-dir "$DATA" \
            --output-dir "$OUT/eval" ;;
    compare)
        # With PAIRED=DIR (for example a static L0 folder), the comparison adds each model's paired difference from it.
        # With POOLED=1, the zero-shot results of eval-second are pooled with those of eval.
        $IGP compare $(models) --eval-dir "$OUT/eval" ${POOLED:+--eval-dir "$OUT/eval-second"} \
            --output-dir "$OUT/compare" ${PAIRED:+--paired "$PAIRED"} ;;
    *) echo "usage: $0 baselines|learned|refine|task|eval|eval-second|speed|compare" >&2; exit 2 ;;
esac
