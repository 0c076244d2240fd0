"""POST on Flower: what a client sends (prompt and numbers, never its text; with DP the noisy prompt and public
numbers only), its cumulative epsilon across rounds (context.state), FedAvg weighted by examples, the run's
privacy summary, deploy's refusal of replayable noise, and one real `fedprompt run method=post`."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedprompt import cli
from fedprompt.commands import deploy
from fedprompt.config import compose
from fedprompt.fl import client_app
from fedprompt.fl.post import (
    DP_REPLY_METRICS,
    LOCAL_LOG,
    PRIVACY_STATE,
    REPLY_METRICS,
    PromptFedAvg,
    local_totals,
    privacy_summary,
    soft_prompt,
)
from fedprompt.fl.records import serialize_content
from fedprompt.models import SoftPrompt
from fedprompt.runs.run_config import RUN_CONFIG_KEY, serialize_config
from tests.fl_support import find_leaks, write_secret_task

HIDDEN = 32  # the tiny Llama's hidden size
PRIVATE = {"loss", "tokens", "examples-seen", "empty-batches", "train-s", "local-accuracy", "accuracy"}  # from the data


def post_overrides(data_dir, model_dir, *extra: str) -> list[str]:
    """A POST run that costs seconds: the tiny model as large model and as the tuned-on model."""
    return [f"data_dir={data_dir}", "task=secret", f"model={model_dir}", "method=post", f"method.model={model_dir}",
            "method.prompt.num_tokens=4", "method.train.local_steps=2", "method.train.batch_size=4",
            "federation.num_clients=2", "federation.rounds=2", "partition=iid", "partition.k_shot=null",
            "progress=false", *extra]


@pytest.fixture
def server_identity(monkeypatch):
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def run_config_for(tmp_path, tiny_model_dir, *extra: str) -> dict:
    cfg = compose(post_overrides(write_secret_task(tmp_path), tiny_model_dir, *extra))
    return {RUN_CONFIG_KEY: serialize_config(cfg)}


def train_message(node_id: int, server_round: int, weight: np.ndarray) -> Message:
    content = RecordDict({"arrays": ArrayRecord({"prompt": Array(weight)}),
                          "config": ConfigRecord({"server-round": server_round})})
    return Message(content, dst_node_id=node_id, message_type=MessageType.TRAIN)


def client_context(run_config: dict) -> Context:
    return Context(run_id=1, node_id=10, state=RecordDict(), run_config=run_config,
                   node_config={"partition-id": 0, "num-partitions": 2})


def test_a_dp_client_replies_its_noisy_prompt_and_public_numbers_and_its_epsilon_grows(server_identity, tmp_path,
                                                                                     tiny_model_dir):
    out = tmp_path / "run"
    context = client_context(run_config_for(tmp_path, tiny_model_dir, "method.privacy.epsilon=8", f"output_dir={out}"))
    weight = np.random.default_rng(0).normal(size=(4, HIDDEN)).astype(np.float32) * 0.02
    epsilons = []
    for server_round in (1, 2):
        msg = train_message(10, server_round, weight)
        reply = client_app.app(msg, context)
        assert not reply.has_error(), reply.error.reason
        assert set(reply.content.keys()) == {"arrays", "metrics"}
        assert set(reply.content["arrays"].keys()) == {"prompt"}
        metrics = reply.content["metrics"]
        assert set(metrics.keys()) == set(DP_REPLY_METRICS) and not PRIVATE & set(metrics.keys())
        assert metrics["num-examples"] == 8 and metrics["steps"] == 2 and metrics["delta"] == pytest.approx(1e-5)
        epsilons.append(metrics["epsilon"])
        weight = soft_prompt(reply.content["arrays"]).weight.detach().numpy()
        wire = serialize_content(reply.content)
        assert weight.tobytes() in wire  # the capture holds the payload: the scan below is not vacuous
        assert find_leaks(wire) == []
    assert 0 < epsilons[0] < epsilons[1] <= 8.01
    assert list(context.state[PRIVACY_STATE]["steps"]) == [4]  # the accountant's history: 2 rounds x 2 steps
    kept = json.loads((out / "clients" / "0" / LOCAL_LOG).read_text())  # what the client kept to itself
    assert sorted(kept) == ["1", "2"] and {"loss", "tokens", "train-s", "examples-seen"} <= set(kept["1"])
    assert kept["1"]["tokens"] > 0 and local_totals(out)["tokens"] == kept["1"]["tokens"] + kept["2"]["tokens"]


def test_a_client_without_dp_keeps_reporting_its_training_numbers(server_identity, tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    context = client_context(run_config_for(tmp_path, tiny_model_dir, f"output_dir={out}"))
    reply = client_app.app(train_message(10, 1, np.zeros((4, HIDDEN), np.float32)), context)
    assert not reply.has_error(), reply.error.reason
    metrics = reply.content["metrics"]
    assert {"loss", "tokens", "train-s", "examples-seen", "num-examples", "steps"} <= set(metrics.keys())
    assert set(metrics.keys()) <= set(REPLY_METRICS) and "epsilon" not in metrics and metrics["tokens"] > 0
    assert not (out / "clients" / "0" / LOCAL_LOG).exists()


def test_the_server_averages_prompts_weighted_by_examples_and_skips_failures(server_identity):
    strategy = PromptFedAvg(min_train_nodes=1, min_available_nodes=1)
    strategy._shape = (2, 3)
    replies = []
    for node, (value, n) in enumerate([(1.0, 1), (4.0, 3)]):
        content = RecordDict({"arrays": ArrayRecord({"prompt": Array(np.full((2, 3), value, dtype=np.float32))}),
                              "metrics": MetricRecord({"num-examples": n, "partition-id": node, "loss": value,
                                                       "epsilon": value})})
        replies.append(Message(content, reply_to=train_message(node, 1, np.zeros((2, 3), np.float32))))
    replies.append(Message(Error(code=0, reason="boom"), reply_to=train_message(7, 1, np.zeros((2, 3), np.float32))))
    arrays, metrics = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["prompt"].numpy(), np.full((2, 3), (1.0 * 1 + 4.0 * 3) / 4))
    stats = strategy.rounds[1]
    assert stats.replies == 2 and len(stats.failures) == 1
    assert metrics["epsilon-max"] == 4.0 and [c["epsilon"] for c in stats.aggregation["clients"]] == [1.0, 4.0]


def test_dp_replies_without_loss_or_costs_are_averaged_and_their_guarantee_is_the_largest(server_identity):
    strategy = PromptFedAvg(min_train_nodes=1, min_available_nodes=1)
    strategy._shape = (2, 3)
    replies = []
    for node, (n, epsilon, delta) in enumerate([(8, 2.0, 1e-5), (24, 1.5, 4e-6)]):
        metrics = MetricRecord({"num-examples": n, "partition-id": node, "steps": 2, "epsilon": epsilon, "delta": delta,
                                "noise-multiplier": 1.0})
        content = RecordDict({"arrays": ArrayRecord({"prompt": Array(np.full((2, 3), n, dtype=np.float32))}),
                              "metrics": metrics})
        replies.append(Message(content, reply_to=train_message(node, 1, np.zeros((2, 3), np.float32))))
    arrays, metrics = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["prompt"].numpy(), np.full((2, 3), (8 * 8 + 24 * 24) / 32))
    assert "loss" not in metrics and "tokens" not in metrics and "train-s" not in metrics  # no made-up zeros
    assert metrics["steps"] == 4 and metrics["epsilon-max"] == 2.0 and metrics["delta-max"] == 1e-5


def test_the_privacy_summary_holds_each_clients_last_epsilon_and_delta_and_the_largest():
    def row(*clients):
        return {"aggregation": {"clients": [{"partition-id": p, "epsilon": e, "delta": d} for p, e, d in clients]}}

    rows = [{"round": 0}, row((0, 1.0, 1e-5), (2, 0.5, 2e-6)), row((0, 2.0, 1e-5))]  # client 1 never replied
    assert privacy_summary(rows, 3) == {"epsilon_per_client": [2.0, None, 0.5], "delta_per_client": [1e-5, None, 2e-6],
                                        "epsilon": 2.0, "delta": 1e-5}
    assert privacy_summary([{"round": 0}], 2)["epsilon"] is None


def test_fedprompt_run_method_post_through_flwr_run(capsys, tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    args = post_overrides(write_secret_task(tmp_path / "data"), tiny_model_dir, "method.privacy.epsilon=8",
                          f"output_dir={out}")
    code = cli.main(["run", *args])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr[-3000:]
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["rounds"] == 2 and result["failures"] == 0 and result["client_replies"] == 4
    assert 0 < result["epsilon"] <= 8.01
    rows = json.loads((out / "rounds.json").read_text())
    per_client = [[c["epsilon"] for c in row["aggregation"]["clients"]] for row in rows[1:]]
    assert all(a < b for a, b in zip(per_client[0], per_client[1]))  # each client's epsilon grows across rounds
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epsilon_per_client"] == per_client[-1] and summary["epsilon"] == max(per_client[-1])
    assert summary["delta_per_client"] == [1e-5, 1e-5] and summary["delta"] == 1e-5
    assert summary["noise_seed"] == "simulation" and summary["client_tokens"] is None  # not released under DP
    assert all(not PRIVATE & set(c) for row in rows[1:] for c in row["aggregation"]["clients"])
    assert "loss" not in rows[-1]["client_metrics"] and local_totals(out)["tokens"] > 0
    assert [r["round"] for r in csv.DictReader((out / "rounds.csv").open())] == ["0", "1", "2"]
    prompt_file = out / "prompt.safetensors"
    from fedprompt.methods.post import load_prompt

    prompt, meta = load_prompt(prompt_file)
    assert isinstance(prompt, SoftPrompt) and prompt.weight.shape == (4, HIDDEN) and meta["task"] == "secret"


@pytest.mark.parametrize("extra, message", [
    (["method.privacy.epsilon=8", "method.train.batch_size=9"], "cannot sample batches of 9"),
    (["method.prompt.num_tokens=600"], "exceeds the model's context of 512"),
    (["method.train.lr=0"], "method.train.lr must be > 0"),
    (["+method.train.nesterov=true"], "unknown config key 'method.train.nesterov'"),
    (["method.model=student"], "no student of"),
    (["method.privacy.noise_seed=urandom"], "privacy.noise_seed='urandom' is not one of"),
])
def test_bad_post_input_is_one_line_before_anything_expensive(capsys, tmp_path, tiny_model_dir, monkeypatch, extra,
                                                              message):
    monkeypatch.setattr("fedprompt.commands.launch.local_superlink", lambda *a, **k: pytest.fail("Flower started"))
    monkeypatch.setenv("FEDPROMPT_CACHE_DIR", str(tmp_path / "cache"))
    code = cli.main(["run", *post_overrides(write_secret_task(tmp_path), tiny_model_dir, *extra)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1


@pytest.fixture
def nothing_starts(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded or a deployment started")

    monkeypatch.setattr("fedprompt.models.load_causal_lm", refuse)
    monkeypatch.setattr(deploy.LocalDeployment, "__enter__", refuse)
    monkeypatch.setattr(deploy, "submit_run", refuse)


def test_deploy_refuses_seeded_dp_noise_in_one_line_before_anything_starts(capsys, tmp_path, tiny_model_dir,
                                                                          nothing_starts):
    args = ["deploy", *post_overrides(write_secret_task(tmp_path), tiny_model_dir, "method.privacy.epsilon=8")]
    code = cli.main(args)
    err = capsys.readouterr().err
    assert code == 2 and "method.privacy.noise_seed=simulation" in err and "noise_seed=secure" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    with pytest.raises(AssertionError, match="a deployment started"):  # secure noise passes the check
        cli.main([*args, "method.privacy.noise_seed=secure", f"output_dir={tmp_path / 'run'}"])
