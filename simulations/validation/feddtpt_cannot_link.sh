#!/usr/bin/env bash
# Stage 1 of the result protocol for issue 22: does method.aggregate.cannot_link=true (ours: DBSCAN's clusters split
# so that no two words one client prompt holds together merge) beat the paper's clusters on validation? Same
# settings and seeds as feddtpt_attention_score.sh, whose similarity rows are the paper's server with
# cannot_link=false: the paired comparison.
#
#   bash simulations/validation/feddtpt_cannot_link.sh [task ...]    # default: trec sst2
exec bash "$(dirname "$0")/feddtpt_validate.sh" cannot_link \
    "method.aggregate.attention_score=similarity method.aggregate.cannot_link=true seed=0,1,2" "$@"
