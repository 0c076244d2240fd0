"""federation.audit_replies for every method: each strategy appends the replies it receives, as received, to
<run folder>/replies.jsonl through the one shared helper (fedprompt.fl.records.audit_replies), and writes
nothing with the audit off. Strategy level, on hand-built messages: no Flower run, no model."""

from __future__ import annotations

import base64
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from omegaconf import OmegaConf

from fedprompt.fl.records import AUDIT_FILE, audit_path, audit_replies, serialize_content
from fedprompt.registry import METHODS

ERROR_NODE = 99  # the highest node id: every strategy sees (and audits) the replies in node order


@pytest.fixture(autouse=True)
def server_identity(monkeypatch):
    # Messages take their run and sender from the process's task identity, which Flower sets in a real run.
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def sent(node: int) -> Message:
    return Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=node,
                   message_type=MessageType.TRAIN)


def answer(node: int, arrays: ArrayRecord, metrics: dict) -> Message:
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}), reply_to=sent(node))


# --- one strategy and valid replies per method family ------------------------------------------------------------

def feddtpt(path):
    from fedprompt.fl.feddtpt import FedDTPTStrategy, words_to_arrays
    from fedprompt.methods.feddtpt import AggregateConfig, FedDTPTAggregator

    vocab = ["classify", "the", "review", "sentiment"]

    class OneHot:
        def encode(self, words):
            return np.stack([np.eye(len(vocab))[vocab.index(w)] for w in words])

    strategy = FedDTPTStrategy(FedDTPTAggregator(AggregateConfig(min_samples=2, eps=0.5, attention_threshold=0),
                                                 OneHot()), audit_path=path)
    prompts = {11: ["classify", "the", "review"], 12: ["classify", "the", "sentiment"]}
    return strategy, [answer(n, words_to_arrays(p), {"queries": 4}) for n, p in prompts.items()]


def post(path):
    from fedprompt.fl.post import PromptFedAvg

    strategy = PromptFedAvg(min_train_nodes=1, min_available_nodes=1, audit_path=path)
    strategy._shape = (2, 3)  # as configure_train would have left it
    return strategy, [answer(n, ArrayRecord({"prompt": Array(np.full((2, 3), n, np.float32))}),
                             {"num-examples": n, "partition-id": i, "epsilon": 1.0}) for i, n in enumerate((11, 12))]


def rapt(path):
    from fedprompt.fl.rapt import RAPTStrategy, examples_to_arrays
    from fedprompt.methods.rapt import PrivateExample

    class Trainer:  # what RAPTStrategy needs of a RAPTTrainer
        soft_prompt = SimpleNamespace(weight=torch.zeros(2, 4))

        def __init__(self):
            self.examples = []

        def add(self, examples):
            self.examples.extend(examples)

        def train(self):
            return {"task_loss": 0.5}

    example = PrivateExample((1, 2, 3), 0, None, (1, 2))
    return RAPTStrategy(Trainer(), audit_path=path), [
        answer(n, examples_to_arrays([example], 2), {"num-examples": 1, "tokens": 3, "tokens-unchanged": 0.5})
        for n in (11, 12)]


def bbt(path):
    from fedprompt.fl.bbt import BBTStrategy, point_to_arrays

    strategy = BBTStrategy("fedbpt", 2, sigma0=0.7, min_train_nodes=1, min_available_nodes=1, audit_path=path)
    return strategy, [answer(n, point_to_arrays(np.full(2, n, np.float32), 0.5), {"num-examples": 2, "partition-id": i})
                      for i, n in enumerate((11, 12))]


def bdpl(path):
    from fedprompt.fl.bdpl import BDPLFedAvg, logits_to_arrays

    strategy = BDPLFedAvg(clients_per_round=2, audit_path=path)
    strategy._shape = (2, 3)
    return strategy, [answer(n, logits_to_arrays(np.full((2, 3), float(n))), {"num-examples": 3, "partition-id": i})
                      for i, n in enumerate((11, 12))]


FAMILIES = {"feddtpt": feddtpt, "post": post, "rapt": rapt, "bbt": bbt, "bdpl": bdpl}


def test_every_method_has_a_family_here():
    assert set(FAMILIES) == set(METHODS)


def read_audit(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_replies_are_appended_as_received_each_round(family, tmp_path):
    path = tmp_path / AUDIT_FILE
    strategy, replies = FAMILIES[family](path)
    error = Message(Error(2, "boom"), reply_to=sent(ERROR_NODE))
    strategy.aggregate_train(1, replies + [error])
    strategy.aggregate_train(2, replies[:1])

    rows = read_audit(path)
    assert [(r["round"], r["node"]) for r in rows] == [(1, 11), (1, 12), (1, ERROR_NODE), (2, 11)]
    assert {r["type"] for r in rows} == {MessageType.TRAIN}
    assert [r["error"] for r in rows] == [None, None, "boom", None] and rows[2]["content"] is None
    for row, msg in zip(rows[:2] + rows[3:], replies + replies[:1]):  # the exact bytes Flower carried
        assert base64.b64decode(row["content"]) == serialize_content(msg.content)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_nothing_is_written_with_the_audit_off(family, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    strategy, replies = FAMILIES[family](None)
    assert strategy.audit_path is None
    strategy.aggregate_train(1, replies + [Message(Error(2, "boom"), reply_to=sent(ERROR_NODE))])
    assert list(tmp_path.iterdir()) == []


def test_audit_path_follows_the_setting(tmp_path):
    def cfg(on):
        return OmegaConf.create({"federation": {"audit_replies": on}})

    assert audit_path(cfg(True), tmp_path) == tmp_path / "replies.jsonl"
    assert audit_path(cfg(False), tmp_path) is None
    assert audit_path(OmegaConf.create({"federation": {}}), tmp_path) is None
    audit_replies(None, 1, [Message(Error(2, "x"), reply_to=sent(1))])  # no path: nothing, nowhere


def test_feddtpt_audits_a_lost_node_as_the_node_it_sampled(tmp_path):
    """The SuperLink answers for a node that stopped: its error reply is audited under the sampled node's id."""
    from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

    from fedprompt.fl.feddtpt import words_to_arrays

    strategy, _ = feddtpt(tmp_path / AUDIT_FILE)
    messages = list(strategy.configure_train(1, words_to_arrays(["classify"]), ConfigRecord(),
                                             SimpleNamespace(get_node_ids=lambda: [11, 12],
                                                             send_and_receive=lambda m, timeout=None: [])))
    for msg in messages:  # the ids the Grid gives them when it sends them
        msg.metadata.__dict__["_message_id"] = msg.object_id
    lost = create_message_error_unavailable_res_message(messages[1].metadata, "node_unavail")
    strategy.aggregate_train(1, [Message(RecordDict({"arrays": words_to_arrays(["classify"])}), reply_to=messages[0]),
                                 lost])
    rows = read_audit(tmp_path / AUDIT_FILE)
    assert [(r["node"], r["error"] is None) for r in rows] == [(11, True), (12, False)]


def test_bdpl_audits_the_partition_answers_too(tmp_path):
    """BDPL asks every node its partition id once: those answers are client-to-server messages as well."""
    from fedprompt.fl.bdpl import BDPLFedAvg, logits_to_arrays
    from fedprompt.fl.strategy import PARTITION_QUERY

    class Grid:
        def get_node_ids(self):
            return [5, 7]

        def send_and_receive(self, messages, timeout=None):
            return [Message(RecordDict({"metrics": MetricRecord({"partition-id": i})}), reply_to=m)
                    for i, m in enumerate(messages)]

    strategy = BDPLFedAvg(clients_per_round=1, min_available_nodes=2, audit_path=tmp_path / AUDIT_FILE)
    for server_round in (1, 2):  # asked once per run
        strategy.configure_train(server_round, logits_to_arrays(np.zeros((2, 3))), ConfigRecord(), Grid())
    rows = read_audit(tmp_path / AUDIT_FILE)
    assert [(r["round"], r["node"], r["type"]) for r in rows] == [(1, 5, PARTITION_QUERY), (1, 7, PARTITION_QUERY)]
    assert all(r["error"] is None and r["content"] for r in rows)
