"""POST's transfer: lift a soft prompt tuned on the student to the large model, on a public set.

On public inputs x (formatted like the task's, labels never read), with s(.) the student's and t(.) the
large model's label-word logits at the answer position, p_s the student's prompt and p_t the large
model's prompt being trained (Wang et al. 2025):

    L = (1 - alpha) * T^2 * KL( softmax(s(p_s, x) / T)          || softmax(t(p_t, x) / T) )
        +     alpha * T^2 * KL( softmax((s(p_s, x) - s(x)) / T) || softmax((t(p_t, x) - t(x)) / T) )

The first term copies the student's prompted predictions; the second copies what the prompt *changes*
(prompted minus unprompted logits), which still helps when the student itself is weak. ``alpha_rule``
is POST's choice: alpha = min((ZS - RG) / (C - RG), 1), with ZS the large model's zero-shot accuracy,
C the student's accuracy with its prompt and RG chance; the better the large model is on its own
relative to the student, the more weight goes to the difference term.

s(p_s, x), s(x) and t(x) do not depend on p_t: they are computed once, before the fixed number of steps.
The KL is over the label words only (the classifier's output; the student's other 49k logits are
not what its prompt was tuned for).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from fedprompt.data.task import Example
from fedprompt.errors import ConfigError, DataError
from fedprompt.methods.post.tuning import SoftPromptTuner
from fedprompt.models.soft_prompt import SoftPrompt


def alpha_rule(zero_shot: float, student_prompt: float, chance: float) -> float:
    """POST's alpha = min((ZS - RG) / (C - RG), 1), clipped to [0, 1]; 1 when C is no better than chance."""
    if student_prompt <= chance:
        return 1.0
    return float(min(max((zero_shot - chance) / (student_prompt - chance), 0.0), 1.0))


@dataclass
class TransferResult:
    prompt: SoftPrompt
    alpha: float
    steps: int
    seconds: float  # precomputation (the three fixed outputs) and the steps
    precompute_seconds: float
    tokens: int  # large-model token positions run forward and backward in the steps
    fixed_tokens: dict[str, int] = field(default_factory=dict)  # token positions run forward only, per model
    losses: list[float] = field(default_factory=list)


class PromptTransfer:
    """POST's transfer from ``student`` (its tuner) to ``large`` (its tuner); both share the tokenizer."""

    def __init__(self, student: SoftPromptTuner, large: SoftPromptTuner, *, steps: int, batch_size: int, lr: float,
                 temperature: float = 2.0) -> None:
        if student.label_ids != large.label_ids:
            raise ConfigError("the student and the large model read different label tokens: POST's transfer needs "
                              "a student distilled from the large model (same tokenizer)")
        self.student, self.large = student, large
        self.steps, self.batch_size, self.lr, self.temperature = steps, batch_size, lr, temperature

    @torch.no_grad()
    def _fixed_logits(self, tuner: SoftPromptTuner, encoded: Sequence[Sequence[int]], prompt) -> tuple[torch.Tensor, int]:
        rows, tokens = [], 0
        for start in range(0, len(encoded), self.batch_size):
            ids, mask = tuner.pad(encoded[start : start + self.batch_size])
            rows.append(tuner.label_logits(prompt, ids, mask))
            tokens += int(ids.numel()) + (prompt.num_tokens * len(ids) if prompt is not None else 0)
        return torch.cat(rows), tokens

    def run(self, student_prompt: SoftPrompt, public: Sequence[Example], alpha: float, init: SoftPrompt,
            seed: int = 0) -> TransferResult:
        """``steps`` Adam steps on ``init`` (updated in place) over the public examples, cycled in seeded order."""
        if not public:
            raise DataError("the public transfer set is empty; set transfer.public_size >= 1")
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"transfer.alpha must be in [0, 1], got {alpha}")
        start = time.perf_counter()
        encoded = self.large.encode(public)
        student_prompt.to(self.student.device).eval()
        s_prompted, s_tokens = self._fixed_logits(self.student, encoded, student_prompt)
        s_plain, s_plain_tokens = self._fixed_logits(self.student, encoded, None)
        t_plain, t_tokens = self._fixed_logits(self.large, encoded, None)
        precompute = time.perf_counter() - start
        temp = self.temperature
        target_kd = torch.softmax(s_prompted / temp, -1)
        target_diff = torch.softmax((s_prompted - s_plain) / temp, -1)

        prompt = init.to(self.large.device).train()
        optimizer = torch.optim.Adam(prompt.parameters(), lr=self.lr)
        generator = torch.Generator().manual_seed(seed)
        result = TransferResult(prompt=prompt, alpha=alpha, steps=self.steps, seconds=0.0, precompute_seconds=precompute,
                                tokens=0, fixed_tokens={"student": s_tokens + s_plain_tokens, "large": t_tokens})
        order: list[int] = []
        size = min(self.batch_size, len(encoded))
        for _ in range(self.steps):
            if len(order) < size:
                order += torch.randperm(len(encoded), generator=generator).tolist()
            idx, order = order[:size], order[size:]
            ids, mask = self.large.pad([encoded[i] for i in idx])
            prompted = self.large.label_logits(prompt, ids, mask)
            kd = _kl(target_kd[idx], prompted / temp)
            diff = _kl(target_diff[idx], (prompted - t_plain[idx]) / temp)
            loss = temp**2 * ((1 - alpha) * kd + alpha * diff)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            result.losses.append(float(loss.detach()))
            result.tokens += int(ids.numel()) + prompt.num_tokens * len(idx)
        prompt.eval()
        result.seconds = time.perf_counter() - start
        return result


def _kl(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(target || softmax(logits)), averaged over the batch."""
    return torch.nn.functional.kl_div(torch.log_softmax(logits, -1), target, reduction="batchmean")
