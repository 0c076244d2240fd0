#!/usr/bin/env bash
# The headline results (docs/experiments.md, "The result protocol"): each frozen config of this folder, run on
# test with seeds 0, 1 and 2 into simulations/results/headline/<name>/<job>/ (Hydra's job folders), then `fedprompt report` there
# (report/report.md, report.json: mean and 95% CI over seeds, gain over the reference with its paired CI).
#
#   bash simulations/headline/run.sh                 # every config here
#   bash simulations/headline/run.sh feddtpt_sst2    # some of them
#   SEEDS=0,1,2 RESULTS=simulations/results/headline EXTRA="model.dtype=float32" bash simulations/headline/run.sh
#
# Interrupted? Run the same command again: finished seeds are kept, a stopped one resumes from its last round.
set -euo pipefail
cd "$(dirname "$0")/../.."
HERE=simulations/headline
RESULTS=${RESULTS:-simulations/results/headline}
SEEDS=${SEEDS:-0,1,2}
FEDPROMPT=${FEDPROMPT:-fedprompt}
names=("$@")
if [ ${#names[@]} -eq 0 ]; then
    names=()
    for f in "$HERE"/*.yaml; do names+=("$(basename "$f" .yaml)"); done
fi
for name in "${names[@]}"; do
    config="$HERE/$name.yaml"
    [ -f "$config" ] || { echo "no frozen config $config (have: $(ls "$HERE"/*.yaml | xargs -n1 basename | tr '\n' ' '))" >&2; exit 2; }
    mapfile -t overrides < <(sed -nE 's/^[[:space:]]*-[[:space:]]+//p' "$config")  # the "  - key=value" lines
    out="$RESULTS/$name"
    resume=()
    [ -f "$out/multirun.yaml" ] && resume=(resume=true)
    # shellcheck disable=SC2086  # EXTRA is a list of overrides
    "$FEDPROMPT" run -m "${overrides[@]}" seed="$SEEDS" progress=false hydra.sweep.dir="$out" \
        "${resume[@]}" ${EXTRA:-} || echo "$name: some runs failed (see above)" >&2
    "$FEDPROMPT" report "$out"
done
