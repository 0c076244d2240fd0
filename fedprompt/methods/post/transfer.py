"""POST's transfer: lift a soft prompt tuned on the student to the large model, on a public set.

On public inputs x (formatted like the task's, labels never read), with s(.) the student's and t(.) the
large model's next-token logits at the answer position, p_s the student's prompt and p_t the large model's
prompt being trained (Wang et al. 2025; their code: sprintml/POST, utils/transfer.py ``mix_transfer``):

    L = T^2 * [ alpha       * KL( softmax((s(p_s, x) - s(x)) / T) || softmax((t(p_t, x) - t(x)) / T) )
              + (1 - alpha) * KL( softmax(s(p_s, x) / T)          || softmax(t(p_t, x) / T) ) ],   T = 2

each KL averaged over the batch. The second term copies the student's prompted predictions; the first copies
what the prompt *changes* (prompted minus unprompted logits), which still helps when the student itself is
weak. ``alpha_rule`` is POST's choice: alpha = min((ZS - RG) / (C - RG), 1), with ZS the large model's
zero-shot accuracy, C the student's accuracy with its prompt and RG chance; the better the large model is
on its own relative to the student, the more weight goes to the difference term.

Which logits (``logits``, config ``transfer.logits``):

- ``vocab`` (default; POST's code): all V next-token logits at the answer position (V = 49,152 for
  SmolLM2). The prompt's effect on the whole distribution is copied, not only on the 2-6 label words.
- ``labels`` (an ablation; fedprompt's behaviour before issue 23): the label words' logits only. With so
  few numbers the difference term degenerates: a softmax over 2-6 logit shifts says little about the prompt.

s(p_s, x), s(x) and t(x) do not depend on p_t: they are computed once, before the fixed number of steps,
and kept as three ``(public_size, V)`` float32 tensors (the two targets and t(x)). In vocab mode that is
3 * public_size * V * 4 bytes: 151 MB for 256 public examples on SmolLM2's 49,152 tokens (805 MB on
Gemma-3's 262,144); in labels mode a few kB. Each step also holds one ``(batch_size, V)`` block of the large
model's logits and its gradient.

Both models must share the tokenizer and the output vocabulary (the student is distilled from the large
model): the constructor refuses label tokens or output vocabulary sizes that differ, in one line.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from fedprompt.data.task import Example
from fedprompt.errors import ConfigError, DataError
from fedprompt.methods.post.config import LOGITS, check_logits  # noqa: F401 (declared in config)
from fedprompt.methods.post.tuning import SoftPromptTuner, check_prompt_fits, context_length
from fedprompt.models.soft_prompt import SoftPrompt


def alpha_rule(zero_shot: float, student_prompt: float, chance: float) -> float:
    """POST's alpha = min((ZS - RG) / (C - RG), 1), clipped to [0, 1]; 1 when C is no better than chance.

    A student whose prompted accuracy C is at or below chance is not refused: alpha takes the rule's cap, 1
    (the limit of the ratio as C falls to RG), so the loss is the difference term alone. Why the cap and not a
    refusal: it is POST's rule at its bound, continuous in C (a refusal would flip on a few examples of a
    200-example estimate), and a comparison table keeps its row (a transfer that loses points is a result).
    ``fedprompt transfer`` says so in one line on stderr and in its record (``alpha_capped``).
    """
    if student_prompt <= chance:
        return 1.0
    return float(min(max((zero_shot - chance) / (student_prompt - chance), 0.0), 1.0))


def output_vocab_size(model) -> int:
    """The number of logits ``model`` emits per position (its LM head's rows, else ``config.vocab_size``)."""
    head = model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    return int(weight.shape[0]) if weight is not None else int(model.config.vocab_size)


@dataclass
class TransferResult:
    prompt: SoftPrompt
    alpha: float
    steps: int
    seconds: float  # precomputation (the three fixed outputs) and the steps
    precompute_seconds: float
    tokens: int  # large-model token positions run forward and backward in the steps
    logits: str = "vocab"  # which logits the KL terms were taken over (vocab | labels)
    fixed_tokens: dict[str, int] = field(default_factory=dict)  # token positions run forward only, per model
    losses: list[float] = field(default_factory=list)


class PromptTransfer:
    """POST's transfer from ``student`` (its tuner) to ``large`` (its tuner); both share the tokenizer.

    ``logits``: ``vocab`` (POST's: the KL terms over all next-token logits at the answer position) or
    ``labels`` (the label words' logits only; an ablation).
    """

    def __init__(self, student: SoftPromptTuner, large: SoftPromptTuner, *, steps: int, batch_size: int, lr: float,
                 temperature: float = 2.0, logits: str = "vocab") -> None:
        check_logits(logits)
        if student.label_ids != large.label_ids:
            raise ConfigError("the student and the large model read different label tokens: POST's transfer needs "
                              "a student distilled from the large model (same tokenizer)")
        sizes = output_vocab_size(student.model), output_vocab_size(large.model)
        if sizes[0] != sizes[1]:
            raise ConfigError(f"the student's output logits span {sizes[0]} tokens but the large model's span "
                              f"{sizes[1]}: a student must be distilled from the large model (same tokenizer and vocabulary)")
        self.student, self.large = student, large
        self.steps, self.batch_size, self.lr, self.temperature = steps, batch_size, lr, temperature
        self.logits = logits

    def _read(self, tuner: SoftPromptTuner, prompt, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The logits the loss compares: all V at the answer position (vocab) or the label words' (labels)."""
        if self.logits == "vocab":
            return tuner.answer_logits(prompt, ids, mask)
        return tuner.label_logits(prompt, ids, mask)

    @torch.no_grad()
    def _fixed_logits(self, tuner: SoftPromptTuner, encoded: Sequence[Sequence[int]], prompt) -> tuple[torch.Tensor, int]:
        rows, tokens = [], 0
        for start in range(0, len(encoded), self.batch_size):
            ids, mask = tuner.pad(encoded[start : start + self.batch_size])
            rows.append(self._read(tuner, prompt, ids, mask))
            tokens += int(ids.numel()) + (prompt.num_tokens * len(ids) if prompt is not None else 0)
        return torch.cat(rows), tokens

    def _check_prompts(self, student_prompt: SoftPrompt, init: SoftPrompt, encoded: Sequence[Sequence[int]]) -> None:
        """One line for a prompt whose width is not its model's hidden size or that does not fit its context."""
        longest = max(len(s) for s in encoded)
        for name, tuner, prompt in (("student", self.student, student_prompt), ("large model", self.large, init)):
            hidden = tuner.model.get_input_embeddings().embedding_dim
            if prompt.weight.shape[1] != hidden:
                raise ConfigError(f"the {name}'s prompt has width {prompt.weight.shape[1]} but the {name} has hidden "
                                  f"size {hidden}: transfer needs a student distilled from the large model")
            check_prompt_fits(prompt.num_tokens, longest, context_length(tuner.model),
                              remedy="use a prompt with fewer tokens or shorter public inputs")

    def run(self, student_prompt: SoftPrompt, public: Sequence[Example], alpha: float, init: SoftPrompt,
            seed: int = 0) -> TransferResult:
        """``steps`` Adam steps on ``init`` (updated in place) over the public examples, cycled in seeded order."""
        if not public:
            raise DataError("the public transfer set is empty; set transfer.public_size >= 1")
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"transfer.alpha must be in [0, 1], got {alpha}")
        start = time.perf_counter()
        encoded = self.large.encode(public)
        self._check_prompts(student_prompt, init, encoded)
        student_prompt.to(self.student.device).eval()
        temp = self.temperature
        s_prompted, s_tokens = self._fixed_logits(self.student, encoded, student_prompt)
        s_plain, s_plain_tokens = self._fixed_logits(self.student, encoded, None)
        target_kd = torch.softmax(s_prompted / temp, -1)
        target_diff = torch.softmax((s_prompted - s_plain) / temp, -1)
        del s_prompted, s_plain  # in vocab mode each is public_size x V floats: keep only the two targets
        t_plain, t_tokens = self._fixed_logits(self.large, encoded, None)
        precompute = time.perf_counter() - start

        prompt = init.to(self.large.device).train()
        optimizer = torch.optim.Adam(prompt.parameters(), lr=self.lr)
        generator = torch.Generator().manual_seed(seed)
        result = TransferResult(prompt=prompt, alpha=alpha, steps=self.steps, seconds=0.0,
                                precompute_seconds=precompute, tokens=0, logits=self.logits,
                                fixed_tokens={"student": s_tokens + s_plain_tokens, "large": t_tokens})
        order: list[int] = []
        size = min(self.batch_size, len(encoded))
        for _ in range(self.steps):
            if len(order) < size:
                order += torch.randperm(len(encoded), generator=generator).tolist()
            idx, order = order[:size], order[size:]
            ids, mask = self.large.pad([encoded[i] for i in idx])
            prompted = self._read(self.large, prompt, ids, mask)
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
