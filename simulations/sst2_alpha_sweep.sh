#!/usr/bin/env bash
# FedDTPT on SST-2 under label skew: 4 Dirichlet alphas x 3 seeds = 12 Flower simulations, one command,
# then the report (mean and 95% CI over seeds, gain over the reference) and the accuracy-against-alpha
# plot. Small settings so that the sweep fits in ~30-40 minutes on a busy 2-core CPU machine: 16 examples
# per class (32 in all; 8 a class cannot be split over 4 clients at alpha=0.05 for every seed) over 4
# clients, 2 rounds, 48 black-box queries per client per round (batches of <= 8 local + 4 public
# examples), 100 test examples per evaluation.
# Interrupted? Run the same command again with resume=true: finished jobs are kept, a stopped job
# continues from its last completed round, the others start.
#
#   FEDPROMPT_DATA_DIR=../shared/data simulations/sst2_alpha_sweep.sh [extra overrides, e.g. resume=true]
set -euo pipefail
SWEEP_DIR=${SWEEP_DIR:-multirun/sst2-alpha-sweep}
fedprompt run -m task=sst2 method=feddtpt partition=dirichlet \
    partition.alpha=0.05,0.1,1,100 seed=0,1,2 \
    partition.k_shot=16 federation.num_clients=4 federation.rounds=2 \
    method.search.budget=48 method.search.local_batch_size=8 method.search.public_batch_size=4 \
    federation.eval_limit=100 progress=false \
    hydra.sweep.dir="$SWEEP_DIR" "$@" || echo "the sweep did not start, or some of its jobs failed (see above)" >&2
fedprompt report "$SWEEP_DIR"
