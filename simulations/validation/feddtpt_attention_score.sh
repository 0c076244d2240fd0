#!/usr/bin/env bash
# Stage 1 of the result protocol for issue 22: does our attention score (method.aggregate.attention_score=agreement:
# a word scores by how many other clients kept it or a near word) beat the paper's (similarity: a word's mean
# similarity to the other clients' words) on validation? Threshold 0.5 (chosen by feddtpt_attention_threshold.sh),
# seeds 0, 1, 2 for both scores. The headline config changes only if agreement wins on both tasks' validation.
#
#   bash simulations/validation/feddtpt_attention_score.sh [task ...]    # default: trec sst2
exec bash "$(dirname "$0")/feddtpt_validate.sh" attention_score \
    "method.aggregate.attention_score=similarity,agreement seed=0,1,2" "$@"
