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
    assert BDPLConfig.from_dict({"name": "bdpl", "lr": "0.5", "query_budget": None}).lr == 0.5


@pytest.mark.parametrize("node, message", [
    ({"prompt_lenght": 5}, "unknown key(s) method.prompt_lenght; known keys: "),
    ({"samples_per_step": 1}, "samples_per_step must be >= 2"),
    ({"optimizer": "rmsprop"}, "method.optimizer='rmsprop' is not one of ['adam', 'sgd']"),
    ({"lr": 0}, "method.lr must be > 0"),
    ({"batch_size": 8, "query_budget": 10}, "cannot pay for one step"),
    ({"candidates": 1}, "method.candidates must be >= 2"),
    ({"local_steps": 2.5}, "method.local_steps: cannot use 2.5"),
    ({"prompt_length": None}, "method.prompt_length must not be null"),
    ({"name": "post"}, "this config is for 'bdpl'"),
])
def test_config_errors_say_what_is_wrong(node, message):
    with pytest.raises(ConfigError) as err:
        BDPLConfig.from_dict(node)
    assert message in str(err.value)
    if "unknown" in message:
        assert "prompt_length" in str(err.value) and "samples_per_step" in str(err.value)
