"""DP-SGD for soft prompts, with Opacus (Abadi et al. 2016; Opacus' sampled Gaussian mechanism).

Each step draws a Poisson batch (every example independently with probability ``q = batch_size / N``),
computes each example's gradient of the prompt, clips it to L2 norm ``max_grad_norm`` (C), sums, adds
Gaussian noise N(0, (sigma C)^2 I) and divides by the expected batch size ``q N``. Opacus' accountant
(RDP by default, or PRV) turns (sigma, q, steps) into (epsilon, delta); ``sigma`` is chosen once, for
the target epsilon over all the steps planned (e.g. rounds x local steps), with Opacus'
``get_noise_multiplier``.

Per-example gradients: :class:`~fedprompt.models.SoftPrompt` expands one ``(P, H)`` parameter over the
batch inside ``forward``, so example ``b``'s gradient is the gradient of the loss w.r.t. the ``b``-th
copy: the first ``P`` positions of the gradient of the module's output. That is the grad sampler
registered here for Opacus' ``GradSampleModule``; every other weight is frozen, so nothing else needs one.

The guarantee is per client: example-level DP w.r.t. that client's own N examples, with delta =
min(1e-5, 1 / (10 N)) by default (:func:`default_delta`). It covers the noisy prompt and what is computed
from public values alone (N, the hyper-parameters, the planned steps: epsilon, delta, sigma); a DP
client releases nothing else (fedprompt/fl/post.py: no loss, token count, batch size or timing).
N itself is released (it is FedAvg's weight and sets the sampling rate, hence sigma and epsilon):
docs/privacy.md says what that means. The accountant's history (sigma, q, steps) must be kept across
rounds (:meth:`DPSoftPromptSGD.history`) so that epsilon is cumulative.

Randomness (``noise_seed``): ``simulation`` draws the Poisson batches and the noise from a torch
generator seeded from (run seed, round, partition id), so a simulation is reproducible and resumable,
but whoever knows the seed (the server does) can replay the noise: no guarantee outside a simulation.
``secure`` reseeds the generator from ``os.urandom`` (64 bits, never stored or sent) before the first
batch and before every step, and uses Opacus' ``secure_mode`` noise (a sum of several Gaussian draws,
against floating-point attacks on the sampler). Opacus' own cryptographic generator needs ``torchcsprng``,
which has no package for the torch fedprompt uses: the generator stays torch's CPU generator (Mersenne
Twister), unpredictable through its seed but not a cryptographic generator (docs/privacy.md).
"""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.grad_sample import GradSampleModule, register_grad_sampler
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler

from fedprompt.errors import ConfigError
from fedprompt.models.soft_prompt import SoftPrompt
from fedprompt.privacy.settings import ACCOUNTANTS, NOISE_SEEDS, PrivacyConfig  # noqa: F401 (declared in settings)

# Opacus' backward hook sits on the SoftPrompt, whose inputs (frozen embeddings) never need gradients:
# torch warns that the hook then fires on the outputs' gradients, which is exactly what the grad sampler reads.
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with respect to "
                        "module outputs since no inputs require gradients")


@register_grad_sampler(SoftPrompt)
def soft_prompt_grad_sample(layer: SoftPrompt, activations: Sequence[torch.Tensor], backprops: torch.Tensor) -> dict:
    """Per-example gradients of a SoftPrompt: the prompt positions of the output's gradient, ``(B, P, H)``."""
    return {layer.weight: backprops[:, : layer.num_tokens].to(layer.weight.dtype)}


def default_delta(num_examples: int) -> float:
    """delta when ``privacy.delta`` is null: min(1e-5, 1 / (10 N)), well below 1/N (a delta near 1/N allows
    releasing one example in clear)."""
    return min(1e-5, 1.0 / (10 * num_examples))


def secure_seed() -> int:
    """64 bits from the operating system's CSPRNG: a seed no one else knows (never stored or sent)."""
    return int.from_bytes(os.urandom(8), "little")


@dataclass(frozen=True)
class DPPlan:
    """The noise of one client's DP-SGD, fixed before its first step."""

    noise_multiplier: float
    sample_rate: float
    expected_batch_size: int
    delta: float
    max_grad_norm: float
    planned_steps: int
    target_epsilon: float
    accountant: str
    noise_seed: str = "simulation"

    @property
    def secure(self) -> bool:
        return self.noise_seed == "secure"

    def epsilon_after(self, steps: int) -> float:
        """What Opacus' accountant reports after ``steps`` steps of this plan (for checks and tests)."""
        accountant = create_accountant(self.accountant)
        accountant.history = [(self.noise_multiplier, self.sample_rate, steps)]
        return float(accountant.get_epsilon(delta=self.delta))


def plan_dp(privacy: PrivacyConfig, num_examples: int, batch_size: int, planned_steps: int) -> DPPlan:
    """The noise multiplier that reaches ``privacy.epsilon`` after ``planned_steps`` Poisson steps.

    Raises ConfigError, before any training, when the target cannot be reached: no examples, an expected
    batch larger than the data (a sampling rate above 1), or an epsilon too small for Opacus' search.
    """
    if privacy.epsilon is None or not privacy.enabled:
        raise ConfigError("plan_dp needs privacy.epsilon (a finite target)")
    if num_examples < 1:
        raise ConfigError("a DP client needs at least one training example; this client has none")
    if planned_steps < 1:
        raise ConfigError(f"DP-SGD needs at least one planned step, got {planned_steps}")
    if batch_size > num_examples:
        raise ConfigError(
            f"privacy.epsilon={privacy.epsilon}: a client with {num_examples} examples cannot sample batches of "
            f"{batch_size} (Poisson rate {batch_size}/{num_examples} > 1); lower method.train.batch_size to at "
            f"most {num_examples} or give each client more data (fewer clients, partition.k_shot)"
        )
    rate = batch_size / num_examples
    delta = privacy.delta if privacy.delta is not None else default_delta(num_examples)
    try:
        sigma = _noise_multiplier(float(privacy.epsilon), float(delta), float(rate), int(planned_steps), privacy.accountant)
    except (ValueError, RuntimeError, OverflowError) as err:
        raise ConfigError(
            f"privacy.epsilon={privacy.epsilon} cannot be reached with delta={delta:.3g}, sampling rate "
            f"{rate:.3g} ({batch_size}/{num_examples}) and {planned_steps} steps ({err}); raise epsilon, use fewer "
            "steps or a smaller batch, or give the client more examples"
        ) from None
    return DPPlan(noise_multiplier=float(sigma), sample_rate=rate, expected_batch_size=batch_size, delta=delta,
                  max_grad_norm=privacy.max_grad_norm, planned_steps=planned_steps,
                  target_epsilon=float(privacy.epsilon), accountant=privacy.accountant,
                  noise_seed=privacy.noise_seed)


@functools.lru_cache(maxsize=256)
def _noise_multiplier(epsilon: float, delta: float, rate: float, steps: int, accountant: str) -> float:
    # Opacus' search takes ~1 s; every DP client plans the same (epsilon, delta, rate, steps) every round.
    return get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=rate, steps=steps,
                                accountant=accountant)


History = list[tuple[float, float, int]]  # Opacus' accountant history: (noise multiplier, sample rate, steps)


class DPSoftPromptSGD:
    """Opacus' DP-SGD around one SoftPrompt and its optimizer, with an accountant that resumes ``history``.

    Use :attr:`module` in the forward pass (it records per-example gradients), call :meth:`step` after
    ``loss.backward()`` (``loss`` the mean of the batch's per-example losses), or :meth:`step_empty` for a
    Poisson batch that drew no example (noise only, still accounted: skipping it would change the mechanism).
    ``generator`` draws the batches and the noise; with a secure plan (``noise_seed=secure``) it is reseeded
    from ``os.urandom`` here and before every step, and the noise is Opacus' ``secure_mode`` noise.
    """

    def __init__(self, prompt: SoftPrompt, optimizer: torch.optim.Optimizer, plan: DPPlan,
                 history: History | None = None, generator: torch.Generator | None = None) -> None:
        if plan.secure:
            generator = (generator or torch.Generator()).manual_seed(secure_seed())
        self.prompt, self.plan, self.generator = prompt, plan, generator
        self.module = GradSampleModule(prompt, batch_first=True, loss_reduction="mean")
        self.optimizer = DPOptimizer(optimizer, noise_multiplier=plan.noise_multiplier,
                                     max_grad_norm=plan.max_grad_norm, expected_batch_size=plan.expected_batch_size,
                                     loss_reduction="mean", generator=generator, secure_mode=plan.secure)
        self.accountant = create_accountant(plan.accountant)
        self.accountant.history = [tuple(h) for h in (history or [])]
        self.optimizer.attach_step_hook(self.accountant.get_optimizer_hook_fn(plan.sample_rate))

    def batches(self, num_examples: int, steps: int) -> Iterator[list[int]]:
        """``steps`` Poisson batches of example indices (possibly empty)."""
        return iter(UniformWithReplacementSampler(num_samples=num_examples, sample_rate=self.plan.sample_rate,
                                                  generator=self.generator, steps=steps))

    def step(self) -> None:
        if self.plan.secure:  # a fresh secret seed per step: no stretch of generator output spans two steps
            assert self.generator is not None  # __init__ makes one for a secure plan
            self.generator.manual_seed(secure_seed())
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def step_empty(self) -> None:
        weight = self.prompt.weight
        empty = torch.zeros((0, *weight.shape), dtype=weight.dtype, device=weight.device)
        # Opacus' per-example gradients: an attribute it adds to torch Parameters at run time, which torch's types lack
        weight.grad_sample = empty  # type: ignore[attr-defined]
        self.step()

    def epsilon(self) -> float:
        # RDP's conversion can dip below 0 for very large noise ((0, delta)-DP then holds): report 0.
        return max(0.0, float(self.accountant.get_epsilon(delta=self.plan.delta))) if self.accountant.history else 0.0

    def history(self) -> History:
        return [(float(s), float(q), int(n)) for s, q, n in self.accountant.history]

    def close(self) -> None:
        """Remove Opacus' hooks from the prompt (it is a plain SoftPrompt again)."""
        self.module.to_standard_module()
