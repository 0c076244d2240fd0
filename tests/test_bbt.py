"""FedAvg-BBT and FedBPT: CMA-ES through the search interfaces on a known quadratic, the two server rules,
the in-process black box's continuous-prompt scoring, config errors, a client's reply (prompt-free of
training text) and one real `fedprompt run method=bbt` through Flower."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedprompt import cli
from fedprompt.blackbox.base import ClassifyResult, PromptSpace, Usage
from fedprompt.config import compose
from fedprompt.errors import ConfigError
from fedprompt.fl.bbt import REPLY_METRICS, STATE, BBTStrategy, arrays_to_point, point_to_arrays
from fedprompt.fl.records import serialize_content
from fedprompt.methods.bbt import (
    BBTConfig,
    LocalCMA,
    RandomProjection,
    bbt_projection_std,
    fedavg_bbt,
    fedbpt,
    label_cross_entropy,
)
from fedprompt.methods.bbt.projection import projection_for
from fedprompt.runs.run_config import RUN_CONFIG_KEY, serialize_config
from tests.fl_support import find_leaks, write_secret_task

# --- (a) CMA-ES on a known quadratic through the same interfaces ------------------------------------------------


class QuadraticBlackBox:
    """A soft-prompt black box whose gold-label loss grows with ||P - P*||^2 (P* = the prompt of z*).

    Each text ends with its gold label; the gold label gets log-prob -||P - P*||^2, the other 0, so the label
    cross-entropy log(1 + exp(q)) is increasing in q = ||P - P*||^2 and smallest at z = z*."""

    def __init__(self, target: np.ndarray) -> None:
        self.target, self.usage = target, Usage()

    def classify_embeds(self, texts, labels, soft_prompt) -> ClassifyResult:
        q = float(((np.asarray(soft_prompt, np.float64) - self.target) ** 2).sum())
        logprobs = np.zeros((len(texts), len(labels)), np.float32)
        for row, text in enumerate(texts):
            logprobs[row, int(text.split()[-1])] = -q
        cost = Usage(requests=1, queries=len(texts))
        self.usage.add(cost)
        return ClassifyResult([int(i) for i in logprobs.argmax(1)], logprobs, cost)


def quadratic_setup(seed: int = 0):
    projection = RandomProjection(6, 2, 4, std=0.5, seed=seed)
    z_star = np.random.default_rng(seed + 1).normal(size=6).astype(np.float32)
    texts, gold = [f"example {i} {i % 2}" for i in range(8)], [i % 2 for i in range(8)]
    return projection, z_star, QuadraticBlackBox(projection.prompt(z_star)), texts, gold


def test_cma_es_through_the_search_interface_approaches_a_known_optimum():
    projection, z_star, box, texts, gold = quadratic_setup()
    config = BBTConfig(intrinsic_dim=6, prompt_tokens=2, popsize=10, local_iterations=40, batch_size=4, sigma0=0.5)
    start = label_cross_entropy(box.classify_embeds(texts, ["a", "b"], projection.prompt(np.zeros(6))).logprobs, gold)
    result = LocalCMA(config, projection).run(box, texts, gold, ["a", "b"], np.zeros(6), 0.5, seed=3)
    assert result.best_loss < start - 0.5 and result.best_loss < np.log(2) + 0.05  # log 2: the loss at z*
    assert np.linalg.norm(result.mean - z_star) < 0.2 * np.linalg.norm(z_star)
    assert result.iterations == 40 and result.evaluations == 400
    assert result.queries == 400 * 4 == result.usage.queries  # every query counted, by both sides
    assert result.losses[-1] < result.losses[0]
    again = LocalCMA(config, projection).run(box, texts, gold, ["a", "b"], np.zeros(6), 0.5, seed=3)
    np.testing.assert_array_equal(again.mean, result.mean)  # seeded: a resumed round repeats itself


@pytest.mark.parametrize("mode", ["fedavg", "fedbpt"])
def test_federated_rounds_on_the_quadratic_move_the_global_point_towards_the_optimum(mode):
    projection, z_star, box, texts, gold = quadratic_setup(seed=4)
    config = BBTConfig(mode=mode, intrinsic_dim=6, prompt_tokens=2, popsize=8, local_iterations=6, batch_size=None,
                       sigma0=0.5, client_return="mean")
    search, z, sigma, shards = LocalCMA(config, projection), np.zeros(6, np.float32), 0.5, [(0, 5), (5, 8)]
    for server_round in range(1, 5):
        results = [search.run(box, texts[a:b], gold[a:b], ["a", "b"], z, sigma, seed=server_round * 10 + k)
                   for k, (a, b) in enumerate(shards)]
        weights = [b - a for a, b in shards]
        if mode == "fedavg":
            z = fedavg_bbt([r.mean for r in results], weights)
        else:
            z, sigma = fedbpt([r.mean for r in results], [r.sigma for r in results], weights)
    assert np.linalg.norm(z - z_star) < 0.5 * np.linalg.norm(z_star)
    assert sigma == 0.5 if mode == "fedavg" else sigma != 0.5


def test_projection_is_seeded_and_scaled_by_the_bbt_rule():
    std = bbt_projection_std(0.02, 100, 1.0)
    assert std == pytest.approx(0.002)
    a, b = RandomProjection(100, 3, 8, std, seed=7), RandomProjection(100, 3, 8, std, seed=7)
    np.testing.assert_array_equal(a.matrix, b.matrix)
    assert not np.array_equal(a.matrix, RandomProjection(100, 3, 8, std, seed=8).matrix)
    # z ~ N(0, sigma_z^2 I) moves each prompt entry by about sigma_e: the scale of a token embedding.
    zs = np.random.default_rng(0).normal(size=(200, 100)).astype(np.float32)
    assert np.std([a.prompt(z) for z in zs]) == pytest.approx(0.02, rel=0.15)
    base = np.ones((3, 8), np.float32)
    np.testing.assert_array_equal(RandomProjection(100, 3, 8, std, 7, base).prompt(np.zeros(100)), base)
    with pytest.raises(ValueError, match="z must have shape"):
        a.prompt(np.zeros(99))


class SpaceOnly:
    def prompt_space(self):
        return PromptSpace(8, 0.05)

    def text_prompt(self, text, num_tokens):
        return np.full((num_tokens, 8), 0.5, np.float32)


def test_projection_for_uses_the_services_space_the_init_and_the_seed():
    p = projection_for(BBTConfig(intrinsic_dim=4, prompt_tokens=3, sigma0=2.0), SpaceOnly(), "Classify.", run_seed=5)
    assert p.shape == (3, 8) and p.seed == 5 and p.std == pytest.approx(0.05 / (2 * 2.0))
    np.testing.assert_array_equal(p.base, np.full((3, 8), 0.5))
    q = projection_for(BBTConfig(intrinsic_dim=4, prompt_tokens=3, init="zeros", projection_seed=9, projection_std=0.1),
                       SpaceOnly(), "Classify.", run_seed=5)
    assert q.seed == 9 and q.std == 0.1 and not q.base.any()


# --- (b) the two server rules on hand-made numbers -----------------------------------------------------------------


def test_fedavg_bbt_is_the_example_weighted_mean_of_the_clients_z():
    z = fedavg_bbt([np.array([1.0, 2.0]), np.array([3.0, 4.0])], [1, 3])
    np.testing.assert_allclose(z, [2.5, 3.5])
    assert z.dtype == np.float32


def test_fedbpt_averages_means_and_step_sizes_by_examples():
    mean, sigma = fedbpt([np.array([0.0, 4.0]), np.array([2.0, 0.0]), np.array([1.0, 1.0])], [0.2, 0.6, 1.0], [2, 1, 1])
    np.testing.assert_allclose(mean, [(0 * 2 + 2 + 1) / 4, (4 * 2 + 0 + 1) / 4])
    assert sigma == pytest.approx((0.2 * 2 + 0.6 + 1.0) / 4)


@pytest.mark.parametrize("call", [
    lambda: fedavg_bbt([], []),
    lambda: fedavg_bbt([np.zeros(2)], [0]),
    lambda: fedavg_bbt([np.zeros(2), np.zeros(2)], [1]),
    lambda: fedbpt([np.zeros(2)], [-1.0], [1]),
])
def test_the_rules_refuse_bad_weights_and_step_sizes(call):
    with pytest.raises(ValueError):
        call()


@pytest.fixture
def server_identity(monkeypatch):
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def train_message(node_id: int, server_round: int, z: np.ndarray, sigma: float = 1.0) -> Message:
    content = RecordDict({"arrays": point_to_arrays(z, sigma), "config": ConfigRecord({"server-round": server_round})})
    return Message(content, dst_node_id=node_id, message_type=MessageType.TRAIN)


@pytest.mark.parametrize("mode, sigma", [("fedavg", 0.7), ("fedbpt", (0.2 * 1 + 0.6 * 3) / 4)])
def test_the_strategy_applies_its_rule_and_skips_bad_replies(server_identity, mode, sigma):
    strategy = BBTStrategy(mode, 2, sigma0=0.7, min_train_nodes=1, min_available_nodes=1)
    replies = []
    for node, (value, s, n) in enumerate([(1.0, 0.2, 1), (5.0, 0.6, 3)]):
        content = RecordDict({"arrays": point_to_arrays(np.full(2, value, np.float32), s),
                              "metrics": MetricRecord({"num-examples": n, "partition-id": node, "queries": 10,
                                                       "loss": value})})
        replies.append(Message(content, reply_to=train_message(node, 1, np.zeros(2))))
    replies.append(Message(Error(code=0, reason="boom"), reply_to=train_message(7, 1, np.zeros(2))))
    bad = RecordDict({"arrays": point_to_arrays(np.zeros(3, np.float32), 1.0), "metrics": MetricRecord({"num-examples": 1})})
    replies.append(Message(bad, reply_to=train_message(8, 1, np.zeros(2))))
    arrays, metrics = strategy.aggregate_train(1, replies)
    z, got_sigma = arrays_to_point(arrays, 2)
    np.testing.assert_allclose(z, np.full(2, (1.0 * 1 + 5.0 * 3) / 4))
    assert got_sigma == pytest.approx(sigma)
    stats = strategy.rounds[1]
    assert stats.replies == 2 and len(stats.failures) == 2 and "shape" in stats.failures[1]["reason"]
    assert metrics["queries"] == 20 and metrics["loss"] == pytest.approx(4.0)


def test_the_strategy_keeps_the_point_when_too_few_replies(server_identity):
    strategy = BBTStrategy("fedbpt", 2, sigma0=1.0, min_replies=2, min_train_nodes=1, min_available_nodes=1)
    content = RecordDict({"arrays": point_to_arrays(np.ones(2, np.float32), 0.5),
                          "metrics": MetricRecord({"num-examples": 4, "partition-id": 0})})
    arrays, _ = strategy.aggregate_train(1, [Message(content, reply_to=train_message(0, 1, np.zeros(2)))])
    assert arrays is None and "min_replies" in strategy.rounds[1].skipped


# --- (c) the in-process black box scores a continuous prompt like the classifier --------------------------------


def test_classify_embeds_equals_the_classifier_with_the_same_soft_prompt(tiny_model_dir):
    import torch

    from fedprompt.blackbox import InProcessBlackBox, SoftPromptBlackBox
    from fedprompt.blackbox.errors import ValidationFailed
    from fedprompt.data import Example, TaskSpec
    from fedprompt.models import PromptedClassifier, SoftPrompt, load_causal_lm, load_tokenizer

    model, tokenizer = load_causal_lm(str(tiny_model_dir), "cpu", "float32"), load_tokenizer(str(tiny_model_dir))
    spec = TaskSpec("toy", ("negative", "positive"), ("negative", "positive"), "{prompt}\nReview: {text}",
                    "Classify the review.", answer_prefix="Sentiment:")
    examples = [Example(t, i % 2) for i, t in enumerate(["a great movie", "a terrible film , boring", "wonderful cast",
                                                          "too long"])]
    box = InProcessBlackBox(model, tokenizer, batch_size=16)
    assert isinstance(box, SoftPromptBlackBox) and box.prompt_space().hidden_size == 32
    weight = np.random.default_rng(0).normal(size=(3, 32)).astype(np.float32) * 0.1
    texts, labels = [spec.format(e) for e in examples], list(spec.label_words)
    got = box.classify_embeds(texts, labels, weight)
    expected = PromptedClassifier(model, tokenizer, spec, batch_size=16).log_scores(
        examples, soft_prompt=SoftPrompt(3, 32, torch.from_numpy(weight)))
    np.testing.assert_allclose(got.logprobs, expected, rtol=0, atol=1e-6)
    assert got.predictions == [int(i) for i in expected.argmax(1)]
    plain = box.classify(texts, labels)
    assert not np.allclose(plain.logprobs, got.logprobs)  # the prompt is really read
    rows = len(texts) * (1 if all(len(tokenizer(w, add_special_tokens=False)["input_ids"]) == 1 for w in labels)
                         else len(labels))
    assert got.usage.queries == plain.usage.queries == len(texts) and got.usage.requests == 1
    assert got.usage.prompt_tokens == plain.usage.prompt_tokens + 3 * rows
    assert got.usage.bytes_sent > plain.usage.bytes_sent + 3 * 32  # the prompt travels with the request
    assert box.usage.queries == 2 * len(texts)
    init = box.text_prompt("Classify the review.", 5)
    assert init.shape == (5, 32) and init.dtype == np.float32
    with pytest.raises(ValidationFailed, match="soft_prompt must be"):
        box.classify_embeds(texts, labels, np.zeros((3, 31), np.float32))
    with pytest.raises(ValidationFailed, match="NaN"):
        box.classify_embeds(texts, labels, np.full((3, 32), np.nan, np.float32))


# --- (d) config errors -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("node, message", [
    ({"popsiz": 4}, "unknown config key 'method.popsiz'"),
    ({"mode": "fedprox"}, "method.mode='fedprox' is not one of ['fedavg', 'fedbpt']"),
    ({"popsize": 1}, "method.popsize must be >= 2"),
    ({"intrinsic_dim": 0}, "method.intrinsic_dim must be >= 1"),
    ({"sigma0": 0}, "method.sigma0 must be > 0"),
    ({"bound": -1}, "method.bound must be > 0"),
    ({"batch_size": 0}, "method.batch_size must be >= 1"),
    ({"init": "random"}, "method.init='random'"),
    ({"client_return": "last"}, "method.client_return='last'"),
    ({"local_iterations": "many"}, "method.local_iterations must be a whole number"),
    ({"local_iterations": "5"}, "method.local_iterations must be a whole number"),
])
def test_bad_bbt_config_is_a_config_error_naming_the_key(node, message):
    with pytest.raises(ConfigError) as err:
        BBTConfig.from_dict({"name": "bbt", **node})
    assert message in str(err.value)
    if "unknown key" in message:
        assert "popsize" in str(err.value) and "intrinsic_dim" in str(err.value)  # the known keys


def bbt_overrides(data_dir, model_dir, *extra: str) -> list[str]:
    """A BBT run that costs seconds: the tiny model as black box, d=8, 2 prompt tokens, 2 x 4 candidates."""
    return [f"data_dir={data_dir}", "task=secret", f"model={model_dir}", "model.device=cpu", "model.dtype=float32",
            "method=bbt", "method.intrinsic_dim=8", "method.prompt_tokens=2", "method.popsize=4",
            "method.local_iterations=2", "method.batch_size=4", "federation.num_clients=2", "federation.rounds=1",
            "federation.eval_limit=4", "partition=iid", "partition.k_shot=null", "progress=false", *extra]


@pytest.mark.parametrize("extra, message", [
    (["service.kind=http"], "BBT needs a service that accepts prompt embeddings; use service.kind=inprocess"),
    (["service.kind=openai"], "BBT needs a service that accepts prompt embeddings; use service.kind=inprocess"),
    (["+method.cma_tol=1"], "unknown config key 'method.cma_tol'"),
    (["method.prompt_tokens=600"], "exceeds the model's context of 512"),
])
def test_bad_bbt_input_is_one_line_before_anything_starts(capsys, tmp_path, tiny_model_dir, monkeypatch, extra, message):
    monkeypatch.setattr("fedprompt.commands.launch.local_superlink", lambda *a, **k: pytest.fail("Flower started"))
    code = cli.main(["run", *bbt_overrides(write_secret_task(tmp_path), tiny_model_dir, *extra)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1


# --- (e) a client's reply, and a real run through Flower --------------------------------------------------------


@pytest.mark.parametrize("mode", ["fedavg", "fedbpt"])
def test_a_client_replies_a_point_and_numbers_only_and_counts_its_queries(server_identity, tmp_path, tiny_model_dir,
                                                                            mode):
    from fedprompt.fl import client_app

    cfg = compose(bbt_overrides(write_secret_task(tmp_path), tiny_model_dir, f"method.mode={mode}"))
    context = Context(run_id=1, node_id=10, state=RecordDict(), run_config={RUN_CONFIG_KEY: serialize_config(cfg)},
                      node_config={"partition-id": 0, "num-partitions": 2})
    z = np.zeros(8, np.float32)
    for server_round in (1, 2):
        reply = client_app.app(train_message(10, server_round, z, 1.0), context)
        assert not reply.has_error(), reply.error.reason
        assert set(reply.content.keys()) == {"arrays", "metrics"}
        metrics = reply.content["metrics"]
        assert set(metrics.keys()) <= set(REPLY_METRICS)
        assert metrics["num-examples"] == 8 and metrics["queries"] == 2 * 4 * 4 == metrics["evaluations"] * 4
        assert metrics["queries-total"] == 32 * server_round == context.state[STATE]["queries-total"]
        new_z, sigma = arrays_to_point(reply.content["arrays"], 8)
        assert sigma > 0 and not np.array_equal(new_z, z)
        wire = serialize_content(reply.content)
        assert new_z.tobytes() in wire  # the capture holds the payload: the scan below is not vacuous
        assert find_leaks(wire) == []
        z = new_z


def test_fedprompt_run_method_bbt_through_flwr_run(capsys, tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    args = bbt_overrides(write_secret_task(tmp_path / "data"), tiny_model_dir, "method.mode=fedbpt", f"output_dir={out}")
    code = cli.main(["run", *args])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr[-3000:]
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["rounds"] == 1 and result["failures"] == 0 and result["client_replies"] == 2
    assert result["queries"] == 2 * (2 * 4 * 4) and result["eval_queries"] == 2 * 4  # rounds 0 and 1
    rows = json.loads((out / "rounds.json").read_text())
    assert [r["round"] for r in rows] == [0, 1] and all(r["accuracy"] is not None for r in rows)
    assert rows[1]["aggregation"]["mode"] == "fedbpt" and rows[1]["client_metrics"]["queries"] == 64
    saved = np.load(out / "bbt_prompt.npz")
    assert saved["z"].shape == (8,) and saved["prompt"].shape == (2, 32) and float(saved["sigma"]) > 0
