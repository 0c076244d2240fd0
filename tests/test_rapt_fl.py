"""RAPT on Flower, and FedDTPT's privatize switch: what leaves a client is privatized, never its raw text."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

import fedprompt.blackbox
from fedprompt import cli
from fedprompt.config import compose
from fedprompt.errors import ConfigError
from fedprompt.fl import client_app
from fedprompt.fl.feddtpt import words_to_arrays
from fedprompt.fl.rapt import DATA_KEYS, REPLY_METRICS, SOFT_PROMPT, RAPTStrategy, arrays_to_examples, examples_to_arrays
from fedprompt.fl.records import serialize_content
from fedprompt.methods.rapt import PrivateExample
from fedprompt.runs.report import RoundStats
from fedprompt.runs.run_config import RUN_CONFIG_KEY, serialize_config
from tests.fl_support import TRAIN_TEXTS, find_leaks, tiny_overrides, write_secret_task
from tests.rapt_support import one_thread, tiny_lm  # noqa: F401 - fixtures


@pytest.fixture
def server_identity(monkeypatch):
    # Messages take their run and sender from the process's task identity, which Flower sets in a real run.
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def rapt_overrides(data_dir: Path, model_dir: Path, eta: str = "1.0") -> list[str]:
    """A RAPT run that costs seconds: the tiny model, strong noise (eta=1 on its 32-d embedding), 2 steps."""
    return [f"data_dir={data_dir}", "task=secret", f"model={model_dir}", "method=rapt", f"method.privatize.eta={eta}",
            "method.reconstruction.plain_tokens=4", "method.prompt.num_tokens=2", "method.train.steps=2",
            "method.train.batch_size=4", "federation.num_clients=2", "federation.rounds=1", "federation.public_size=4",
            "partition=iid", "partition.k_shot=null", "progress=false"]


def call_client(overrides: list[str], partition_id: int, prompt=None) -> Message:
    run_config = {RUN_CONFIG_KEY: serialize_config(compose(overrides))}
    arrays = prompt if prompt is not None else ArrayRecord()
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})})
    msg = Message(content, dst_node_id=10 + partition_id, message_type=MessageType.TRAIN)
    context = Context(run_id=1, node_id=10 + partition_id, state=RecordDict(), run_config=run_config,
                      node_config={"partition-id": partition_id, "num-partitions": 2})
    return client_app.app(msg, context)


def test_a_rapt_client_sends_privatized_ids_only(server_identity, tmp_path, tiny_model_dir, tiny_lm):
    _, tokenizer = tiny_lm
    data = write_secret_task(tmp_path)
    for eta in ("1.0", "inf"):  # inf: no noise, the positive control that shows the scan can find the text
        sent, decoded = 0, []
        for partition_id in (0, 1):
            reply = call_client(rapt_overrides(data, tiny_model_dir, eta), partition_id)
            assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
            assert set(reply.content.keys()) == {"arrays", "metrics"}
            assert set(reply.content["arrays"].keys()) == set(DATA_KEYS)
            assert set(reply.content["metrics"].keys()) == set(REPLY_METRICS)
            wire = serialize_content(reply.content)
            assert find_leaks(wire) == []
            examples = arrays_to_examples(reply.content["arrays"])
            sent += len(examples)
            assert all(len(e.plain) == 4 and len(e.ids) > 4 for e in examples)
            decoded += [tokenizer.decode(e.ids[4:]) for e in examples]
        assert sent == len(TRAIN_TEXTS)  # one round: every example goes, once
        leaks = find_leaks("\n".join(decoded).encode())
        assert (leaks == []) if eta == "1.0" else (len(leaks) >= len(TRAIN_TEXTS))


def capture_blackbox_texts(monkeypatch) -> list[str]:
    """Every text any black box made from now on receives."""
    import fedprompt.fl.feddtpt as feddtpt_client

    feddtpt_client.CLIENT.clear()
    seen: list[str] = []
    real = fedprompt.blackbox.make_blackbox

    def make(*args, **kwargs):
        blackbox = real(*args, **kwargs)
        classify = blackbox.classify
        blackbox.classify = lambda texts, labels, labels_only=False: seen.extend(texts) or classify(texts, labels, labels_only)
        return blackbox

    monkeypatch.setattr(fedprompt.blackbox, "make_blackbox", make)
    return seen


def test_feddtpt_privatize_switch_keeps_raw_text_from_the_black_box(server_identity, monkeypatch, tmp_path, tiny_model_dir):
    data = write_secret_task(tmp_path)
    prompt = words_to_arrays(["Classify", "the", "text", "as", "negative", "or", "positive."])
    for switch, leaks_expected in (([], True), (["method.privatize.eta=1.0"], False)):
        seen = capture_blackbox_texts(monkeypatch)
        for partition_id in (0, 1):
            reply = call_client([*tiny_overrides(data, tiny_model_dir), *switch], partition_id, prompt)
            assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        assert seen  # the search did query the black box
        leaks = find_leaks("\n".join(seen).encode())
        assert bool(leaks) == leaks_expected, leaks[:3]


def test_rapt_runs_through_flwr_run(capsys, monkeypatch, tmp_path, tiny_model_dir):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the app processes: see tests/rapt_support.py
    out = tmp_path / "run"
    args = [*rapt_overrides(write_secret_task(tmp_path / "data"), tiny_model_dir), "federation.rounds=2",
            "federation.eval_limit=8", f"output_dir={out}"]
    code = cli.main(["run", *args])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr[-3000:]
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["method"] == "rapt" and result["rounds"] == 2 and result["failures"] == 0
    assert result["examples_received"] == len(TRAIN_TEXTS) and result["train_steps"] == 4
    assert result["eval_n"] == 8 and 0.0 <= result["final_accuracy"] <= 1.0
    # the untuned references, scored on the same privatized queries, the reference chosen on validation
    assert result["reference_kind"] in ("manual", "zero-shot") and result["reference_choice"]["n"] == 8
    assert 0.0 <= result["manual_accuracy"] <= 1.0 and 0.0 <= result["zero_shot_accuracy"] <= 1.0
    rounds = json.loads((out / "rounds.json").read_text())
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert sum(r["client_metrics"]["examples-received"] for r in rounds[1:]) == len(TRAIN_TEXTS)
    assert all(r["bytes_up"] > 0 for r in rounds[1:])
    prompt = torch.load(out / "soft_prompt.pt")
    assert prompt.shape == (2, 32) and np.isfinite(prompt.numpy()).all()


class FakeTrainer:
    """What RAPTStrategy needs of a RAPTTrainer, without a model."""

    def __init__(self) -> None:
        from fedprompt.models import SoftPrompt

        self.soft_prompt, self.examples, self.trained = SoftPrompt(2, 4), [], 0

    def add(self, examples) -> None:
        if any(e.label < 0 for e in examples):
            raise ConfigError("bad label")
        self.examples.extend(examples)

    def train(self) -> dict:
        self.trained += 1
        return {"task_loss": 0.5, "steps": 2}


def sent(node: int) -> Message:
    return Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=node, message_type=MessageType.TRAIN)


def reply(node: int, examples, unchanged: float, pid: int = 0) -> Message:
    metrics = {"num-examples": len(examples), "tokens": 10 * len(examples), "tokens-unchanged": unchanged, "privatize-s": 0.1,
               "partition-id": pid}
    return Message(RecordDict({"arrays": examples_to_arrays(examples, 2), "metrics": MetricRecord(metrics)}), reply_to=sent(node))


def test_the_strategy_trains_on_valid_replies_and_records_the_rest(server_identity):
    strategy = RAPTStrategy(FakeTrainer())
    strategy.rounds[1] = RoundStats(sampled=5)  # as configure_train would have left it
    good = [PrivateExample((1, 2, 3), 0, None, (1, 2)), PrivateExample((4, 5, 6, 7), 1, None, (4, 5))]
    bad_label = [PrivateExample((1, 2, 3), -1, None, (1, 2))]
    replies = [reply(13, good, 0.2, pid=0), Message(Error(2, "boom"), reply_to=sent(99)), reply(12, bad_label, 0.0, pid=1),
               reply(11, good[:1], 0.5, pid=2)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert torch.equal(torch.from_numpy(arrays[SOFT_PROMPT].numpy()), strategy.trainer.soft_prompt.weight.detach())
    # pooled in partition order (0, then 2), not in node-id order (11, then 13): node ids are random per run
    assert strategy.trainer.examples == good + good[:1] and strategy.trainer.trained == 1
    stats = strategy.rounds[1]
    assert stats.replies == 2 and stats.missing == 1
    assert [f["node"] for f in stats.failures] == [12, 99] and "malformed" in stats.failures[0]["reason"]
    assert metrics["examples-received"] == 3 and metrics["tokens-unchanged"] == pytest.approx((10 * 0.5 + 20 * 0.2) / 30)
    assert metrics["task_loss"] == 0.5


def test_no_examples_yet_keeps_the_prompt(server_identity):
    strategy = RAPTStrategy(FakeTrainer())
    assert strategy.aggregate_train(1, [Message(Error(2, "x"), reply_to=sent(11))]) == (None, None)
    assert strategy.trainer.trained == 0


def test_the_pool_follows_the_partition_ids_whatever_the_node_ids(server_identity):
    """Flower draws node ids at random per run; the pool (and so the batches a seed draws) must not depend on them."""
    shares = [[PrivateExample((1, 2, 3 + p), p % 2, None, (1, 2))] for p in range(3)]

    def pool(nodes):
        strategy = RAPTStrategy(FakeTrainer())
        strategy.aggregate_train(1, [reply(node, shares[p], 0.0, pid=p) for p, node in enumerate(nodes)])
        return strategy.trainer.examples

    expected = shares[0] + shares[1] + shares[2]
    assert pool([30, 20, 10]) == pool([10, 30, 20]) == pool([20, 10, 30]) == expected


@pytest.mark.parametrize("min_replies, skipped", [(2, True), (1, False)])
def test_a_round_with_fewer_valid_replies_than_min_replies_pools_and_trains_nothing(server_identity, min_replies, skipped):
    strategy = RAPTStrategy(FakeTrainer(), min_replies=min_replies)
    earlier = [PrivateExample((7, 8, 9), 1, None, (7, 8))]
    strategy.trainer.examples.extend(earlier)  # pooled in an earlier round
    strategy.rounds[2] = RoundStats(sampled=2)
    new = [PrivateExample((1, 2, 3), 0, None, (1, 2))]
    arrays, metrics = strategy.aggregate_train(2, [reply(11, new, 0.0, pid=0), Message(Error(2, "lost"), reply_to=sent(12))])
    stats = strategy.rounds[2]
    assert stats.replies == 1 and len(stats.failures) == 1
    if skipped:
        assert arrays is None and strategy.trainer.trained == 0 and strategy.trainer.examples == earlier
        assert stats.skipped == "1 valid replies < federation.min_replies=2"
        assert metrics["examples-received"] == 1 and metrics["examples-pooled"] == 1
    else:
        assert arrays is not None and strategy.trainer.trained == 1 and strategy.trainer.examples == earlier + new
        assert stats.skipped is None
