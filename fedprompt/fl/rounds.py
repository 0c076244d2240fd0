"""The round template every method's server runs: one driver for sampling, sending, aggregating, evaluating
and checkpointing, so that every ``federation.*`` key means the same in every method.

A method's adapter (``fedprompt/fl/<method>.py``) supplies only what differs, as a :class:`MethodServer`: its
strategy (a :class:`fedprompt.fl.strategy.FedStrategy` subclass: reply checks and aggregation), its initial
arrays, its central evaluation (``score``), its untuned predictions (the references) and its final files.
:func:`serve` does the rest: the run folder, the task, the evaluation split, the run report, the references,
the rounds (:class:`RoundDriver`) and the summary. Each round r = 1..``federation.rounds``:

1. **sample and send** (the strategy's ``configure_train``): wait until ``federation.min_available_clients``
   SuperNodes (null: ``num_clients``) are connected, sample ``max(ceil(fraction_train x N),
   min_train_clients)`` of them and send them the global arrays; Flower's Grid waits up to
   ``federation.round_timeout_s`` for the replies;
2. **aggregate** (the strategy's ``aggregate_train``): error and malformed replies are recorded as failures
   and left out; fewer than ``federation.min_replies`` valid replies and the round is recorded as skipped
   (``RoundStats.skipped``, the row's ``skipped``) and the global arrays are kept;
3. **evaluate** (``score``): rounds 0, every ``federation.eval_every``-th and the last are scored
   (``due``); the others get a row with ``accuracy: null`` and no evaluation cost;
4. **checkpoint**: ``checkpoint.json`` after every round, round 0 included
   (:class:`fedprompt.fl.checkpoint.CheckpointedRounds`), so ``fedprompt resume`` continues any method from its
   last completed round.

The driver refuses (ValueError) a strategy whose ``min_replies`` or ``min_available_nodes`` is not the
config's: a method that forgot to pass one on fails at once instead of silently ignoring the key.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from logging import INFO
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.supercore import log

if TYPE_CHECKING:
    from fedprompt.blackbox.base import Usage
    from fedprompt.runs.report import RunReport


@dataclass(frozen=True)
class Federation:
    """The ``federation.*`` keys the round template honours, resolved (``min_available_clients`` null ->
    ``num_clients``)."""

    num_clients: int
    rounds: int
    eval_every: int
    fraction_train: float
    min_train_clients: int
    min_replies: int
    min_available_clients: int
    round_timeout_s: float

    @classmethod
    def from_cfg(cls, cfg) -> Federation:
        fed = cfg.federation
        return cls(num_clients=int(fed.num_clients), rounds=int(fed.rounds), eval_every=int(fed.get("eval_every", 1)),
                   fraction_train=float(fed.get("fraction_train", 1.0)),
                   min_train_clients=int(fed.get("min_train_clients", 1)), min_replies=int(fed.get("min_replies", 1)),
                   min_available_clients=int(fed.get("min_available_clients") or fed.num_clients),
                   round_timeout_s=float(fed.get("round_timeout_s", 3600)))

    def due(self, server_round: int) -> bool:
        """Whether round ``server_round`` is scored: round 0, every ``eval_every``-th round and the last."""
        return server_round % self.eval_every == 0 or server_round == self.rounds

    def fedavg_kwargs(self) -> dict:
        """The sampling and reply keys as :class:`fedprompt.fl.strategy.FedStrategy` takes them."""
        return {"fraction_train": self.fraction_train, "min_train_nodes": self.min_train_clients,
                "min_available_nodes": self.min_available_clients, "min_replies": self.min_replies}


@dataclass
class Scored:
    """What a method's ``score`` returns for one round: the words the row shows (a discrete prompt; ``[]`` for
    a soft prompt), the predicted class per evaluation example (None when the round is not due) and the
    black-box queries the evaluation cost."""

    prompt: Sequence[str] = field(default_factory=list)
    predictions: np.ndarray | None = None
    queries: int = 0


# score(server_round, arrays, due) -> Scored: the method's central evaluation of the global arrays.
Score = Callable[[int, ArrayRecord, bool], Scored]


def check_strategy(strategy: Strategy, fed: Federation) -> None:
    """ValueError if ``strategy`` was built with other reply or availability minimums than the config's."""
    for attribute, key, wanted in (("min_replies", "min_replies", fed.min_replies),
                                   ("min_available_nodes", "min_available_clients", fed.min_available_clients)):
        have = getattr(strategy, attribute, None)
        if have is None or int(have) != wanted:
            raise ValueError(f"{type(strategy).__name__}.{attribute} is {have!r} but federation.{key} resolves to "
                             f"{wanted}: pass the config's value on (fedprompt.fl.rounds.Federation)")


# report.info's key (and the summary's) for the server's own black-box usage so far (references, evaluation).
SERVER_USAGE = "server_usage"


class RoundDriver:
    """Runs a method's rounds (see the module's docstring); ``examples`` are the evaluation examples the
    ``score`` callback predicts, in order; ``usage`` is the server's black box's cumulative
    :class:`~fedprompt.blackbox.base.Usage` (None: it has none): it goes into every checkpoint, and a resumed
    run's goes on from the checkpoint's, so the summary's ``server_usage`` is the whole run's."""

    def __init__(self, cfg, folder: Path, report, strategy: Strategy, examples: Sequence, usage=None) -> None:
        from fedprompt.fl.checkpoint import CheckpointedRounds

        self.fed = Federation.from_cfg(cfg)
        check_strategy(strategy, self.fed)
        self.report, self.strategy, self.examples, self.usage = report, strategy, examples, usage
        # resume=true: the folder's checkpoint is checked and the report so far restored here, before the
        # method measures anything (report.info may already hold the references).
        self.checkpointed = CheckpointedRounds(cfg, folder, report, strategy)
        if usage is not None and self.resumed is not None and SERVER_USAGE in report.info:
            usage.add(type(usage)(**report.info[SERVER_USAGE]))  # what the server used before the stop

    @property
    def resumed(self):
        return self.checkpointed.resumed

    def evaluate(self, score: Score, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Round ``server_round``'s row: scored if due, else ``accuracy: null`` (no evaluation cost)."""
        from fedprompt.runs.protocol import round_accuracy

        due = self.fed.due(server_round)
        start = time.perf_counter()
        scored = score(server_round, arrays, due)
        if self.usage is not None:  # into the round's checkpoint: a resumed run's total goes on from there
            self.report.info[SERVER_USAGE] = self.usage.to_dict()
        predictions = scored.predictions if due else None
        accuracy = round_accuracy(self.report, self.examples, server_round, self.fed.rounds, predictions)
        rounds = getattr(self.strategy, "rounds", {})
        row = self.report.add(server_round, list(scored.prompt), accuracy, len(self.examples) if due else 0,
                              int(scored.queries) if due else 0, time.perf_counter() - start, rounds.get(server_round))
        log(INFO, "round %d: accuracy %s%s", server_round, accuracy, f", prompt {row['prompt']!r}" if row["prompt"] else "")
        if not due:
            return None
        assert accuracy is not None, "score returned no predictions for a due round"  # Scored's contract
        return MetricRecord({"accuracy": accuracy})

    def run(self, grid: Grid, initial_arrays: ArrayRecord, score: Score,
            train_config: ConfigRecord | None = None) -> Result:
        """All remaining rounds (all of them unless resumed); the Result's arrays are the last global arrays."""
        result = self.checkpointed.start(grid, initial_arrays, num_rounds=self.fed.rounds,
                                         timeout=self.fed.round_timeout_s,
                                         train_config=train_config if train_config is not None else ConfigRecord(),
                                         evaluate_fn=lambda r, arrays: self.evaluate(score, r, arrays))
        if not len(result.arrays):  # no round changed the arrays (all skipped, or resumed at the end)
            assert self.checkpointed.last_arrays is not None  # start() set it
            result.arrays = self.checkpointed.last_arrays
        return result


class MethodServer:
    """A method's server side, as :func:`serve` calls it: built once a run from the run's config, the method's
    typed config, the task, its spec and the evaluation examples (the only split the server reads). A subclass
    overrides what its method needs; ``report`` is the run's :class:`~fedprompt.runs.report.RunReport`, set before
    the references and the rounds."""

    usage: Usage | None = None  # the server black box's cumulative Usage (None: none): checkpointed, summed over a resume
    report: RunReport  # set by serve before the references and the rounds

    def __init__(self, cfg, method, task, spec, examples: Sequence) -> None:
        self.cfg, self.method, self.task, self.spec, self.examples = cfg, method, task, spec, examples

    def strategy(self, **common) -> Strategy:
        """The round's strategy; ``common``: ``seed``, ``audit_path`` and the federation's sampling and reply keys
        (:meth:`Federation.fedavg_kwargs`)."""
        raise NotImplementedError

    def info(self) -> dict:
        """The method's own facts for the run report (the template adds task, model, federation, provenance)."""
        return {}

    def untuned(self, rows: Sequence, text: str | None) -> np.ndarray:
        """Predicted classes of ``rows`` under the untuned instruction ``text`` (None: no instruction): the
        references of fedprompt.runs.protocol."""
        raise NotImplementedError

    def initial_arrays(self) -> ArrayRecord:
        raise NotImplementedError

    def score(self, server_round: int, arrays: ArrayRecord, due: bool) -> Scored:
        raise NotImplementedError

    def save(self, folder: Path, arrays: ArrayRecord) -> dict:
        """Write the final global arrays' files into ``folder``; returns what the summary adds."""
        return {}

    def close(self) -> None:
        """Release what the server holds (a black box's connections)."""


def serve(grid: Grid, cfg, server_cls: type[MethodServer]) -> dict:
    """A method's whole server side (``run_server``): the run's summary (summary.json) when the rounds are done."""
    from fedprompt.fl.records import audit_path
    from fedprompt.runs.data import eval_examples, load_task_and_spec, reference_examples
    from fedprompt.runs.protocol import measure_references, provenance
    from fedprompt.runs.report import RunReport, run_folder
    from fedprompt.runs.run_config import method_config

    fed = cfg.federation
    folder = run_folder(cfg)  # `fedprompt run` sets output_dir; `flwr run .` by hand: outputs/run/...
    task, spec = load_task_and_spec(cfg)
    examples = eval_examples(cfg, task)  # the server reads only the evaluation split, never client data
    server = server_cls(cfg, method_config(cfg), task, spec, examples)
    try:
        strategy = server.strategy(seed=int(cfg.seed), audit_path=audit_path(cfg, folder),
                                   **Federation.from_cfg(cfg).fedavg_kwargs())
        server.report = report = RunReport(folder, {
            "method": server.method.name, "task": spec.name, "model": str(cfg.model.name),
            "num_clients": int(fed.num_clients), "partition": dict(cfg.partition), "eval_split": str(fed.eval_split),
            "eval_n": len(examples), "manual_prompt": spec.manual_prompt, **server.info(), **provenance(cfg)})
        # resume=true: the report so far (and the server's black-box usage) is restored here
        driver = RoundDriver(cfg, folder, report, strategy, examples, server.usage)
        if fed.eval_references:
            measure_references(report, server.untuned, spec, examples, reference_examples(cfg, task))
        result = driver.run(grid, server.initial_arrays(), server.score)
        summary = server.save(folder, result.arrays)
        if server.usage is not None:
            summary["server_usage"] = server.usage.to_dict()
        return report.finish(**summary)
    finally:
        server.close()
