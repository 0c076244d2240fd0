"""FedDTPT as a Flower Message-API strategy: the shared reply loop (fedprompt.fl.strategy) with FedDTPT's
checks and aggregation."""

from __future__ import annotations

from collections.abc import Callable
from logging import INFO
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.supercore import log

from fedprompt.fl.feddtpt.records import arrays_to_words, words_to_arrays
from fedprompt.fl.records import ARRAYS
from fedprompt.fl.report import RoundStats
from fedprompt.fl.strategy import FedStrategy

SERVER_CHECK = "server-check"  # the checkpoint state's record: the server check's scores per prompt


class FedDTPTStrategy(FedStrategy):
    """FedDTPT (Wu et al. 2024, arXiv 2411.00985): federated discrete prompt search.

    Each sampled ClientApp edits the global prompt word by word against the black-box LLM on its own data and
    replies with its prompt (same ``ArrayRecord`` layout) and a ``MetricRecord`` "metrics". Replies with
    undecodable bytes (not UTF-8) or more than ``max_tokens`` words are refused; the valid replies' prompts,
    ordered by their text (so the aggregator's tie-breaks do not depend on who sent what), go to
    ``FedDTPTAggregator.aggregate`` (attention filter, DBSCAN at the knee eps, one word per cluster, original
    order), whose prompt becomes the new global ``ArrayRecord``. Besides fewer than ``min_replies`` valid
    replies, a single one when several clients were sampled skips the round (one client is no consensus).

    With ``server_check`` (off in the paper): ``server_check(old, merged)`` scores both prompts (the server's
    public pool through the black box) and returns ``{"kept": bool, ...}``; a merged prompt that is not kept is
    recorded and the global prompt stays, the clients' own acceptance rule applied to the merge. A check with
    a ``scores`` cache (``fedprompt.methods.feddtpt.check.PublicCheck``) has it checkpointed (resume).
    """

    def __init__(self, aggregator, max_tokens: int | None = None,
                 server_check: Callable[[list[str], list[str]], dict[str, Any]] | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.aggregator = aggregator
        self.max_tokens = max_tokens  # longer replies are refused (method.search.max_tokens: no client may send more)
        self.server_check = server_check
        self._global: list[str] | None = None  # the prompt this round's clients started from

    def start_round(self, server_round: int, arrays: ArrayRecord) -> None:
        self._global = arrays_to_words(arrays)

    def invalid(self, msg: Message) -> str | None:
        try:
            prompt = arrays_to_words(msg.content[ARRAYS])
        except (KeyError, ValueError, UnicodeDecodeError) as err:  # UnicodeDecodeError: non-UTF-8 bytes
            return f"malformed reply: {err}"
        if self.max_tokens is not None and len(prompt) > self.max_tokens:
            return f"prompt of {len(prompt)} words > method.search.max_tokens={self.max_tokens}"
        return None

    @staticmethod
    def _prompts(valid: list[Message]) -> list[list[str]]:
        return sorted((arrays_to_words(m.content[ARRAYS]) for m in valid), key=" ".join)

    def record(self, stats: RoundStats, valid: list[Message]) -> None:
        stats.client_prompts = [" ".join(p) for p in self._prompts(valid)]

    def skip_reason(self, stats: RoundStats, valid: list[Message]) -> str | None:
        if not (reason := super().skip_reason(stats, valid)) and len(valid) == 1 and stats.sampled > 1:
            reason = f"1 valid reply of {stats.sampled} sampled: one client is no consensus"
        return reason

    def aggregate(self, server_round: int, valid: list[Message]) -> ArrayRecord:
        stats = self.rounds[server_round]
        result = self.aggregator.aggregate(self._prompts(valid))
        stats.aggregation.update({k: v for k, v in result.to_dict().items() if k not in ("weights", "labels")})
        merged = result.prompt
        if self.server_check is not None and self._global is not None and merged != self._global:
            verdict = dict(self.server_check(self._global, merged))
            stats.aggregation["server_check"] = verdict
            if not verdict["kept"]:
                log(INFO, "aggregate_train: merged prompt %r scored below the global prompt on the server's "
                    "public pool (%s); the global prompt is kept", result.text, verdict)
                merged = self._global
        log(INFO, "aggregate_train: %d prompts -> %r", len(valid), " ".join(merged))
        return words_to_arrays(merged)

    # --- resume: the server check's cached scores in the checkpoint (fedprompt.fl.checkpoint) -----------------

    def checkpoint_state(self) -> RecordDict | None:
        scores = getattr(self.server_check, "scores", None)
        if not scores:
            return None
        return RecordDict({SERVER_CHECK: ConfigRecord({"prompts": list(scores), "accuracies": list(scores.values())})})

    def restore_state(self, state: RecordDict) -> None:
        record = state[SERVER_CHECK]
        self.server_check.scores.update(zip(record["prompts"], record["accuracies"]))
