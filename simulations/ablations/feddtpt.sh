#!/usr/bin/env bash
# FedDTPT's ablation table (issue 22, docs/feddtpt.md "Ablations"): a frozen headline config (CONFIG, default
# simulations/headline/feddtpt_<task>.yaml, the paper's server: same clients, split, budget, seeds 0,1,2, test
# split) with ONE change per row, each row into simulations/results/ablations/<CONFIG>_<row>/ with its report.
# Row `frozen` is the config unchanged, rerun beside the others so that every row comes from one machine.
#
#   bash simulations/ablations/feddtpt.sh trec                  # every row
#   bash simulations/ablations/feddtpt.sh trec kmeans fedavg    # some rows
#   CONFIG=feddtpt_trec_agreement bash simulations/ablations/feddtpt.sh trec alpha_0.1 iid   # the partitions
#
# A row that sets a key the config sets replaces it (a row's `partition=iid` drops the config's partition keys).
#
# Interrupted? Run the same command again: finished seeds are kept, a stopped one resumes.
set -euo pipefail
cd "$(dirname "$0")/../.."
RESULTS=${RESULTS:-simulations/results/ablations}
SEEDS=${SEEDS:-0,1,2}
FEDPROMPT=${FEDPROMPT:-fedprompt}
declare -A ROWS=(
    [frozen]=""                                                          # the config unchanged (default CONFIG: the paper's server)
    [no_filter]="method.aggregate.attention_threshold=0"                 # the attention filter off
    [filter_0.5]="method.aggregate.attention_threshold=0.5"              # the filter at 0.5
    [agreement]="method.aggregate.attention_score=agreement"             # ours: the filter scores agreement, not similarity
    [fixed_eps]="method.aggregate.eps=0.15"                              # eps fixed at the old floor, no elbow
    [vote]="method.aggregate.eps=0.000001"                               # identical words only: a per-word vote of >= min_samples clients
    [kmeans]="method.aggregate.mode=kmeans"                              # k-means, k = median prompt length
    [fedavg]="method.aggregate.mode=fedavg"                              # FedAvg of word embeddings per position
    [no_clustering]="method.aggregate.mode=no-clustering"                # the top-L words by attention weight
    [alpha_0.1]="partition.alpha=0.1"                                    # Dirichlet 0.1 instead of 1.0
    [iid]="partition=iid"                                                # an IID split of the same examples
    [no_span]="method.search.edit_ops.replace=0.7 method.search.edit_ops.insert=0.15 method.search.edit_ops.delete=0.15 method.search.edit_ops.delete_span=0 method.search.min_tokens=3"  # the search before issue 22
)
task=${1:?usage: feddtpt.sh TASK [ROW ...]; rows: ${!ROWS[*]}}
shift
rows=("$@")
[ ${#rows[@]} -eq 0 ] && rows=(frozen no_filter fixed_eps vote kmeans fedavg agreement)
CONFIG=${CONFIG:-feddtpt_$task}
config=simulations/headline/$CONFIG.yaml
[ -f "$config" ] || { echo "no frozen config $config" >&2; exit 2; }
mapfile -t frozen < <(sed -nE 's/^[[:space:]]*-[[:space:]]+//p' "$config")
for row in "${rows[@]}"; do
    [ -n "${ROWS[$row]+x}" ] || { echo "unknown row $row; rows: ${!ROWS[*]}" >&2; exit 2; }
    overrides=()
    for o in "${frozen[@]}"; do  # keep the config's overrides that the row does not set
        key=${o%%=*} drop=
        for r in ${ROWS[$row]}; do
            rkey=${r%%=*}
            [ "$key" = "$rkey" ] || [[ "$key" == "$rkey".* ]] && drop=1
        done
        [ -z "$drop" ] && overrides+=("$o")
    done
    out="$RESULTS/${CONFIG}_$row"
    resume=()
    [ -f "$out/multirun.yaml" ] && resume=(resume=true)
    # shellcheck disable=SC2086  # a row is a list of overrides
    "$FEDPROMPT" run -m "${overrides[@]}" ${ROWS[$row]} seed="$SEEDS" progress=false hydra.sweep.dir="$out" \
        "${resume[@]}" || echo "$task/$row: some runs failed (see above)" >&2
    "$FEDPROMPT" report "$out"
done
