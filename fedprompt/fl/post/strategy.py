"""FedAvg of soft prompts (McMahan et al. 2017) over the ``"prompt"`` array, weighted by each client's number of
examples (public, DP or not: docs/privacy.md); the reply loop and the round record are the shared strategy's."""

from __future__ import annotations

from flwr.app import ArrayRecord, Message
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fedprompt.fl.post.records import PROMPT
from fedprompt.fl.records import ARRAYS, arrays_to_prompt
from fedprompt.fl.strategy import FedStrategy


class PromptFedAvg(FedStrategy):
    """Replies without a prompt of the global prompt's shape or without a positive example count are refused.
    ``aggregation["clients"]`` lists every client's metrics (epsilon included) in partition order; the combined
    metrics hold the largest epsilon and delta (the run's guarantee)."""

    _shape: tuple[int, ...] | None = None

    def start_round(self, server_round: int, arrays: ArrayRecord) -> None:
        self._shape = tuple(arrays[PROMPT].shape)

    def invalid(self, msg: Message) -> str | None:
        if reason := self.weighted_layout(msg):
            return reason
        try:
            arrays_to_prompt(msg.content[ARRAYS], {PROMPT: self._shape or (None, None)})
        except ValueError as err:
            return f"malformed reply: {err}"
        return None

    def aggregate(self, server_round: int, valid: list[Message]) -> ArrayRecord:
        return aggregate_arrayrecords([m.content for m in valid], self.weighted_by_key)
