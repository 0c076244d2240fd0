"""A real local deployment (SuperLink + 2 SuperNodes on loopback, TLS, the tiny model) where each SuperNode holds
only its own partition: `fedprompt deploy` writes the partitions and points each SuperNode at its own folder
(node config data-dir). The ClientApps record every file they open; each trained on exactly the rows the
simulation gives its partition, opened no other partition's folder and never the task's own folder, which
is deleted before the run starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedprompt.config import compose
from fedprompt.runs.data import client_data
from tests.deploy_support import background_run, supernode_log, tiny_deployment, write_client_app
from tests.fl_support import tiny_overrides

pytestmark = [pytest.mark.deploy, pytest.mark.timeout(900)]

WATCH_ENV, RECORD_ENV = "FEDPROMPT_TEST_WATCH", "FEDPROMPT_TEST_RECORDS"

WATCHING_CLIENT = f'''
"""fedprompt's ClientApp, recording each file the process opens under ${WATCH_ENV} (a Python audit hook) and the
examples FedDTPT's search trains on, to ${RECORD_ENV}/<pid>-<partition>.json (tests/test_deploy_node_data.py)."""
import json
import os
import sys

import fedprompt.fl.client_app
import fedprompt.fl.feddtpt as feddtpt_client
from fedprompt.methods.feddtpt.search import PromptSearch

app = fedprompt.fl.client_app.app  # the ClientApp Flower loads
WATCH, RECORDS = os.environ["{WATCH_ENV}"], os.environ["{RECORD_ENV}"]
opened, trained = [], []


def audit(event, args):
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.path.abspath(os.fsdecode(args[0]))
        if path.startswith(WATCH + os.sep):
            opened.append(path)


sys.addaudithook(audit)  # from the import of this app on: before the ClientApp reads any data
_run, _train = PromptSearch.run, feddtpt_client.train


def run(self, blackbox, spec, prompt, examples, *args, **kwargs):
    trained.append([e.text for e in examples])
    return _run(self, blackbox, spec, prompt, examples, *args, **kwargs)


def train(msg, context, cfg):
    try:
        return _train(msg, context, cfg)
    finally:
        partition = int(context.node_config["partition-id"])
        record = {{"partition": partition, "opened": sorted(set(opened)), "trained": trained}}
        with open(os.path.join(RECORDS, f"{{os.getpid()}}-{{partition}}.json"), "w") as out:
            json.dump(record, out)


PromptSearch.run = run
feddtpt_client.train = train  # the method registry looks the client up when a message arrives
'''


def write_watching_app(folder: Path) -> Path:
    return write_client_app(folder, "watching", WATCHING_CLIENT, "fedprompt with clients that record the files they open")


def test_each_supernode_reads_only_its_own_partition_folder(tmp_path, tiny_model_dir, monkeypatch):
    records = tmp_path / "records"
    records.mkdir()
    monkeypatch.setenv(WATCH_ENV, str(tmp_path))  # every SuperNode and its ClientApps inherit these
    monkeypatch.setenv(RECORD_ENV, str(records))
    with tiny_deployment(tmp_path, tiny_model_dir, 2, "federation.rounds=1") as (deployment, folder, run_config):
        # What the simulation gives each client (tiny_deployment's task and partition settings).
        expected = client_data(compose(tiny_overrides(tmp_path / "data", tiny_model_dir, clients=2))).partition.clients
        own = [deployment.node_data_dir(i) for i in range(2)]
        for i in range(2):
            command = supernode_log(deployment, i).read_text(errors="replace").splitlines()[0]
            assert f'partition-id={i} num-partitions=2 data-dir="{own[i]}"' in command, command
        (tmp_path / "data" / "secret" / "train.jsonl").unlink()  # the task's train split is gone before the run
        run = background_run(deployment, folder, run_config, app=write_watching_app(tmp_path / "app"))
        outcome = run.join()
    assert outcome.status == "finished:completed", outcome
    row = run.rounds()[1]
    assert row["clients_sampled"] == 2 and row["replies"] == 2 and row["failures"] == 0, row
    found = [json.loads(p.read_text()) for p in sorted(records.glob("*.json"))]
    assert sorted(r["partition"] for r in found) == [0, 1], found
    data_roots = (tmp_path / "data", deployment.data_folder)
    for record in found:
        i = record["partition"]
        assert record["trained"] == [[e.text for e in expected[i]]]  # exactly its partition, in the simulation's order
        data_files = {Path(p) for p in record["opened"] if any(Path(p).is_relative_to(r) for r in data_roots)}
        assert data_files and all(p.parent == own[i] for p in data_files), (i, sorted(map(str, data_files)))
        assert own[i] / "train.jsonl" in data_files
