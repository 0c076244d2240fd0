"""Checked checkpoints: `fedprompt resume` refuses a truncated, changed or inconsistent checkpoint.json in one
line (exit code 2) naming the file and what is wrong, before the data, a model or the SuperLink is touched,
and leaves every file of the run folder as it was. One checkpoint is written with the module's own writer;
each case damages a copy of it."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from omegaconf import OmegaConf

from fedprompt import cli
from fedprompt.commands import run
from fedprompt.config import compose
from fedprompt.fl.checkpoint import CHECKPOINT, Checkpoint, _record_to_b64, check_resumable
from fedprompt.runs import data as fl_data
from fedprompt.runs.report import RoundStats, RunReport
from fedprompt.runs.resume import rng_state, seal
from fedprompt.runs.run_config import serialize_config


class DataRead(Exception):
    """The task's data was about to be read: the checkpoint was accepted."""


@pytest.fixture
def folder(tmp_path, monkeypatch) -> Path:
    """A run folder stopped after round 2 of 3: its config, report files, a client's state and checkpoint."""
    def load_task_and_spec(cfg):
        raise DataRead  # the data, tokenizers, models and SuperLink come after the checkpoint's checks

    monkeypatch.setattr(fl_data, "load_task_and_spec", load_task_and_spec)
    folder = tmp_path / "run"
    cfg = compose(["federation.rounds=3", f"output_dir={folder}"])
    report = RunReport(folder, {"method": "feddtpt", "task": "sst2"})  # writes rounds.json/csv, accuracy.png
    for server_round in range(3):
        stats = RoundStats(sampled=2, replies=2, metrics={"queries": 8.0}) if server_round else None
        report.add(server_round, ["great", "movie"], 0.5 + server_round / 10, 8, 8, 0.1, stats)
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    (folder / "summary.json").write_text("{}\n")  # a stop after it was written: a resume would remove it
    (folder / "clients" / "0").mkdir(parents=True)
    (folder / "clients" / "0" / "state-2.bin").write_bytes(b"\x01\x02")
    config = json.loads(serialize_config(OmegaConf.merge(cfg, {"output_dir": str(folder.resolve())})))
    arrays = ArrayRecord({"prompt": Array(np.arange(6, dtype=np.float32).reshape(2, 3))})
    strategy = RecordDict({"state": ConfigRecord({"count": 3})})
    Checkpoint(2, 3, config, arrays, report.rows, report.info, strategy, rng_state()).write(folder)
    return folder


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _resealed(change):
    """A case whose checkpoint has a valid SHA-256 (recomputed, as anyone can) over inconsistent content."""
    def damage(raw: bytes) -> bytes:
        data = json.loads(raw)
        del data["sha256"]
        change(data)
        return seal(json.dumps(data).encode())
    return damage


def _flip(position: int):
    def damage(raw: bytes) -> bytes:
        at = position % len(raw)
        return raw[:at] + bytes([raw[at] ^ 1]) + raw[at + 1 :]
    return damage


def _set(path: str, value):
    def change(data):
        *parents, leaf = path.split(".")
        node = data
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[int(leaf) if isinstance(node, list) else leaf] = value
    return change


GARBAGE = base64.b64encode(b"garbage, not a RecordDict").decode()
JUNK_ARRAY = _record_to_b64(RecordDict({"arrays": ArrayRecord(  # a RecordDict, but its Array's bytes are no array
    {"p": Array(dtype="float32", shape=(2, 3), stype="numpy.ndarray", data=b"junk")})}))
CASES = {
    # damaged or changed: the SHA-256 says so
    "truncated": (lambda raw: raw[: len(raw) // 2], "no SHA-256 at its end"),
    "empty": (lambda raw: b"", "no SHA-256 at its end"),
    "no hash": (_resealed(lambda data: None), None),  # replaced below: the content without its seal
    "first byte": (_flip(0), "SHA-256 does not match"),
    "middle byte": (_flip(2000), "SHA-256 does not match"),
    "a digit of the hash": (lambda raw: raw[:-10] + (b"1" if raw[-10:-9] == b"0" else b"0") + raw[-9:],
                            "SHA-256 does not match"),
    "last byte": (_flip(-1), "no SHA-256 at its end"),
    "a float written alike": (lambda raw: raw.replace(b"0.1,", b"0.10,", 1), "SHA-256 does not match"),
    # resealed: every field is checked too
    "sealed garbage": (lambda raw: seal(b'{"round": 1, oops}'), "not JSON"),
    "garbage arrays": (_resealed(_set("arrays", GARBAGE)), "arrays: no Flower RecordDict in base64 (DecodeError"),
    "arrays not base64": (_resealed(_set("arrays", "%%%")), "arrays: no Flower RecordDict in base64"),
    "no arrays": (_resealed(_set("arrays", "")), "arrays hold no ArrayRecord"),
    "junk array bytes": (_resealed(_set("arrays", JUNK_ARRAY)), "arrays: an Array does not decode"),
    "garbage strategy": (_resealed(_set("strategy", GARBAGE)), "strategy: no Flower RecordDict in base64"),
    "round 99 of 3": (_resealed(_set("round", 99)), "round 99 is not in 0..3"),
    "round -1": (_resealed(_set("round", -1)), "round -1 is not in 0..3"),
    "round as text": (_resealed(_set("round", "2")), "round '2' of 3: not integers"),
    "num_rounds not the config's": (_resealed(_set("num_rounds", 5)),
                                    "num_rounds 5 is not its config's federation.rounds (3)"),
    "cut rows": (_resealed(lambda data: data["rows"].pop(1)), "rows are rounds [0, 2], not 0..2 in order"),
    "rows of round 0 only": (_resealed(lambda data: data["rows"].__delitem__(slice(1, None))),  # resumed: [0, 3]
                             "rows are rounds [0], not 0..2"),
    "a row's field": (_resealed(_set("rows.1.accuracy", "high")), "round 1's row: accuracy is 'high'"),
    "a row's count": (_resealed(_set("rows.2.queries", True)), "round 2's row: queries is True"),
    "info": (_resealed(_set("info", [])), "info is not an object"),
    "config": (_resealed(_set("config", "sst2")), "config is not an object"),
    "a key more": (_resealed(_set("extra", 1)), "keys ['extra'] unexpected, [] missing"),
    "numpy rng": (_resealed(_set("rng.numpy.1", [1, 2])), "rng states are malformed"),
    "numpy rng position": (_resealed(_set("rng.numpy.2", 999)), "rng.numpy's position 999 is not in 0..624"),
    "python rng": (_resealed(_set("rng.python", "seed")), "rng states are malformed"),
}


def _no_hash(raw: bytes) -> bytes:
    data = json.loads(raw)
    del data["sha256"]
    return json.dumps(data).encode()  # as written before checkpoints were sealed


CASES["no hash"] = (_no_hash, "no SHA-256 at its end")


@pytest.mark.parametrize("case", list(CASES))
def test_a_damaged_checkpoint_is_refused_in_one_line_and_nothing_changes(case, folder, capsys):
    damage, problem = CASES[case]
    path = folder / CHECKPOINT
    path.write_bytes(damage(path.read_bytes()))
    before = _snapshot(folder)
    capsys.readouterr()
    assert cli.main(["resume", str(folder)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"fedprompt resume: error: checkpoint {path.resolve()} refused: "), err
    assert problem in err, err
    assert _snapshot(folder) == before  # not one file written, changed or removed


def test_fedprompt_run_resume_true_refuses_it_too(folder, capsys):
    path = folder / CHECKPOINT
    path.write_bytes(_flip(2000)(path.read_bytes()))
    before = _snapshot(folder)
    capsys.readouterr()
    assert cli.main(["run", "federation.rounds=3", f"output_dir={folder}", "resume=true"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.match(r"fedprompt run: error: checkpoint .* refused: its SHA", err)
    assert _snapshot(folder) == before


def test_a_new_run_into_a_folder_with_a_damaged_unfinished_checkpoint_is_refused(folder):
    path = folder / CHECKPOINT
    path.write_bytes(path.read_bytes()[:100])
    before = _snapshot(folder)
    cfg = OmegaConf.load(folder / "config.yaml")
    with pytest.raises(run.ConfigError, match="no SHA-256 at its end"):
        run.resume_point(cfg, folder)
    assert _snapshot(folder) == before


def test_the_checkpoint_as_written_is_accepted_whole(folder):
    cfg = OmegaConf.merge(OmegaConf.load(folder / "config.yaml"), {"resume": True})
    checkpoint = check_resumable(folder, json.loads(serialize_config(cfg)))
    assert (checkpoint.round, checkpoint.num_rounds, [r["round"] for r in checkpoint.rows]) == (2, 3, [0, 1, 2])
    assert (checkpoint.arrays["prompt"].numpy() == np.arange(6).reshape(2, 3)).all()
    assert checkpoint.strategy["state"]["count"] == 3
    with pytest.raises(DataRead):  # past every check, on to the data: nothing refused
        cli.main(["resume", str(folder)])
