#!/usr/bin/env bash
# The one loop of FedDTPT's stage-1 sweeps (docs/experiments.md: choose on VALIDATION, never on test): the frozen
# headline settings (simulations/headline/feddtpt_<task>.yaml) with the split swapped for 400 seeded validation
# examples (the other validation rows stay free for the public pool), one Hydra sweep per task over the given
# overrides, resumed if its folder exists, then `fedprompt report` (each row against the reference).
#
#   bash simulations/validation/feddtpt_validate.sh NAME "OVERRIDES" [task ...]    # default tasks: trec sst2
#   -> simulations/results/validation/feddtpt_NAME_<task>/
set -euo pipefail
cd "$(dirname "$0")/../.."
RESULTS=${RESULTS:-simulations/results/validation}
FEDPROMPT=${FEDPROMPT:-fedprompt}
name=$1
read -r -a sweep <<< "$2"
shift 2
tasks=("$@")
[ ${#tasks[@]} -eq 0 ] && tasks=(trec sst2)
for task in "${tasks[@]}"; do
    out="$RESULTS/feddtpt_${name}_$task"
    resume=()
    [ -f "$out/multirun.yaml" ] && resume=(resume=true)
    "$FEDPROMPT" run -m task="$task" method=feddtpt federation.num_clients=10 federation.rounds=2 \
        method.search.budget=300 partition=dirichlet partition.alpha=1.0 \
        federation.eval_split=validation federation.eval_limit=400 federation.eval_sample_seed=0 federation.eval_overlap=exclude \
        "${sweep[@]}" progress=false hydra.sweep.dir="$out" "${resume[@]}" || echo "$task: some runs failed (see above)" >&2
    "$FEDPROMPT" report "$out"
done
