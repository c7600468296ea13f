#!/usr/bin/env bash
# The main job of mask discovery on real input: SmolLM2-135M-Instruct, calibration from six real text sources of the
# benchmark data folder, N = 8 clusters, 25% of the blocks skipped; then the held-out perplexity matrix.
#
#   bash benchmarks/main_job.sh            # OUT=runs/main-job by default; extra arguments go to `igp prune`
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=${IGP_DATA_DIR:-../shared/data}
OUT=${OUT:-runs/main-job}
# GSM8K train, the RedPajama C4 / StackExchange / GitHub samples, self-instruct seed tasks (instruction, input and
# output) and task-oriented dialogues (the utterances of each dialogue, one text per dialogue).
CALIBRATION="$DATA/gsm8k/train.jsonl:question+answer@64,$DATA/redpajama_sample/sample_c4-rp1.jsonl@64,\
$DATA/redpajama_sample/sample_stackexchange1.jsonl@64,$DATA/redpajama_sample/sample_github1.jsonl@48,\
$DATA/instruction/seed_tasks.jsonl:instruction+instances.input+instances.output@64,\
$DATA/dialogue/dialogues_001.json:turns.utterance@64"

# A finished run is kept, so that the matrix can be computed again on its own.
[ -f "$OUT/config.json" ] || .venv/bin/igp prune --clusters 8 --sparsity 0.25 --calibration "$CALIBRATION" \
    --heldout 32 --output "$OUT" --resume "$@"
.venv/bin/python benchmarks/main_job.py --run "$OUT"
