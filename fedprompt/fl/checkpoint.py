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

and ``resume=true`` restores all of it and runs only the remaining rounds: Flower's ``Strategy.start``
loop, with the strategy's round numbers shifted (:class:`_RoundOffset`).

Client side: a resumed Flower run hands every ClientApp a fresh ``context.state``, so the ClientApp saves
each client's ``context.state`` after every round it trains to ``clients/<partition-id>/state-<round>.bin``
and, before training round r, loads the newest state saved in a round before r (the same in an
uninterrupted run: the state it kept in memory). Keeping the two newest files covers a round redone after
a stop. Everything else must be a function of (seed, round, partition-id): see docs/experiments.md.
"""

from __future__ import annotations

import base64
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from logging import INFO
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.supercore import log

from fedprompt.errors import ConfigError

CHECKPOINT = "checkpoint.json"
CLIENTS = "clients"
# Test hook: the server waits after checkpointing this round, where a stop between rounds finds a run,
# so a test can stop `fedprompt run` there for certain (tests/test_resume.py).
PAUSE_ENV = "FEDPROMPT_TEST_PAUSE_AFTER_ROUND"
# Settings a resumed run may change: where and how it is launched, not what it computes.
VOLATILE = ("resume", "progress", "output_dir", "federation.round_timeout_s", "federation.superlink_port",
            "service.api_key")  # a key is a launch setting; a run's files only ever hold it as ***


def _record_to_b64(record: RecordDict) -> str:
    from flwr.common.serde import recorddict_to_proto

    return base64.b64encode(recorddict_to_proto(record).SerializeToString()).decode()


def _record_from_bytes(data: bytes) -> RecordDict:
    from flwr.common.serde import recorddict_from_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    proto = ProtoRecordDict()
    proto.ParseFromString(data)
    return recorddict_from_proto(proto)


def _write_atomic(path: Path, data: bytes) -> None:
    # A stop while writing must leave the previous file whole: write beside it, then rename over it.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


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
        _write_atomic(Path(folder) / CHECKPOINT, json.dumps(data).encode())

    @classmethod
    def read(cls, folder: Path) -> "Checkpoint | None":
        path = Path(folder) / CHECKPOINT
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        strategy = data.get("strategy")
        return cls(
            round=int(data["round"]), num_rounds=int(data["num_rounds"]), config=data["config"],
            arrays=_record_from_bytes(base64.b64decode(data["arrays"]))["arrays"], rows=data["rows"],
            info=data["info"], strategy=None if strategy is None else _record_from_bytes(base64.b64decode(strategy)),
            rng=data["rng"],
        )


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, Mapping):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: data}


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``key: saved -> current`` for every setting (but :data:`VOLATILE`) that differs."""
    a, b = _flatten(saved), _flatten(current)
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and not k.startswith(VOLATILE))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys]


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


# --- RNG states of this process: whatever global generator a method's server draws from ------------------------


def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {"python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
                             "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    torch = sys.modules.get("torch")  # only if the method uses torch: never import it for this
    if torch is not None:
        state["torch"] = base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "torch" in state:
        import torch

        def tensor(b64: str):
            return torch.from_numpy(np.frombuffer(base64.b64decode(b64), dtype=np.uint8).copy())

        torch.set_rng_state(tensor(state["torch"]))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([tensor(s) for s in state["cuda"]])


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


class CheckpointedRounds:
    """Runs ``strategy`` for ``num_rounds`` through Flower's ``Strategy.start``, checkpointing every round.

    ``report`` is the run's :class:`~fedprompt.fl.report.RunReport`; with ``cfg.resume`` the folder's
    checkpoint (if any) is restored into it at construction, so the method can see what is already known
    (``report.info``) before it starts. ``start`` then runs the remaining rounds only.
    """

    def __init__(self, cfg, folder: Path, report, strategy: Strategy) -> None:
        from omegaconf import OmegaConf

        self.folder, self.report, self.strategy = Path(folder), report, strategy
        self.config = OmegaConf.to_container(cfg, resolve=True)
        self.resumed = check_resumable(self.folder, self.config) if cfg.get("resume") else None
        if self.resumed is not None:
            report.restore(self.resumed.rows, self.resumed.info)

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int, timeout: float,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None) -> Result:
        """Like ``Strategy.start``; the Result's round keys count from the resumed round."""
        done, arrays = 0, initial_arrays
        if self.resumed is not None:
            done, arrays = self.resumed.round, self.resumed.arrays
            if self.resumed.strategy is not None:
                self.strategy.restore_state(self.resumed.strategy)
            set_rng_state(self.resumed.rng)  # last: nothing may draw between here and the next round
            log(INFO, "resuming from round %d of %d (%s)", done, num_rounds, self.folder / CHECKPOINT)

        def evaluate(flower_round: int, round_arrays: ArrayRecord) -> MetricRecord | None:
            if flower_round == 0 and done:
                return None  # evaluated and reported before the stop
            server_round = flower_round + done
            metrics = evaluate_fn(server_round, round_arrays) if evaluate_fn is not None else None
            state = getattr(self.strategy, "checkpoint_state", None)
            Checkpoint(server_round, num_rounds, self.config, round_arrays, self.report.rows, self.report.info,
                       state() if state else None, rng_state()).write(self.folder)
            if os.environ.get(PAUSE_ENV) == str(server_round):
                time.sleep(600)
            return metrics

        return _RoundOffset(self.strategy, done).start(grid, arrays, num_rounds=num_rounds - done, timeout=timeout,
                                                       train_config=train_config, evaluate_config=evaluate_config,
                                                       evaluate_fn=evaluate)


# --- clients: context.state on disk -----------------------------------------------------------------------------


def _client_dir(cfg, context) -> Path | None:
    pid = context.node_config.get("partition-id")
    if not cfg.get("output_dir") or pid is None:
        return None  # `flwr run .` by hand, or a SuperNode without a partition: nothing to resume into
    return Path(str(cfg.output_dir)) / CLIENTS / str(int(pid))


def _state_files(folder: Path) -> list[tuple[int, Path]]:
    return sorted((int(p.stem.removeprefix("state-")), p) for p in folder.glob("state-*.bin"))


def restore_client_state(cfg, context, server_round: int) -> None:
    """Put the newest ``context.state`` this client saved before ``server_round`` into ``context``."""
    folder = _client_dir(cfg, context)
    earlier = [p for r, p in _state_files(folder) if r < server_round] if folder and folder.is_dir() else []
    if earlier:
        state = _record_from_bytes(earlier[-1].read_bytes())
        context.state.clear()
        context.state.update(state)


def save_client_state(cfg, context, server_round: int) -> None:
    """Save ``context.state`` after ``server_round``; keep only the two newest (one round may be redone)."""
    folder = _client_dir(cfg, context)
    if folder is None or not len(context.state):
        return
    from flwr.common.serde import recorddict_to_proto

    folder.mkdir(parents=True, exist_ok=True)
    _write_atomic(folder / f"state-{server_round}.bin", recorddict_to_proto(context.state).SerializeToString())
    for _, old in _state_files(folder)[:-2]:
        old.unlink(missing_ok=True)
