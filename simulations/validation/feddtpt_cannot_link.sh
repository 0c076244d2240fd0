#!/usr/bin/env bash
# Stage 1 of the result protocol (docs/experiments.md) for issue 22: does method.aggregate.cannot_link=true (ours:
# DBSCAN's clusters split so that no two words one client prompt holds together are merged) beat the paper's
# clusters on VALIDATION? Same settings and seeds as feddtpt_attention_score.sh (whose similarity rows are the
# paper's server with cannot_link=false: the paired comparison), the paper's attention score.
#
#   bash simulations/validation/feddtpt_cannot_link.sh [task ...]    # default: trec sst2
set -euo pipefail
cd "$(dirname "$0")/../.."
RESULTS=${RESULTS:-simulations/results/validation}
FEDPROMPT=${FEDPROMPT:-fedprompt}
tasks=("$@")
[ ${#tasks[@]} -eq 0 ] && tasks=(trec sst2)
for task in "${tasks[@]}"; do
    out="$RESULTS/feddtpt_cannot_link_$task"
    resume=()
    [ -f "$out/multirun.yaml" ] && resume=(resume=true)
    "$FEDPROMPT" run -m task="$task" method=feddtpt federation.num_clients=10 federation.rounds=2 \
        method.search.budget=300 partition=dirichlet partition.alpha=1.0 \
        federation.eval_split=validation federation.eval_limit=400 federation.eval_sample_seed=0 federation.eval_overlap=exclude \
        method.aggregate.attention_score=similarity method.aggregate.cannot_link=true seed=0,1,2 progress=false \
        hydra.sweep.dir="$out" "${resume[@]}" || echo "$task: some runs failed (see above)" >&2
    "$FEDPROMPT" report "$out"
done
