#!/usr/bin/env bash
# Stage 1 of the result protocol (docs/experiments.md) for issue 22: does our attention score
# (method.aggregate.attention_score=agreement: a word scores by how many other clients kept it or a near word)
# beat the paper's (similarity: a word's mean similarity to the other clients' words) on VALIDATION?
# Same settings as feddtpt_attention_threshold.sh (the frozen headline settings, 400 seeded validation
# examples, threshold 0.5 as chosen there), seeds 0, 1, 2 for both scores; `fedprompt report` compares
# each with the reference. The headline config changes only if agreement wins on both tasks' validation.
#
#   bash simulations/validation/feddtpt_attention_score.sh [task ...]    # default: trec sst2
set -euo pipefail
cd "$(dirname "$0")/../.."
RESULTS=${RESULTS:-simulations/results/validation}
FEDPROMPT=${FEDPROMPT:-fedprompt}
tasks=("$@")
[ ${#tasks[@]} -eq 0 ] && tasks=(trec sst2)
for task in "${tasks[@]}"; do
    out="$RESULTS/feddtpt_attention_score_$task"
    resume=()
    [ -f "$out/multirun.yaml" ] && resume=(resume=true)
    "$FEDPROMPT" run -m task="$task" method=feddtpt federation.num_clients=10 federation.rounds=2 \
        method.search.budget=300 partition=dirichlet partition.alpha=1.0 \
        federation.eval_split=validation federation.eval_limit=400 federation.eval_sample_seed=0 federation.eval_overlap=exclude \
        method.aggregate.attention_score=similarity,agreement seed=0,1,2 progress=false hydra.sweep.dir="$out" \
        "${resume[@]}" || echo "$task: some runs failed (see above)" >&2
    "$FEDPROMPT" report "$out"
done
