"""BDPL's strategy: K clients per round sampled with a seeded generator, FedAvg of their logits.

FedOne (Wang et al. 2025) activates ONE client per round, uniformly at random: the server's policy
becomes that client's locally updated logits. With K > 1 activated clients ("federated BDPL") the new
logits are FedAvg's example-weighted mean of theirs (McMahan et al. 2017; the average is taken on the
logits, the parameters the clients optimise).
"""

from __future__ import annotations

from collections.abc import Sequence

from flwr.app import ArrayRecord, Message
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fedprompt.fl.bdpl.records import LOGITS, arrays_to_logits
from fedprompt.fl.records import ARRAYS
from fedprompt.fl.report import RoundStats
from fedprompt.fl.strategy import FedStrategy


class BDPLFedAvg(FedStrategy):
    """FedAvg over the ``"logits"`` array, weighted by ``"num-examples"``, activating ``clients_per_round``
    partitions a round (the shared seeded draw; ``fraction_train`` and ``min_train_clients`` do not apply).
    Replies without logits of the global shape or without a positive example count are refused. ``vocab``
    (optional) lets the round record show each client's argmax prompt.
    """

    kept = "global logits"

    def __init__(self, clients_per_round: int = 1, vocab: Sequence[str] | None = None, **kwargs) -> None:
        super().__init__(min_train_nodes=clients_per_round, **kwargs)
        self.clients_per_round = int(clients_per_round)
        self.vocab = list(vocab) if vocab is not None else None
        self._shape: tuple[int, ...] | None = None

    def sample_size(self, available: int) -> int:
        return min(available, self.clients_per_round)

    def start_round(self, server_round: int, arrays: ArrayRecord) -> None:
        self._shape = tuple(arrays[LOGITS].shape)

    def invalid(self, msg: Message) -> str | None:
        if reason := self.weighted_layout(msg):
            return reason
        try:
            arrays_to_logits(msg.content[ARRAYS], self._shape)
        except ValueError as err:
            return f"malformed reply: {err}"
        return None

    def record(self, stats: RoundStats, valid: list[Message]) -> None:
        if self.vocab is not None:
            stats.client_prompts = [" ".join(self.vocab[int(i)] for i in arrays_to_logits(m.content[ARRAYS]).argmax(axis=1))
                                    for m in valid]

    def aggregate(self, server_round: int, valid: list[Message]) -> ArrayRecord:
        return aggregate_arrayrecords([m.content for m in valid], self.weighted_by_key)
