"""POST on Flower: what a client sends (prompt and numbers, never its text), its cumulative epsilon across
rounds (context.state), FedAvg weighted by examples, and one real `fedprompt run method=post`."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedprompt import cli
from fedprompt.config import compose
from fedprompt.fl import client_app
from fedprompt.fl.config import RUN_CONFIG_KEY, serialize_config
from fedprompt.fl.post.records import PRIVACY_STATE, REPLY_METRICS, arrays_to_prompt
from fedprompt.fl.post.strategy import PromptFedAvg
from fedprompt.fl.records import serialize_content
from fedprompt.models import SoftPrompt
from tests.fl_support import find_leaks, write_secret_task

HIDDEN = 32  # the tiny Llama's hidden size


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


def test_a_dp_client_replies_prompt_and_numbers_and_its_epsilon_grows(server_identity, tmp_path, tiny_model_dir):
    run_config = run_config_for(tmp_path, tiny_model_dir, "method.privacy.epsilon=8")
    context = Context(run_id=1, node_id=10, state=RecordDict(), run_config=run_config,
                      node_config={"partition-id": 0, "num-partitions": 2})
    weight = np.random.default_rng(0).normal(size=(4, HIDDEN)).astype(np.float32) * 0.02
    epsilons = []
    for server_round in (1, 2):
        msg = train_message(10, server_round, weight)
        reply = client_app.app(msg, context)
        assert not reply.has_error(), reply.error.reason
        assert set(reply.content.keys()) == {"arrays", "metrics"}
        assert set(reply.content["arrays"].keys()) == {"prompt"}
        metrics = reply.content["metrics"]
        assert set(metrics.keys()) <= set(REPLY_METRICS)
        assert metrics["num-examples"] == 8 and metrics["steps"] == 2 and metrics["delta"] == pytest.approx(1 / 8)
        epsilons.append(metrics["epsilon"])
        weight = arrays_to_prompt(reply.content["arrays"]).weight.detach().numpy()
        wire = serialize_content(reply.content)
        assert weight.tobytes() in wire  # the capture holds the payload: the scan below is not vacuous
        assert find_leaks(wire) == []
    assert 0 < epsilons[0] < epsilons[1] <= 8.01
    assert list(context.state[PRIVACY_STATE]["steps"]) == [4]  # the accountant's history: 2 rounds x 2 steps


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
    assert [r["round"] for r in csv.DictReader((out / "rounds.csv").open())] == ["0", "1", "2"]
    prompt_file = out / "prompt.safetensors"
    from fedprompt.methods.post import load_prompt

    prompt, meta = load_prompt(prompt_file)
    assert isinstance(prompt, SoftPrompt) and prompt.weight.shape == (4, HIDDEN) and meta["task"] == "secret"


@pytest.mark.parametrize("extra, message", [
    (["method.privacy.epsilon=8", "method.train.batch_size=9"], "cannot sample batches of 9"),
    (["method.prompt.num_tokens=600"], "exceeds the model's context of 512"),
    (["method.train.lr=0"], "method.train.lr must be > 0"),
    (["+method.train.nesterov=true"], "unknown key method.train.nesterov"),
    (["method.model=student"], "no student of"),
])
def test_bad_post_input_is_one_line_before_anything_expensive(capsys, tmp_path, tiny_model_dir, monkeypatch, extra,
                                                              message):
    monkeypatch.setattr("fedprompt.fl.launch.local_superlink", lambda *a, **k: pytest.fail("Flower started"))
    monkeypatch.setenv("FEDPROMPT_CACHE_DIR", str(tmp_path / "cache"))
    code = cli.main(["run", *post_overrides(write_secret_task(tmp_path), tiny_model_dir, *extra)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1
