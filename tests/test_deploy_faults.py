"""Faults on a real local deployment (SuperLink + SuperNodes as separate processes on loopback, TLS, SuperNode
authentication, the tiny model): a client that raises and one that times out, a third of the SuperNodes killed
mid-run. Each run must complete and record what failed. (The black-box service restarted mid-run is part of the
deployment test in test_deploy.py.)"""

from __future__ import annotations

import json

import pytest
from flwr.common.constant import ErrorCode

from tests.deploy_support import (
    background_run,
    kill_supernode,
    supernode_id,
    supernode_log,
    tiny_deployment,
    wait_for,
    write_faulty_app,
)

pytestmark = [pytest.mark.deploy, pytest.mark.timeout(900)]


def test_a_client_that_raises_and_one_that_times_out_do_not_stop_the_round(tmp_path, tiny_model_dir):
    # Partition 0 raises, partition 1 never answers, partition 2 works (tests/deploy_support.py).
    with tiny_deployment(tmp_path, tiny_model_dir, 3, "federation.rounds=1", "federation.round_timeout_s=45",
                         "federation.min_replies=1") as (deployment, folder, run_config):
        run = background_run(deployment, folder, run_config, app=write_faulty_app(tmp_path / "faulty-app"))
        outcome = run.join()
        nodes = [supernode_id(deployment, i) for i in range(3)]
    assert outcome.status == "finished:completed", outcome
    row = run.rounds()[1]
    assert row["clients_sampled"] == 3 and row["replies"] == 1 and row["failures"] == 2
    # One valid reply of several sampled is no consensus: recorded, and the global prompt kept (issue 22).
    assert row["skipped"] == "1 valid reply of 3 sampled: one client is no consensus"
    failures = {f["node"]: f for f in row["failure_details"]}
    assert failures.keys() == {nodes[0], nodes[1]}
    assert failures[nodes[0]]["code"] == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert "RuntimeError" in failures[nodes[0]]["reason"] and "secret" not in failures[nodes[0]]["reason"]
    assert failures[nodes[1]]["code"] is None and "round_timeout_s" in failures[nodes[1]]["reason"]
    assert len(row["client_prompts"]) == 1  # the one valid reply is on record


def test_a_third_of_the_supernodes_killed_mid_run_and_the_run_completes(tmp_path, tiny_model_dir):
    with tiny_deployment(tmp_path, tiny_model_dir, 3, "federation.rounds=2", "federation.min_available_clients=2",
                         "federation.round_timeout_s=600") as (deployment, folder, run_config):
        run = background_run(deployment, folder, run_config)
        wait_for(lambda: "Receiving: train message" in supernode_log(deployment, 2).read_text(errors="replace"),
                 "SuperNode 2 receiving round 1", logs=deployment.folder)
        killed = supernode_id(deployment, 2)
        kill_supernode(deployment, 2)  # SIGKILL: it never says goodbye; the SuperLink notices its missing heartbeats
        outcome = run.join()
    assert outcome.status == "finished:completed", outcome
    first, second = run.rounds()[1:]
    assert first["clients_sampled"] == 3 and first["replies"] == 2
    assert [(f["node"], f["code"]) for f in first["failure_details"]] == [(killed, ErrorCode.NODE_UNAVAILABLE)]
    assert second["clients_sampled"] == 2 and second["replies"] == 2 and second["failures"] == 0
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["skipped_rounds"] == []
