"""DP-SGD for soft prompts: exact per-example gradients, Opacus' own epsilon, cumulative accounting, delta's default,
seeded (simulation) and secret (secure) noise, bad input."""

from __future__ import annotations

import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from fedprompt.data.task import Example, TaskSpec
from fedprompt.errors import ConfigError, DataError
from fedprompt.methods.post.tuning import SoftPromptTuner, TrainConfig
from fedprompt.models import SoftPrompt, load_causal_lm, load_tokenizer
from fedprompt.privacy.dp import DPSoftPromptSGD, PrivacyConfig, default_delta, plan_dp

SPEC = TaskSpec(name="toy", labels=("negative", "positive"), label_words=(" negative", " positive"),
                template="{prompt}\n\nReview: {text}", manual_prompt="Is this review positive or negative?",
                answer_prefix="Sentiment:")
TEXTS = ["a great movie", "a terrible film , boring and too long", "wonderful cast", "boring", "a great movie with "
         "a wonderful cast", "too long"]
EXAMPLES = [Example(text=t, label=i % 2) for i, t in enumerate(TEXTS * 4)]


@pytest.fixture(scope="module")
def tuner(tiny_model_dir):
    model = load_causal_lm(str(tiny_model_dir), "cpu", "float32")
    return SoftPromptTuner(model, load_tokenizer(str(tiny_model_dir)), SPEC, TrainConfig(local_steps=3, batch_size=4))


def fresh_prompt(tuner, tokens: int = 5) -> SoftPrompt:
    torch.manual_seed(0)
    return SoftPrompt(tokens, tuner.model.config.hidden_size)


def test_per_example_gradients_equal_a_per_example_loop(tuner):
    prompt = fresh_prompt(tuner)
    plan = plan_dp(PrivacyConfig(epsilon=8.0), num_examples=24, batch_size=4, planned_steps=3)
    dp = DPSoftPromptSGD(prompt, torch.optim.SGD(prompt.parameters(), lr=0.1), plan)
    examples = EXAMPLES[:4]  # different lengths: the batch is left-padded
    encoded = tuner.encode(examples)
    labels = torch.tensor([e.label for e in examples])
    ids, mask = tuner.pad(encoded)
    loss = torch.nn.functional.cross_entropy(tuner.label_logits(dp.module, ids, mask), labels)
    loss.backward()
    batched = prompt.weight.grad_sample.clone()
    dp.close()
    assert batched.shape == (4, 5, tuner.model.config.hidden_size)
    for b, seq in enumerate(encoded):  # one example at a time, no padding, plain autograd
        prompt.zero_grad()
        one_ids, one_mask = tuner.pad([seq])
        single = torch.nn.functional.cross_entropy(tuner.label_logits(prompt, one_ids, one_mask), labels[b : b + 1])
        single.backward()
        torch.testing.assert_close(batched[b], prompt.weight.grad, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(batched[0], batched[1])  # distinct examples: the comparison is not vacuous


def test_reported_epsilon_is_opacus_accountant_for_the_same_steps_and_sampling(tuner):
    privacy = PrivacyConfig(epsilon=8.0)
    plan = plan_dp(privacy, num_examples=len(EXAMPLES), batch_size=4, planned_steps=6)
    assert plan.delta == 1e-5 and plan.sample_rate == pytest.approx(4 / len(EXAMPLES))
    expected_sigma = get_noise_multiplier(target_epsilon=8.0, target_delta=1e-5,
                                          sample_rate=4 / len(EXAMPLES), steps=6, accountant="rdp")
    assert plan.noise_multiplier == pytest.approx(expected_sigma)

    history, epsilons = None, []
    for round_ in range(2):  # two rounds of 3 local steps, the history carried over like context.state does
        result = tuner.train(fresh_prompt(tuner), EXAMPLES, steps=3, seed=round_, plan=plan, history=history)
        history = result.history
        reference = RDPAccountant()
        reference.history = [(expected_sigma, 4 / len(EXAMPLES), 3 * (round_ + 1))]
        assert result.epsilon == pytest.approx(reference.get_epsilon(delta=1e-5), rel=1e-9)
        epsilons.append(result.epsilon)
    assert 0 < epsilons[0] < epsilons[1] <= 8.0 + 0.01  # cumulative: grows, and stays within the target


def test_dp_training_moves_the_prompt_and_adds_noise(tuner):
    plan = plan_dp(PrivacyConfig(epsilon=8.0), num_examples=len(EXAMPLES), batch_size=4, planned_steps=2)
    prompts = []
    for seed in (0, 1):
        prompt = fresh_prompt(tuner)
        before = prompt.weight.detach().clone()
        tuner.train(prompt, EXAMPLES, steps=2, seed=seed, plan=plan)
        assert not torch.equal(before, prompt.weight)
        assert not hasattr(prompt.weight, "grad_sample")  # Opacus' hooks and attributes are gone afterwards
        prompts.append(prompt.weight.detach())
    assert not torch.allclose(prompts[0], prompts[1])


@pytest.mark.parametrize("n, delta", [(8, 1e-5), (128, 1e-5), (10_000, 1e-5), (50_000, 2e-6), (10**6, 1e-7)])
def test_delta_defaults_to_the_smaller_of_1e_5_and_a_tenth_of_1_over_n(n, delta):
    assert default_delta(n) == pytest.approx(delta)
    assert plan_dp(PrivacyConfig(epsilon=8.0), num_examples=n, batch_size=4, planned_steps=2).delta == pytest.approx(delta)
    assert plan_dp(PrivacyConfig(epsilon=8.0, delta=1e-3), num_examples=n, batch_size=4, planned_steps=2).delta == 1e-3


def test_simulation_noise_replays_from_the_seed_and_secure_noise_does_not(tuner):
    """The same seed twice: the same prompt with seeded noise (what a resumed simulation needs), two different
    prompts with noise_seed=secure (a server knowing the seed cannot replay it)."""
    def twice(noise_seed: str) -> list[torch.Tensor]:
        plan = plan_dp(PrivacyConfig(epsilon=8.0, noise_seed=noise_seed), num_examples=len(EXAMPLES), batch_size=4,
                       planned_steps=2)
        return [tuner.train(fresh_prompt(tuner), EXAMPLES, steps=2, seed=7, plan=plan).prompt.weight.detach()
                for _ in range(2)]

    simulated, secure = twice("simulation"), twice("secure")
    assert torch.equal(simulated[0], simulated[1])
    assert not torch.allclose(secure[0], secure[1])
    assert not torch.allclose(secure[0], simulated[0]) and not torch.allclose(secure[1], simulated[0])


def test_secure_noise_has_the_planned_scale(tuner):
    """Opacus' secure_mode noise (a sum of draws, against floating-point attacks) keeps the standard deviation."""
    prompt = fresh_prompt(tuner)
    plan = plan_dp(PrivacyConfig(epsilon=8.0, noise_seed="secure"), num_examples=24, batch_size=4, planned_steps=1)
    dp = DPSoftPromptSGD(prompt, torch.optim.SGD(prompt.parameters(), lr=1.0), plan, generator=torch.Generator())
    assert dp.optimizer.secure_mode
    before = prompt.weight.detach().clone()
    dp.step_empty()
    dp.close()
    expected_std = plan.noise_multiplier * plan.max_grad_norm / plan.expected_batch_size
    assert (prompt.weight.detach() - before).std().item() == pytest.approx(expected_std, rel=0.2)


def test_an_empty_poisson_batch_is_a_noise_only_step_that_is_accounted(tuner):
    prompt = fresh_prompt(tuner)
    plan = plan_dp(PrivacyConfig(epsilon=8.0), num_examples=24, batch_size=4, planned_steps=1)
    dp = DPSoftPromptSGD(prompt, torch.optim.SGD(prompt.parameters(), lr=1.0), plan)
    before = prompt.weight.detach().clone()
    dp.step_empty()
    dp.close()
    assert dp.history() == [(plan.noise_multiplier, plan.sample_rate, 1)]
    moved = prompt.weight.detach() - before
    assert moved.abs().sum() > 0  # the noise was added
    expected_std = plan.noise_multiplier * plan.max_grad_norm / plan.expected_batch_size
    assert moved.std().item() == pytest.approx(expected_std, rel=0.2)


def test_training_counts_empty_batches(tuner, monkeypatch):
    plan = plan_dp(PrivacyConfig(epsilon=8.0), num_examples=len(EXAMPLES), batch_size=4, planned_steps=3)
    monkeypatch.setattr(DPSoftPromptSGD, "batches", lambda self, n, steps: iter([[], [0, 1], []]))
    result = tuner.train(fresh_prompt(tuner), EXAMPLES, steps=3, plan=plan)
    assert result.empty_batches == 2 and result.examples_seen == 2 and len(result.history) == 1
    assert result.history[0][2] == 3  # all three steps were accounted


@pytest.mark.parametrize("privacy, n, batch, steps, message", [
    (PrivacyConfig(epsilon=8.0), 3, 4, 10, "cannot sample batches of 4"),
    (PrivacyConfig(epsilon=1e-9, delta=1e-12), 100, 4, 10, "cannot be reached"),
    (PrivacyConfig(epsilon=8.0), 0, 4, 10, "has none"),
])
def test_unreachable_targets_are_clear_errors(privacy, n, batch, steps, message):
    with pytest.raises(ConfigError, match=message):
        plan_dp(privacy, n, batch, steps)


@pytest.mark.parametrize("node, message", [
    (dict(epsilon=0.0), "privacy.epsilon must be > 0"),
    (dict(delta=1.5), "privacy.delta must be in"),
    (dict(max_grad_norm=0.0), "max_grad_norm must be > 0"),
    (dict(accountant="gdp2"), "privacy.accountant"),
    (dict(noise_seed="urandom"), "privacy.noise_seed='urandom' is not one of"),
])
def test_bad_privacy_settings(node, message):
    with pytest.raises(ConfigError, match=message):
        PrivacyConfig(**node).validate()


def test_a_client_with_no_data_is_a_clear_error(tuner):
    with pytest.raises(DataError, match="no training examples"):
        tuner.train(fresh_prompt(tuner), [], steps=1)


def test_a_prompt_longer_than_the_context_is_a_clear_error(tuner):
    with pytest.raises(ConfigError, match="exceeds the model's context of 512"):
        tuner.train(fresh_prompt(tuner, tokens=510), EXAMPLES, steps=1)
