"""The ClientApp called directly on constructed Messages: what a client sends back, and what it never sends."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedprompt.config import compose
from fedprompt.fl import client_app
from fedprompt.fl.feddtpt import REPLY_METRICS, arrays_to_words, words_to_arrays
from fedprompt.fl.records import serialize_content
from fedprompt.runs.run_config import RUN_CONFIG_KEY, serialize_config
from tests.fl_support import TRAIN_TEXTS, find_leaks, tiny_overrides, write_secret_task

PROMPT = ["Classify", "the", "text", "as", "one", "of:", "negative,", "positive."]


@pytest.fixture
def server_identity(monkeypatch):
    # Messages take their run and sender from the process's task identity, which Flower sets in a real run.
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


@pytest.fixture
def run_config(tmp_path, tiny_model_dir):
    cfg = compose(tiny_overrides(write_secret_task(tmp_path), tiny_model_dir))
    return {RUN_CONFIG_KEY: serialize_config(cfg)}


def train_message(node_id: int, server_round: int = 1, prompt=PROMPT) -> Message:
    content = RecordDict({"arrays": words_to_arrays(prompt), "config": ConfigRecord({"server-round": server_round})})
    return Message(content, dst_node_id=node_id, message_type=MessageType.TRAIN)


def call_client(run_config, partition_id: int, msg: Message) -> Message:
    context = Context(run_id=1, node_id=msg.metadata.dst_node_id, state=RecordDict(), run_config=run_config,
                      node_config={"partition-id": partition_id, "num-partitions": 2})
    return client_app.app(msg, context)


def test_leak_detector_finds_training_text_however_it_is_split():
    words = TRAIN_TEXTS[3].split()
    assert find_leaks(" ".join(words[1:4]).encode())
    assert find_leaks("\n".join(words[2:5]).encode())  # e.g. smuggled in as prompt words
    assert find_leaks(b"\x00\x12" + TRAIN_TEXTS[0].encode() + b"\x07")
    assert not find_leaks(" ".join(words[1:3]).encode() + b" and " + words[3].encode())


def test_reply_carries_the_prompt_and_numbers_only(server_identity, run_config):
    for partition_id in (0, 1):
        msg = train_message(node_id=10 + partition_id)
        reply = call_client(run_config, partition_id, msg)
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        assert reply.metadata.reply_to_message_id == msg.metadata.message_id
        assert set(reply.content.keys()) == {"arrays", "metrics"}
        assert set(reply.content["arrays"].keys()) == {"prompt"}
        assert set(reply.content["metrics"].keys()) <= set(REPLY_METRICS)
        prompt = arrays_to_words(reply.content["arrays"])
        assert prompt and all(w.strip() == w for w in prompt)
        metrics = reply.content["metrics"]
        assert 0 < metrics["queries"] <= 60  # method.search.budget
        assert 0.0 <= metrics["local-accuracy"] <= 1.0
        wire = serialize_content(reply.content)
        assert " ".join(prompt).encode() in wire  # the capture holds the payload: the scan below is not vacuous
        assert find_leaks(wire) == []


def test_a_failing_client_replies_an_error_without_its_data(server_identity, run_config, monkeypatch):
    def fail(*args, **kwargs):
        raise ValueError(f"cannot score example {TRAIN_TEXTS[0]!r}")  # an error message that quotes local data

    monkeypatch.setattr("fedprompt.methods.feddtpt.search.PromptSearch.run", fail)
    reply = call_client(run_config, 0, train_message(node_id=10))
    assert reply.has_error()
    assert "ValueError" in reply.error.reason
    assert find_leaks(reply.error.reason.encode()) == []


def test_more_supernodes_than_configured_clients_is_an_error_reply(server_identity, run_config):
    msg = train_message(node_id=10)
    context = Context(run_id=1, node_id=10, state=RecordDict(), run_config=run_config,
                      node_config={"partition-id": 0, "num-partitions": 3})
    assert client_app.app(msg, context).has_error()
