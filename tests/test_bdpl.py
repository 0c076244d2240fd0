"""BDPL / FedOne: the policy and its variance-reduced gradient (hand-computed), a local search against a
fake black box, the config's errors, and one `fedprompt run method=bdpl` through Flower."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pytest

from fedprompt.blackbox.base import BlackBoxLM, ClassifyResult, Usage
from fedprompt.data.task import Example, TaskSpec
from fedprompt.errors import ConfigError
from fedprompt.methods.bdpl import (
    BDPLClient,
    BDPLConfig,
    argmax_prompt,
    log_prob,
    policy_gradient_step,
    sample,
    softmax,
    variance_reduced_gradient,
)

SPEC = TaskSpec(name="toy", labels=("bad", "good"), label_words=(" bad", " good"), template="{prompt}\nText: {text}",
                manual_prompt="Is it good?")
VOCAB = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"]
MAGIC = "charlie"


# --- policy ------------------------------------------------------------------------------------------------------


def test_a_policy_gradient_step_moves_probability_to_the_rewarded_token():
    logits = np.zeros((1, 3))
    samples = np.array([[0], [1], [2], [1]])
    losses = np.array([1.0, 0.1, 1.0, 0.1])  # token 1 is the one with the low loss
    new = policy_gradient_step(logits, samples, losses, lr=0.5)
    before, after = softmax(logits)[0], softmax(new)[0]
    assert after[1] > before[1] and after[0] < before[0] and after[2] < before[2]
    assert math.isclose(after.sum(), 1.0)


def test_the_variance_reduced_gradient_equals_the_hand_computed_value():
    # Slot 0: p = (1/4, 1/2, 1/4); slot 1: p = (3/5, 1/5, 1/5).
    logits = np.array([[0.0, math.log(2), 0.0], [math.log(3), 0.0, 0.0]])
    samples = np.array([[0, 0], [1, 2], [1, 0]])
    losses = np.array([2.0, 1.0, 0.0])  # mean 1: advantages (1, 0, -1)
    p = softmax(logits)
    np.testing.assert_allclose(p, [[0.25, 0.5, 0.25], [0.6, 0.2, 0.2]])
    # g = 1/(I-1) * sum_i a_i (onehot(s_i) - p) = 1/2 * [(e(s_0) - p) - (e(s_2) - p)]
    #   slot 0: 1/2 * (e0 - e1) = (0.5, -0.5, 0); slot 1: 1/2 * (e0 - e0) = 0
    expected = np.array([[0.5, -0.5, 0.0], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(variance_reduced_gradient(logits, samples, losses), expected, atol=1e-12)
    np.testing.assert_allclose(policy_gradient_step(logits, samples, losses, lr=0.1), logits - 0.1 * expected)
    np.testing.assert_allclose(log_prob(logits, samples), [math.log(0.25 * 0.6), math.log(0.5 * 0.2), math.log(0.5 * 0.6)])
    # One sampled prompt's contribution alone keeps the score function's -p term: a_0 = 2 - 1.5, I - 1 = 1.
    got = variance_reduced_gradient(logits, samples[:2], losses[:2])
    np.testing.assert_allclose(got, 0.5 * (np.eye(3)[[0, 0]] - p) - 0.5 * (np.eye(3)[[1, 2]] - p))
    with pytest.raises(ValueError, match="I >= 2"):
        variance_reduced_gradient(logits, samples[:1], losses[:1])


def test_sampling_is_seeded_and_follows_the_distribution():
    logits = np.log(np.array([[0.7, 0.2, 0.1], [0.0 + 1e-9, 0.5, 0.5]]))
    a = sample(logits, 4000, np.random.default_rng(3))
    assert np.array_equal(a, sample(logits, 4000, np.random.default_rng(3)))
    assert a.shape == (4000, 2) and a.min() >= 0 and a.max() <= 2
    np.testing.assert_allclose(np.bincount(a[:, 0], minlength=3) / 4000, [0.7, 0.2, 0.1], atol=0.03)
    assert (a[:, 1] != 0).all()


# --- local search against a fake black box ----------------------------------------------------------------------


class MagicWordBox(BlackBoxLM):
    """Deterministic: the gold label (read from the example's text) is favoured only when MAGIC is in the prompt."""

    def classify(self, texts: Sequence[str], labels: Sequence[str], labels_only: bool = False) -> ClassifyResult:
        logprobs = np.zeros((len(texts), len(labels)), dtype=np.float32)
        for row, text in enumerate(texts):
            prompt, _, example = text.partition("\nText: ")
            gold = 1 if "is good" in example else 0
            if MAGIC in prompt.split():
                logprobs[row] = -3.0
                logprobs[row, gold] = -0.1
            else:
                logprobs[row] = [-0.5, -1.0]  # always "bad": chance on a balanced batch
        usage = Usage(requests=1, queries=len(texts))
        self.usage.add(usage)
        return ClassifyResult(list(logprobs.argmax(axis=1)), None if labels_only else logprobs, usage)


EXAMPLES = [Example(f"item {i} is {'good' if i % 2 else 'bad'}", i % 2) for i in range(12)]


def accuracy(box, prompt: list[str]) -> float:
    result = box.classify([SPEC.format(e, " ".join(prompt)) for e in EXAMPLES], list(SPEC.label_words), labels_only=True)
    return float(np.mean(np.array(result.predictions) == [e.label for e in EXAMPLES]))


def test_bdpl_local_search_finds_the_magic_token_and_counts_queries_exactly():
    config = BDPLConfig.from_dict({"prompt_length": 2, "samples_per_step": 4, "local_steps": 30, "batch_size": 6,
                                   "lr": 0.3, "query_budget": 700})
    client = BDPLClient(config, VOCAB)
    box = MagicWordBox()
    start = client.initial_logits()
    initial = [VOCAB[i] for i in argmax_prompt(start)]
    assert MAGIC not in initial and accuracy(box, initial) == 0.5
    before = box.usage.copy()
    result = client.run(box, SPEC, start, EXAMPLES, seed=0)
    # The budget pays for 700 // (4 x 6) = 29 of the 30 steps; each step queries 4 prompts x 6 examples.
    assert result.steps == 29 and result.queries == 29 * 24 == result.usage.queries == box.usage.minus(before).queries
    assert result.usage.requests == 29
    assert MAGIC in result.prompt and accuracy(box, result.prompt) == 1.0
    assert softmax(result.logits).max(axis=1).max() > 0.5 and result.logits.dtype == np.float32
    again = client.run(MagicWordBox(), SPEC, start, EXAMPLES, seed=0)
    np.testing.assert_array_equal(again.logits, result.logits)  # seeded: the same steps


def test_a_labels_only_service_is_refused_with_a_reason():
    class LabelsOnly(MagicWordBox):
        def classify(self, texts, labels, labels_only=False):
            return super().classify(texts, labels, labels_only=True)

    client = BDPLClient(BDPLConfig.from_dict({"prompt_length": 2, "batch_size": 2}), VOCAB)
    with pytest.raises(ValueError, match="log-probs"):
        client.run(LabelsOnly(), SPEC, client.initial_logits(), EXAMPLES, seed=0)


# --- config ------------------------------------------------------------------------------------------------------


def test_config_defaults_and_values():
    config = BDPLConfig.from_dict(None)
    assert (config.prompt_length, config.candidates, config.samples_per_step, config.clients_per_round) == (10, 200, 4, 1)
    assert BDPLConfig.from_dict({"name": "bdpl", "lr": 0.5, "query_budget": None}).lr == 0.5
    assert BDPLConfig.from_dict({"lr": 1}).lr == 1.0  # a whole number is a number; text is not (below)


@pytest.mark.parametrize("node, message", [
    ({"prompt_lenght": 5}, "unknown config key 'method.prompt_lenght': the method node takes ["),
    ({"prompt_lenght": 5}, "did you mean 'method.prompt_length'?"),
    ({"lr": "0.5"}, "method.lr must be a number, got '0.5'"),
    ({"local_steps": "8"}, "method.local_steps must be a whole number"),
    ({"samples_per_step": 1}, "samples_per_step must be >= 2"),
    ({"optimizer": "rmsprop"}, "method.optimizer='rmsprop' is not one of ['adam', 'sgd']"),
    ({"lr": 0}, "method.lr must be > 0"),
    ({"batch_size": 8, "query_budget": 10}, "cannot pay for one step"),
    ({"candidates": 1}, "method.candidates must be >= 2"),
    ({"local_steps": 2.5}, "method.local_steps must be a whole number (e.g. 3; not a string, 3.0 or true), got 2.5"),
    ({"prompt_length": None}, "method.prompt_length must not be null"),
    ({"name": "post"}, "this config is for 'bdpl'"),
])
def test_config_errors_say_what_is_wrong(node, message):
    with pytest.raises(ConfigError) as err:
        BDPLConfig.from_dict(node)
    assert message in str(err.value)
    if "unknown" in message:
        assert "prompt_length" in str(err.value) and "samples_per_step" in str(err.value)


# --- Flower ------------------------------------------------------------------------------------------------------


def bdpl_overrides(data_dir, model_dir, *extra: str) -> list[str]:
    """A BDPL run that costs seconds: the tiny model as black box and vocabulary, 2 steps of 2 x 4 queries."""
    return [f"data_dir={data_dir}", "task=secret", f"model={model_dir}", "method=bdpl", "method.prompt_length=3",
            "method.candidates=20", "method.samples_per_step=2", "method.local_steps=2", "method.batch_size=4",
            "federation.num_clients=2", "federation.rounds=1", "federation.public_size=0", "partition=iid",
            "partition.k_shot=null", "progress=false", *extra]


def test_a_client_replies_logits_and_numbers_never_its_text(tmp_path, tiny_model_dir, monkeypatch):
    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedprompt.config import compose
    from fedprompt.fl import client_app
    from fedprompt.fl.bdpl import OPTIMIZER_STATE, REPLY_METRICS, arrays_to_logits, logits_to_arrays
    from fedprompt.fl.records import serialize_content
    from fedprompt.runs.run_config import RUN_CONFIG_KEY, serialize_config
    from tests.fl_support import find_leaks, write_secret_task

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)
    cfg = compose(bdpl_overrides(write_secret_task(tmp_path), tiny_model_dir, "method.optimizer_state=keep"))
    context = Context(run_id=1, node_id=10, state=RecordDict(), run_config={RUN_CONFIG_KEY: serialize_config(cfg)},
                      node_config={"partition-id": 0, "num-partitions": 2})
    from fedprompt.methods.bdpl import candidate_vocab
    from fedprompt.models import load_tokenizer

    shape = (3, len(candidate_vocab(load_tokenizer(str(tiny_model_dir)), BDPLConfig.from_dict({"candidates": 20}))))
    assert shape[1] >= 2  # the tiny tokenizer has only a few whole-word tokens
    logits = None
    for server_round in (1, 2):
        start = np.zeros(shape, np.float32) if logits is None else logits
        msg = Message(RecordDict({"arrays": logits_to_arrays(start), "config": ConfigRecord({"server-round": server_round})}),
                      dst_node_id=10, message_type=MessageType.TRAIN)
        reply = client_app.app(msg, context)
        assert not reply.has_error(), reply.error.reason
        assert set(reply.content.keys()) == {"arrays", "metrics"}
        metrics = reply.content["metrics"]
        assert set(metrics.keys()) <= set(REPLY_METRICS)
        assert metrics["num-examples"] == 8 and metrics["steps"] == 2 and metrics["queries"] == 2 * 2 * 4
        logits = arrays_to_logits(reply.content["arrays"], shape)
        assert not np.array_equal(logits, start)
        wire = serialize_content(reply.content)
        assert logits.tobytes() in wire  # the capture holds the payload: the scan below is not vacuous
        assert find_leaks(wire) == []
        assert int(context.state[OPTIMIZER_STATE]["t"].numpy()[0]) == 2 * server_round  # Adam's steps, kept


def test_fedprompt_run_method_bdpl_through_flwr_run(capsys, tmp_path, tiny_model_dir):
    import csv
    import json

    from fedprompt import cli
    from tests.fl_support import write_secret_task

    out = tmp_path / "run"
    args = bdpl_overrides(write_secret_task(tmp_path / "data"), tiny_model_dir, "method.clients_per_round=2",
                          f"output_dir={out}")
    code = cli.main(["run", *args])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr[-3000:]
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["rounds"] == 1 and result["failures"] == 0 and result["client_replies"] == 2
    assert result["queries"] == 2 * 2 * 2 * 4 and result["variant"] == "federated-bdpl"  # clients x steps x I x batch
    assert result["eval_queries"] == 2 * 8 and result["manual_accuracy"] is not None  # rounds 0 and 1 on 8 test rows
    rows = json.loads((out / "rounds.json").read_text())
    assert [r["round"] for r in csv.DictReader((out / "rounds.csv").open())] == ["0", "1"]
    assert len(rows[1]["client_prompts"]) == 2 and len(rows[1]["prompt"].split()) == 3
    logits = np.load(out / "logits.npy")
    candidates = json.loads((out / "candidates.json").read_text())
    assert logits.shape == (3, len(candidates)) and 2 <= len(candidates) <= 20
    assert rows[1]["prompt"] == " ".join(candidates[i] for i in logits.argmax(axis=1))
    flower_log = (out / "flower.log").read_text()
    assert "sampled 2 of 2 nodes" in flower_log and "report no partition" not in flower_log  # partitions asked


def test_clients_per_round_beyond_the_federation_is_one_line_before_flower(capsys, tmp_path, tiny_model_dir,
                                                                          monkeypatch):
    from fedprompt import cli
    from tests.fl_support import write_secret_task

    monkeypatch.setattr("fedprompt.commands.launch.local_superlink", lambda *a, **k: pytest.fail("Flower started"))
    code = cli.main(["run", *bdpl_overrides(write_secret_task(tmp_path), tiny_model_dir, "method.clients_per_round=3")])
    err = capsys.readouterr().err
    assert code == 2 and "method.clients_per_round=3 but federation.num_clients=2" in err and "Traceback" not in err


def test_fedone_samples_one_client_a_round_seeded():
    from fedprompt.fl.strategy import sample_partitions as sample_clients

    nodes = [11, 5, 42, 7]
    picks = [sample_clients(nodes, 1, seed=0, server_round=r) for r in range(1, 41)]
    assert all(len(p) == 1 and p[0] in nodes for p in picks)
    assert picks == [sample_clients(nodes, 1, seed=0, server_round=r) for r in range(1, 41)]
    assert len({p[0] for p in picks}) == 4  # uniform over the clients: all of them get rounds
    assert sample_clients(nodes, 3, seed=1, server_round=1) == sorted(sample_clients(nodes[::-1], 3, seed=1, server_round=1))


def test_the_server_takes_fedones_client_logits_and_averages_k_weighted_by_examples(monkeypatch):
    from flwr.app import ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedprompt.fl.bdpl import BDPLFedAvg, logits_to_arrays

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)

    def reply(node: int, value: float, n: int) -> Message:
        sent = Message(RecordDict({"arrays": logits_to_arrays(np.zeros((2, 3))), "config": ConfigRecord({"server-round": 1})}),
                       dst_node_id=node, message_type=MessageType.TRAIN)
        return Message(RecordDict({"arrays": logits_to_arrays(np.full((2, 3), value)),
                                   "metrics": MetricRecord({"num-examples": n, "partition-id": node, "queries": 10,
                                                            "loss": value})}), reply_to=sent)

    fedone = BDPLFedAvg(clients_per_round=1, vocab=["a", "b", "c"])
    fedone._shape = (2, 3)
    arrays, metrics = fedone.aggregate_train(1, [reply(3, 2.5, 4)])
    np.testing.assert_allclose(arrays["logits"].numpy(), np.full((2, 3), 2.5))  # one client: its logits
    assert metrics["queries"] == 10 and fedone.rounds[1].client_prompts == ["a a"]

    k2 = BDPLFedAvg(clients_per_round=3, min_replies=2)
    k2._shape = (2, 3)
    bad = Message(RecordDict({"arrays": logits_to_arrays(np.zeros((2, 4))), "metrics": MetricRecord({"num-examples": 1})}),
                  reply_to=Message(RecordDict(), dst_node_id=9, message_type=MessageType.TRAIN))
    error = Message(Error(code=0, reason="boom"), reply_to=Message(RecordDict(), dst_node_id=8, message_type=MessageType.TRAIN))
    arrays, metrics = k2.aggregate_train(1, [reply(1, 1.0, 1), reply(2, 4.0, 3), bad, error])
    np.testing.assert_allclose(arrays["logits"].numpy(), np.full((2, 3), (1.0 * 1 + 4.0 * 3) / 4))
    assert metrics["queries"] == 20 and metrics["loss"] == pytest.approx(3.25)
    assert k2.rounds[1].replies == 2 and len(k2.rounds[1].failures) == 2
    arrays, _ = k2.aggregate_train(2, [reply(1, 1.0, 1), error])
    assert arrays is None and "min_replies=2" in k2.rounds[2].skipped  # too few: the global logits are kept


class PartitionGrid:
    """A Grid stand-in: connected nodes (random ids) that answer the partition query as the ClientApp does."""

    def __init__(self, partition_of: dict[int, int]) -> None:
        self.partition_of, self.asked = partition_of, 0

    def get_node_ids(self):
        return list(self.partition_of)

    def send_and_receive(self, messages, timeout=None):
        from flwr.app import Context, RecordDict

        from fedprompt.fl.client_app import partition

        replies = []
        for msg in messages:
            assert msg.metadata.message_type == "query.partition"
            self.asked += 1
            node = msg.metadata.dst_node_id
            context = Context(run_id=1, node_id=node, state=RecordDict(), run_config={},
                              node_config={"partition-id": self.partition_of[node], "num-partitions": 4})
            replies.append(partition(msg, context))
        return replies


def test_fedone_activates_the_same_partitions_whatever_node_ids_flower_draws(monkeypatch):
    from flwr.app import ConfigRecord
    from flwr.supercore.task_identity import TaskIdentity

    from fedprompt.fl.bdpl import BDPLFedAvg, logits_to_arrays

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)
    runs = []
    for ids in ([901, 17, 555, 3], [4, 88, 12, 7000]):  # two runs: the same 4 partitions behind other node ids
        grid = PartitionGrid({node: pid for pid, node in enumerate(ids)})
        strategy = BDPLFedAvg(clients_per_round=1, seed=5, min_available_nodes=4)
        picked = []
        for server_round in range(1, 13):
            messages = strategy.configure_train(server_round, logits_to_arrays(np.zeros((2, 3))), ConfigRecord(), grid)
            assert len(messages) == 1 and strategy.rounds[server_round].sampled == 1
            picked.append(grid.partition_of[messages[0].metadata.dst_node_id])
        assert grid.asked == 4  # every node is asked once per run
        runs.append(picked)
    assert runs[0] == runs[1] and len(set(runs[0])) > 1
