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

and, as its last key, ``sha256``: the SHA-256 of the bytes before it (:func:`_seal`). ``resume=true`` checks
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
import hashlib
import json
import os
import random
import re
import sys
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
# Settings a resumed run may change: where and how it is launched, not what it computes.
VOLATILE = ("resume", "progress", "verbose", "output_dir", "federation.round_timeout_s", "federation.superlink_port",
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


# The hash goes inside the file, as its last key, not into a file beside it: the two are then replaced in one
# atomic rename, whereas a stop between two renames (what resume is for) would leave a good checkpoint that
# fails its check. It is computed over the exact bytes before it, so any changed byte is found (a canonical
# re-serialization would miss edits that parse alike, such as 1e-05 -> 1E-05). It detects damage and edits,
# not an adversary: anyone can recompute it, so every field is also checked (_decode).
_SEAL = re.compile(rb', "sha256": "([0-9a-f]{64})"}\Z')


def _seal(body: bytes) -> bytes:
    """``body`` (a JSON object's bytes) with its SHA-256 added as the last key."""
    return body[:-1] + b', "sha256": "' + hashlib.sha256(body).hexdigest().encode() + b'"}'


class _Damaged(Exception):
    """What is wrong with a checkpoint (Checkpoint.read names the file)."""


def _check(ok: bool, problem: str) -> None:
    if not ok:
        raise _Damaged(problem)


def _typed(value: Any, types: tuple) -> bool:
    return isinstance(value, types) and (bool in types or not isinstance(value, bool))  # JSON true is no count


def _short(value: Any) -> str:
    text = repr(value)  # one line: repr escapes newlines
    return text if len(text) <= 60 else text[:57] + "..."


def _record(b64: Any, what: str) -> RecordDict:
    try:
        return _record_from_bytes(base64.b64decode(b64, validate=True))
    except Exception as err:  # noqa: BLE001 - base64, protobuf or Flower: any of them means garbage
        raise _Damaged(f"{what}: no Flower RecordDict in base64 ({type(err).__name__}: {err})") from None


def _check_rows(rows: Any, last: int) -> None:
    from fedprompt.fl.report import ROW_EXTRA_TYPES, ROW_TYPES

    _check(isinstance(rows, list) and all(isinstance(r, dict) for r in rows), "rows is not a list of objects")
    numbers = [r.get("round") for r in rows]
    # A cut or reordered list would resume into a report with rounds missing ([0, 3]) or doubled.
    _check(numbers == list(range(last + 1)), f"rows are rounds {numbers[:10]}, not 0..{last} in order")
    for number, row in enumerate(rows):
        for key, types in ROW_TYPES.items():
            _check(key in row and _typed(row[key], types), f"round {number}'s row: {key} is {_short(row.get(key))}")
        for key, types in ROW_EXTRA_TYPES.items():
            _check(key not in row or _typed(row[key], types), f"round {number}'s row: {key} is {_short(row.get(key))}")


def _check_rng(rng: Any) -> None:
    _check(isinstance(rng, dict) and {"python", "numpy"} <= set(rng) <= {"python", "numpy", "torch", "cuda"},
           f"rng holds {_short(sorted(rng) if isinstance(rng, dict) else rng)}, not python, numpy (torch, cuda)")
    try:  # set them on fresh generators: their own checks, and this process's RNGs stay as they are
        version, internal, gauss = rng["python"]
        random.Random().setstate((version, tuple(internal), gauss))
        kind, keys, pos, has_gauss, cached = rng["numpy"]
        # NumPy takes any position; past 624 it would draw from outside its state
        _check(_typed(pos, (int,)) and 0 <= pos <= 624, f"rng.numpy's position {_short(pos)} is not in 0..624")
        np.random.RandomState().set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
        for state in ([rng["torch"]] if "torch" in rng else []) + list(rng.get("cuda", [])):
            _check(isinstance(state, str) and base64.b64decode(state, validate=True), "a torch state is empty")
    except _Damaged:
        raise
    except Exception as err:  # noqa: BLE001 - each generator raises its own kind
        raise _Damaged(f"rng states are malformed ({type(err).__name__}: {err})") from None


def _decode(data: Any) -> Checkpoint:
    """The checkpoint in ``data`` (a JSON object), or _Damaged: every field's type, range and consistency."""
    _check(isinstance(data, dict), "not a JSON object")
    fields = {"round", "num_rounds", "config", "arrays", "strategy", "rows", "info", "rng"}
    extra, missing = sorted(set(data) - fields), sorted(fields - set(data))
    _check(not extra and not missing, f"keys {_short(extra)} unexpected, {_short(missing)} missing")
    done, total, config = data["round"], data["num_rounds"], data["config"]
    _check(_typed(done, (int,)) and _typed(total, (int,)), f"round {_short(done)} of {_short(total)}: not integers")
    _check(0 <= done <= total, f"round {done} is not in 0..{total} (num_rounds)")
    _check(isinstance(config, dict), "config is not an object")
    federation = config.get("federation")
    rounds = federation.get("rounds") if isinstance(federation, dict) else None
    _check(_typed(rounds, (int,)) and rounds == total, f"num_rounds {total} is not its config's federation.rounds "
           f"({_short(rounds)})")
    _check_rows(data["rows"], done)
    _check(isinstance(data["info"], dict), "info is not an object")
    _check_rng(data["rng"])
    arrays = _record(data["arrays"], "arrays")
    _check(list(arrays) == ["arrays"] and isinstance(arrays["arrays"], ArrayRecord), "arrays hold no ArrayRecord")
    try:
        for array in arrays["arrays"].values():
            array.numpy()  # its dtype, shape and bytes agree
    except Exception as err:  # noqa: BLE001
        raise _Damaged(f"arrays: an Array does not decode ({type(err).__name__}: {err})") from None
    strategy = None if data["strategy"] is None else _record(data["strategy"], "strategy")
    return Checkpoint(done, total, config, arrays["arrays"], data["rows"], data["info"], strategy, data["rng"])


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
        _write_atomic(Path(folder) / CHECKPOINT, _seal(json.dumps(data).encode()))

    @classmethod
    def read(cls, folder: Path) -> Checkpoint | None:
        """The folder's checkpoint, None if it has none; a ConfigError in one line naming the file and what is
        wrong if it is truncated, changed or inconsistent (it reads only: nothing is written or removed)."""
        path = Path(folder) / CHECKPOINT
        if not path.is_file():
            return None
        try:
            raw = path.read_bytes()
            seal = _SEAL.search(raw)
            _check(seal is not None, "no SHA-256 at its end (truncated, or not written by this fedprompt)")
            body = raw[: seal.start()] + b"}"
            _check(hashlib.sha256(body).hexdigest() == seal[1].decode(),
                   "its SHA-256 does not match its content (changed after it was written)")
            try:
                data = json.loads(body)
            except ValueError as err:  # a matching hash over garbage: written by something else
                raise _Damaged(f"not JSON ({err})") from None
            return _decode(data)
        except (_Damaged, OSError) as err:
            problem = " ".join(str(err).splitlines())
            raise ConfigError(f"checkpoint {path} refused: {problem}; delete it to start that run over, or choose "
                              "another output_dir") from None


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
                self.strategy.restore_state(self.resumed.strategy)
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
    _write_atomic(folder / f"state-{server_round}.bin", recorddict_to_proto(context.state).SerializeToString())
    for _, old in _state_files(folder)[:-2]:
        old.unlink(missing_ok=True)
