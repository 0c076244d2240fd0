"""FedDTPTStrategy on hand-built messages: sampling, message layout, aggregation, failed replies."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedprompt.fl.feddtpt import FedDTPTStrategy, RoundStats, arrays_to_words, words_to_arrays
from fedprompt.fl.records import record_bytes
from fedprompt.methods.feddtpt import AggregateConfig, FedDTPTAggregator

# One-hot "embeddings": identical words are the only neighbours, so DBSCAN keeps exactly the shared words.
VOCAB = ["classify", "the", "review", "sentiment", "please", "label", "mood", "text"]
PROMPTS = {11: ["classify", "the", "review"], 12: ["classify", "the", "sentiment"], 13: ["please", "the", "review"]}


class OneHot:
    def encode(self, words):
        return np.stack([np.eye(len(VOCAB))[VOCAB.index(w)] for w in words])


class FakeGrid:
    def __init__(self, nodes):
        self.nodes = list(nodes)

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, timeout=None):
        return []  # no node answers the partition query: sampled by node ids


@pytest.fixture(autouse=True)
def server_identity(monkeypatch):
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def make_strategy(**kwargs) -> FedDTPTStrategy:
    aggregator = FedDTPTAggregator(AggregateConfig(min_samples=2, eps=0.5, attention_threshold=0), OneHot())
    return FedDTPTStrategy(aggregator, **kwargs)


def sent(node: int) -> Message:
    return Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=node,
                   message_type=MessageType.TRAIN)


def reply(node: int, prompt, queries: int, accuracy: float) -> Message:
    content = RecordDict({"arrays": words_to_arrays(prompt),
                          "metrics": MetricRecord({"queries": queries, "local-accuracy": accuracy})})
    return Message(content, reply_to=sent(node))


def test_aggregate_train_merges_valid_replies_and_records_failures(tmp_path):
    strategy = make_strategy(audit_path=tmp_path / "replies.jsonl")
    strategy.rounds[1] = RoundStats(sampled=5)  # as configure_train would have left it
    replies = [reply(13, PROMPTS[13], 40, 0.5), Message(Error(2, "boom"), reply_to=sent(99)),
               reply(11, PROMPTS[11], 60, 1.0), reply(12, PROMPTS[12], 50, 0.75)]
    arrays, metrics = strategy.aggregate_train(1, replies)

    expected = FedDTPTAggregator(AggregateConfig(min_samples=2, eps=0.5, attention_threshold=0), OneHot()).aggregate(
        sorted(PROMPTS.values(), key=" ".join))  # replies go to the aggregator in text order
    assert arrays_to_words(arrays) == expected.prompt
    assert set(expected.prompt) == {"classify", "the", "review"}  # each word at least two clients used
    assert metrics["queries"] == 150 and metrics["local-accuracy"] == pytest.approx(0.75)
    stats = strategy.rounds[1]
    assert stats.replies == 3 and stats.missing == 1  # 5 sampled, 4 answered (one with an error)
    assert stats.failures == [{"node": 99, "code": 2, "reason": "boom"}]
    assert stats.bytes_up == sum(record_bytes(m.content) for m in replies if not m.has_error())
    assert stats.client_prompts == sorted(" ".join(p) for p in PROMPTS.values())
    audit = [json.loads(line) for line in (tmp_path / "replies.jsonl").read_text().splitlines()]
    assert [row["node"] for row in audit] == [11, 12, 13, 99] and audit[-1]["error"] == "boom"


def test_node_ids_and_reply_order_do_not_change_the_result():
    a = make_strategy().aggregate_train(1, [reply(n, PROMPTS[n], 1, 1.0) for n in (11, 12, 13)])
    renamed = {11: 905, 12: 3, 13: 77}  # another run draws other node ids for the same clients
    b = make_strategy().aggregate_train(1, [reply(renamed[n], PROMPTS[n], 1, 1.0) for n in (13, 11, 12)])
    assert arrays_to_words(a[0]) == arrays_to_words(b[0])


def test_only_failures_keep_the_global_prompt():
    strategy = make_strategy()
    malformed = Message(RecordDict({"metrics": MetricRecord({"queries": 1})}), reply_to=sent(12))
    arrays, metrics = strategy.aggregate_train(2, [Message(Error(2, "x"), reply_to=sent(11)), malformed])
    assert arrays is None and metrics is None  # Strategy.start then keeps the previous global prompt
    assert [f["node"] for f in strategy.rounds[2].failures] == [11, 12]


def test_configure_train_samples_seeded_and_sends_prompt_and_round():
    nodes = [2**63 + 5, 17, 2**64 - 1, 3]  # node ids are unsigned 64-bit
    strategy = make_strategy(fraction_train=0.5, seed=7)
    arrays = words_to_arrays(["classify", "the", "review"])
    first = list(strategy.configure_train(1, arrays, ConfigRecord(), FakeGrid(nodes)))
    again = list(make_strategy(fraction_train=0.5, seed=7).configure_train(1, arrays, ConfigRecord(), FakeGrid(nodes)))
    targets = [m.metadata.dst_node_id for m in first]
    assert len(targets) == 2 and set(targets) <= set(nodes)
    assert targets == [m.metadata.dst_node_id for m in again]
    for msg in first:
        assert msg.metadata.message_type == MessageType.TRAIN
        assert arrays_to_words(msg.content["arrays"]) == ["classify", "the", "review"]
        assert msg.content["config"]["server-round"] == 1
    assert strategy.rounds[1].sampled == 2 and strategy.rounds[1].bytes_down == 2 * record_bytes(first[0].content)
    assert list(strategy.configure_evaluate(1, arrays, ConfigRecord(), FakeGrid(nodes))) == []


def test_min_train_nodes_wins_over_a_small_fraction():
    strategy = make_strategy(fraction_train=0.1, min_train_nodes=3)
    msgs = strategy.configure_train(1, words_to_arrays(["x"]), ConfigRecord(), FakeGrid(range(1, 11)))
    assert len(list(msgs)) == 3


def test_prompt_encoding_round_trips_and_rejects_whitespace():
    words = ["Classify", "über", "text:", "négatif"]
    assert arrays_to_words(words_to_arrays(words)) == words
    with pytest.raises(ValueError):
        words_to_arrays(["two words"])
    assert arrays_to_words(words_to_arrays([])) == []  # the empty prompt: zero-shot


def _sent_by_the_grid(strategy: FedDTPTStrategy, nodes) -> list[Message]:
    """configure_train's messages with the ids the Grid gives them when it sends them."""
    messages = list(strategy.configure_train(1, words_to_arrays(["classify"]), ConfigRecord(), FakeGrid(nodes)))
    for msg in messages:
        msg.metadata.__dict__["_message_id"] = msg.object_id
    return messages


@pytest.mark.parametrize("min_replies, why", [
    (1, "1 valid reply of 4 sampled: one client is no consensus"),
    (2, "1 valid replies < federation.min_replies=2"),
])
def test_failed_lost_and_silent_clients_are_recorded_and_one_reply_keeps_the_prompt(min_replies, why):
    from flwr.common.constant import ErrorCode
    from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

    strategy = make_strategy(min_replies=min_replies)
    to = {m.metadata.dst_node_id: m for m in _sent_by_the_grid(strategy, [11, 12, 13, 14])}
    replies = [
        Message(RecordDict({"arrays": words_to_arrays(PROMPTS[11])}), reply_to=to[11]),  # the only valid reply
        Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "RuntimeError on the client"), reply_to=to[12]),
        # What the SuperLink answers for a SuperNode that stopped sending heartbeats: it comes from the SuperLink.
        create_message_error_unavailable_res_message(to[13].metadata, "node_unavail"),
    ]  # node 14 never answers: the round's timeout passed
    arrays, _ = strategy.aggregate_train(1, replies)

    stats = strategy.rounds[1]
    assert sorted((f["node"], f["code"]) for f in stats.failures) == [
        (12, ErrorCode.CLIENT_APP_RAISED_EXCEPTION), (13, ErrorCode.NODE_UNAVAILABLE), (14, None)]
    assert stats.replies == 1 and stats.missing == 1
    # Strategy.start keeps the previous global prompt; the report says why
    assert arrays is None and stats.skipped == why


@pytest.mark.parametrize("merged_scores_lower", [True, False])
def test_server_check_keeps_the_global_prompt_when_the_merge_scores_lower(merged_scores_lower):
    # The merge of PROMPTS is "classify the review"; the round started from "please label text".
    start = ["please", "label", "text"]
    calls = []

    def check(old, merged):
        calls.append((list(old), list(merged)))
        return {"kept": not merged_scores_lower, "old_accuracy": 0.5, "new_accuracy": 0.4 if merged_scores_lower else 0.6}

    strategy = make_strategy(server_check=check)
    list(strategy.configure_train(1, words_to_arrays(start), ConfigRecord(), FakeGrid([11, 12, 13])))
    arrays, _ = strategy.aggregate_train(1, [reply(n, PROMPTS[n], 1, 1.0) for n in (11, 12, 13)])
    assert calls == [(start, ["classify", "the", "review"])]
    assert arrays_to_words(arrays) == (start if merged_scores_lower else ["classify", "the", "review"])
    assert strategy.rounds[1].aggregation["server_check"]["kept"] is (not merged_scores_lower)


def test_server_check_is_not_asked_when_the_merge_is_the_global_prompt():
    strategy = make_strategy(server_check=lambda old, new: pytest.fail("no check needed"))
    list(strategy.configure_train(1, words_to_arrays(["classify", "the", "review"]), ConfigRecord(), FakeGrid([11, 12, 13])))
    arrays, _ = strategy.aggregate_train(1, [reply(n, PROMPTS[n], 1, 1.0) for n in (11, 12, 13)])
    assert arrays_to_words(arrays) == ["classify", "the", "review"]


class CountingBox:
    """Predicts the gold label only when the prompt contains "good"; counts the texts it sees."""

    def __init__(self):
        self.texts = []

    def classify(self, texts, label_words, labels_only):
        from types import SimpleNamespace

        self.texts += texts
        return SimpleNamespace(predictions=[int(t.endswith("|1")) if "good" in t else 0 for t in texts])


def _public_check(box):
    from types import SimpleNamespace

    from fedprompt.data.task import Example
    from fedprompt.methods.feddtpt.check import public_check

    spec = SimpleNamespace(label_words=["no", "yes"], format=lambda e, prompt: f"{prompt} {e.text}|{e.label}")
    return public_check(box, spec, [Example("a", 0), Example("b", 1), Example("c", 0), Example("d", 1)])


def test_the_server_checks_scores_are_checkpointed_so_a_resume_asks_the_black_box_no_more():
    from flwr.common.serde import recorddict_from_proto, recorddict_to_proto

    assert make_strategy().checkpoint_state() is None  # no server check: no state
    strategy = make_strategy(server_check=_public_check(CountingBox()))
    assert strategy.checkpoint_state() is None  # nothing scored yet
    strategy.server_check(["good"], ["bad"])  # round 1
    state = recorddict_from_proto(recorddict_to_proto(strategy.checkpoint_state()))  # as checkpoint.json holds it

    box = CountingBox()
    resumed = make_strategy(server_check=_public_check(box))  # the resumed process
    resumed.restore_state(state)
    assert resumed.server_check(["good"], ["good", "too"]) == strategy.server_check(["good"], ["good", "too"])
    assert len(box.texts) == 4  # only the new merge: "good" was scored before the stop


def test_bad_replies_are_recorded_and_skipped_and_the_rest_merged():
    strategy = make_strategy(max_tokens=4)
    to = {m.metadata.dst_node_id: m for m in _sent_by_the_grid(strategy, [11, 12, 13, 14, 15, 16])}
    garbage = ArrayRecord({"prompt": Array(np.frombuffer(b"\xff\xfe bad", dtype=np.uint8).copy())})
    replies = [
        Message(RecordDict({"arrays": words_to_arrays(PROMPTS[11])}), reply_to=to[11]),
        Message(RecordDict({"arrays": words_to_arrays(PROMPTS[12])}), reply_to=to[12]),
        Message(RecordDict({"arrays": garbage}), reply_to=to[13]),  # not UTF-8
        Message(RecordDict({"arrays": words_to_arrays(["the"] * 5)}), reply_to=to[14]),  # > max_tokens
        Message(RecordDict({"arrays": words_to_arrays([])}), reply_to=to[15]),  # empty: a valid vote for zero-shot
        Message(RecordDict({"arrays": ConfigRecord({"prompt": b"the"})}), reply_to=to[16]),  # the wrong kind of record
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    stats = strategy.rounds[1]
    reasons = {f["node"]: f["reason"] for f in stats.failures}
    assert sorted(reasons) == [13, 14, 16]
    assert "malformed reply" in reasons[13] and "utf-8" in reasons[13].lower()
    assert reasons[16] == "malformed reply: 'arrays' holds a ConfigRecord instead of the layout's ArrayRecord"
    assert reasons[14] == "prompt of 5 words > method.search.max_tokens=4"
    assert stats.replies == 3 and stats.aggregation["empty_replies"] == 1
    assert arrays_to_words(arrays) == ["classify", "the"]  # the words both non-empty replies share


def test_identical_replies_come_back_and_a_majority_of_empty_ones_gives_zero_shot():
    strategy = make_strategy()
    list(strategy.configure_train(1, words_to_arrays(["please"]), ConfigRecord(), FakeGrid([11, 12, 13])))
    arrays, _ = strategy.aggregate_train(1, [reply(n, PROMPTS[11], 1, 1.0) for n in (11, 12, 13)])
    assert arrays_to_words(arrays) == PROMPTS[11]
    assert strategy.rounds[1].aggregation["fallbacks"] == ["identical-replies"]
    list(strategy.configure_train(2, arrays, ConfigRecord(), FakeGrid([11, 12, 13])))
    arrays, _ = strategy.aggregate_train(2, [reply(11, PROMPTS[11], 1, 1.0), reply(12, [], 1, 1.0), reply(13, [], 1, 1.0)])
    assert arrays_to_words(arrays) == []
    assert strategy.rounds[2].aggregation["fallbacks"] == ["majority-empty"]
