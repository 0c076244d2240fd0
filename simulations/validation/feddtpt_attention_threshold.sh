#!/usr/bin/env bash
# Stage 1 of the result protocol (docs/experiments.md) for issue 22: choose FedDTPT's attention-filter
# threshold (method.aggregate.attention_threshold; the paper gives none) on VALIDATION, never on test.
# The frozen headline settings (simulations/headline/feddtpt_<task>.yaml) with the split swapped for 400
# seeded validation examples (the other validation rows stay free for the public pool), seed 0, one sweep
# per task over the candidate thresholds; `fedprompt report` then compares each with the reference.
#
#   bash simulations/validation/feddtpt_attention_threshold.sh [task ...]    # default: trec sst2
set -euo pipefail
cd "$(dirname "$0")/../.."
RESULTS=${RESULTS:-simulations/results/validation}
FEDPROMPT=${FEDPROMPT:-fedprompt}
THRESHOLDS=${THRESHOLDS:-0,0.3,0.5}
tasks=("$@")
[ ${#tasks[@]} -eq 0 ] && tasks=(trec sst2)
for task in "${tasks[@]}"; do
    out="$RESULTS/feddtpt_attention_threshold_$task"
    resume=()
    [ -f "$out/multirun.yaml" ] && resume=(resume=true)
    "$FEDPROMPT" run -m task="$task" method=feddtpt federation.num_clients=10 federation.rounds=2 \
        method.search.budget=300 partition=dirichlet partition.alpha=1.0 \
        federation.eval_split=validation federation.eval_limit=400 federation.eval_sample_seed=0 federation.eval_overlap=exclude \
        method.aggregate.attention_threshold="$THRESHOLDS" seed=0 progress=false hydra.sweep.dir="$out" \
        "${resume[@]}" || echo "$task: some runs failed (see above)" >&2
    "$FEDPROMPT" report "$out"
done
