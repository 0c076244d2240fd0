#!/usr/bin/env bash
# Stage 1 of the result protocol for issue 22: choose FedDTPT's attention-filter threshold
# (method.aggregate.attention_threshold; the paper gives none) on validation, seed 0, over THRESHOLDS.
#
#   bash simulations/validation/feddtpt_attention_threshold.sh [task ...]    # default: trec sst2
exec bash "$(dirname "$0")/feddtpt_validate.sh" attention_threshold \
    "method.aggregate.attention_threshold=${THRESHOLDS:-0,0.3,0.5} seed=0" "$@"
