#!/usr/bin/env bash
# The comparison of every method (issue 7) on SST-2, TREC and AG News: tables and plots under
# simulations/results/baselines_<task>/ (table.md, table.json, plot.png). Finished runs are not rerun.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
status=0
for task in sst2 trec agnews; do
    "$PY" simulations/run.py "simulations/baselines_$task.yaml" "$@" || status=1
done
exit $status
