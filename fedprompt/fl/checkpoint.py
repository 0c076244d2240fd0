"""Resume: a run stopped between rounds continues from its last completed round and ends exactly as the
uninterrupted run with the same seed (same global prompt / arrays, same per-round rows).

Server side, after every completed round (aggregation + central evaluation; round 0 = the initial
arrays), :class:`CheckpointedRounds` replaces ``<run folder>/checkpoint.json`` atomically with:

    round, num_rounds   the last completed round, of how many
    config              the resolved config (a resume with other settings is refused)
    arrays              the global ArrayRecord after that round (Flower's protobuf, base64)
    rows, info          the run report so far (rounds.json's rows, the summary's facts)
    strategy            the strategy's own state, if it has any (``checkpoint_state`` / ``restore_state``)
    rng                 the server process's Python, NumPy and torch RNG states

and, as its last key, ``sha256``: the SHA-256 of the bytes before it (:func:`seal`). ``resume=true`` checks
all of it first (the hash, then every field's type, range and consistency: :func:`_decode`) and refuses a
damaged or inconsistent checkpoint in one line before anything else happens; then it restores all of it and
runs only the remaining rounds: Flower's ``Strategy.start`` loop, with the strategy's round numbers shifted
(:class:`_RoundOffset`).

Client side: a resumed Flower run hands every ClientApp a fresh ``context.state``, so the ClientApp saves
each client's ``context.state`` after every round it trains to ``clients/<partition-id>/state-<round>.bin``
and, before training round r, loads the newest state saved in a round before r (the same in an
uninterrupted run: the state it kept in memory). Keeping the two newest files covers a round redone after
a stop. Everything else must be a function of (seed, round, partition-id): see docs/experiments.md.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from logging import INFO
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Protocol, cast

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.supercore import log

from fedprompt.errors import ConfigError
from fedprompt.runs.resume import (
    Damaged,
    check,
    check_rng,
    check_rows,
    config_differences,
    rng_state,
    seal,
    set_rng_state,
    short,
    typed,
    unseal,
    write_atomic,
)

CHECKPOINT = "checkpoint.json"
CLIENTS = "clients"


def _record_to_b64(record: RecordDict) -> str:
    from flwr.common.serde import recorddict_to_proto

    return base64.b64encode(recorddict_to_proto(record).SerializeToString()).decode()


def _record_from_bytes(data: bytes) -> RecordDict:
    from flwr.common.serde import recorddict_from_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    proto = ProtoRecordDict()
    proto.ParseFromString(data)
    return recorddict_from_proto(proto)


def _record(b64: Any, what: str) -> RecordDict:
    try:
        return _record_from_bytes(base64.b64decode(b64, validate=True))
    except Exception as err:  # noqa: BLE001 - base64, protobuf or Flower: any of them means garbage
        raise Damaged(f"{what}: no Flower RecordDict in base64 ({type(err).__name__}: {err})") from None


def _decode(data: Any) -> Checkpoint:
    """The checkpoint in ``data`` (a JSON object), or Damaged: every field's type, range and consistency."""
    check(isinstance(data, dict), "not a JSON object")
    fields = {"round", "num_rounds", "config", "arrays", "strategy", "rows", "info", "rng"}
    extra, missing = sorted(set(data) - fields), sorted(fields - set(data))
    check(not extra and not missing, f"keys {short(extra)} unexpected, {short(missing)} missing")
    done, total, config = data["round"], data["num_rounds"], data["config"]
    check(typed(done, (int,)) and typed(total, (int,)), f"round {short(done)} of {short(total)}: not integers")
    check(0 <= done <= total, f"round {done} is not in 0..{total} (num_rounds)")
    check(isinstance(config, dict), "config is not an object")
    federation = config.get("federation")
    rounds = federation.get("rounds") if isinstance(federation, dict) else None
    check(typed(rounds, (int,)) and rounds == total, f"num_rounds {total} is not its config's federation.rounds "
           f"({short(rounds)})")
    check_rows(data["rows"], done)
    check(isinstance(data["info"], dict), "info is not an object")
    check_rng(data["rng"])
    arrays = _record(data["arrays"], "arrays")
    record = arrays["arrays"] if list(arrays) == ["arrays"] else None
    if not isinstance(record, ArrayRecord):
        raise Damaged("arrays hold no ArrayRecord")
    try:
        for array in record.values():
            array.numpy()  # its dtype, shape and bytes agree
    except Exception as err:  # noqa: BLE001
        raise Damaged(f"arrays: an Array does not decode ({type(err).__name__}: {err})") from None
    strategy = None if data["strategy"] is None else _record(data["strategy"], "strategy")
    return Checkpoint(done, total, config, record, data["rows"], data["info"], strategy, data["rng"])


@dataclass
class Checkpoint:
    round: int
    num_rounds: int
    config: dict[str, Any]
    arrays: ArrayRecord
    rows: list[dict[str, Any]]
    info: dict[str, Any]
    strategy: RecordDict | None
    rng: dict[str, Any]

    def write(self, folder: Path) -> None:
        data = {
            "round": self.round, "num_rounds": self.num_rounds, "config": self.config,
            "arrays": _record_to_b64(RecordDict({"arrays": self.arrays})),
            "strategy": None if self.strategy is None else _record_to_b64(self.strategy),
            "rows": self.rows, "info": self.info, "rng": self.rng,
        }
        write_atomic(Path(folder) / CHECKPOINT, seal(json.dumps(data).encode()))

    @classmethod
    def read(cls, folder: Path) -> Checkpoint | None:
        """The folder's checkpoint, None if it has none; a ConfigError in one line naming the file and what is
        wrong if it is truncated, changed or inconsistent (it reads only: nothing is written or removed)."""
        path = Path(folder) / CHECKPOINT
        if not path.is_file():
            return None
        try:
            return _decode(unseal(path.read_bytes()))
        except (Damaged, OSError) as err:
            problem = " ".join(str(err).splitlines())
            raise ConfigError(f"checkpoint {path} refused: {problem}; delete it to start that run over, or choose "
                              "another output_dir") from None


def check_resumable(folder: Path, config: Mapping[str, Any]) -> Checkpoint | None:
    """The folder's checkpoint if ``config`` (the resolved config) may resume it; None if there is none."""
    checkpoint = Checkpoint.read(folder)
    if checkpoint is None:
        return None
    diff = config_differences(checkpoint.config, config)
    if diff:
        raise ConfigError(f"cannot resume {folder}: its checkpoint (round {checkpoint.round} of {checkpoint.num_rounds}) "
                          f"was made with other settings ({'; '.join(diff[:5])}); resume with the same settings "
                          "or start a new run in another folder")
    return checkpoint


# --- server: Flower's round loop, checkpointed ------------------------------------------------------------------


class _RoundOffset(Strategy):
    """``strategy`` seen through Flower's loop with round numbers shifted by ``offset`` (the rounds done)."""

    def __init__(self, strategy: Strategy, offset: int) -> None:
        self.strategy, self.offset = strategy, offset

    def summary(self) -> None:
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_train(server_round + self.offset, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.strategy.aggregate_train(server_round + self.offset, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round + self.offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round + self.offset, replies)


class StatefulStrategy(Protocol):
    """A strategy with state of its own (e.g. RAPT's trainer): what it checkpoints, and how it restores that."""

    def checkpoint_state(self) -> RecordDict | None: ...

    def restore_state(self, state: RecordDict) -> None: ...


class CheckpointedRounds:
    """Runs ``strategy`` for ``num_rounds`` through Flower's ``Strategy.start``, checkpointing every round.

    ``report`` is the run's :class:`~fedprompt.runs.report.RunReport`; with ``cfg.resume`` the folder's
    checkpoint (if any) is restored into it at construction, so the method can see what is already known
    (``report.info``) before it starts. ``start`` then runs the remaining rounds only.
    """

    def __init__(self, cfg, folder: Path, report, strategy: Strategy) -> None:
        from fedprompt.typed_config import plain_dict

        self.folder, self.report, self.strategy = Path(folder), report, strategy
        self.config = plain_dict(cfg)
        self.resumed = check_resumable(self.folder, self.config) if cfg.get("resume") else None
        self.last_arrays: ArrayRecord | None = None  # the global arrays after the last round run (or restored)
        if self.resumed is not None:
            report.restore(self.resumed.rows, self.resumed.info)

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int, timeout: float,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None) -> Result:
        """Like ``Strategy.start``; the Result's round keys count from the resumed round."""
        done, arrays = 0, initial_arrays
        if self.resumed is not None:
            done, arrays = self.resumed.round, self.resumed.arrays
        self.last_arrays = arrays
        if self.resumed is not None:
            if self.resumed.strategy is not None:
                # only a strategy with checkpoint_state (a StatefulStrategy) wrote one
                cast(StatefulStrategy, self.strategy).restore_state(self.resumed.strategy)
            set_rng_state(self.resumed.rng)  # last: nothing may draw between here and the next round
            log(INFO, "resuming from round %d of %d (%s)", done, num_rounds, self.folder / CHECKPOINT)

        def evaluate(flower_round: int, round_arrays: ArrayRecord) -> MetricRecord | None:
            if flower_round == 0 and done:
                return None  # evaluated and reported before the stop
            server_round = flower_round + done
            self.last_arrays = round_arrays
            metrics = evaluate_fn(server_round, round_arrays) if evaluate_fn is not None else None
            state = getattr(self.strategy, "checkpoint_state", None)
            Checkpoint(server_round, num_rounds, self.config, round_arrays, self.report.rows, self.report.info,
                       state() if state else None, rng_state()).write(self.folder)
            return metrics

        return _RoundOffset(self.strategy, done).start(grid, arrays, num_rounds=num_rounds - done, timeout=timeout,
                                                       train_config=train_config, evaluate_config=evaluate_config,
                                                       evaluate_fn=evaluate)


# --- clients: context.state on disk -----------------------------------------------------------------------------


def client_dir(cfg, context) -> Path | None:
    """This client's own folder, ``clients/<partition-id>/`` of the run folder (None outside a fedprompt run)."""
    pid = context.node_config.get("partition-id")
    if not cfg.get("output_dir") or pid is None:
        return None  # `flwr run .` by hand, or a SuperNode without a partition: nothing to resume into
    return Path(str(cfg.output_dir)) / CLIENTS / str(int(pid))


def _state_files(folder: Path) -> list[tuple[int, Path]]:
    return sorted((int(p.stem.removeprefix("state-")), p) for p in folder.glob("state-*.bin"))


def restore_client_state(cfg, context, server_round: int) -> None:
    """Put the newest ``context.state`` this client saved before ``server_round`` into ``context``."""
    folder = client_dir(cfg, context)
    earlier = [p for r, p in _state_files(folder) if r < server_round] if folder and folder.is_dir() else []
    if earlier:
        state = _record_from_bytes(earlier[-1].read_bytes())
        context.state.clear()
        context.state.update(state)


def save_client_state(cfg, context, server_round: int) -> None:
    """Save ``context.state`` after ``server_round``; keep only the two newest (one round may be redone)."""
    folder = client_dir(cfg, context)
    if folder is None or not len(context.state):
        return
    from flwr.common.serde import recorddict_to_proto

    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / f"state-{server_round}.bin", recorddict_to_proto(context.state).SerializeToString())
    for _, old in _state_files(folder)[:-2]:
        old.unlink(missing_ok=True)
