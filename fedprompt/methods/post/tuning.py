"""Soft-prompt tuning on a frozen causal LM, with or without DP-SGD: the local tuner of POST's clients.

The loss of one example is the cross-entropy of its label over the task's label words (their first
tokens), read from the logits at the answer position (the position ``score_label_words`` scores), with the soft prompt prepended
to the formatted example. Per-example losses are averaged over the batch; with DP, Opacus turns that
into per-example gradients, clipping and noise (:mod:`fedprompt.privacy.dp`).

Batches: without DP, shuffled passes over the examples (batches of ``batch_size``); with DP, Poisson
batches with rate ``batch_size / N`` (what the accountant assumes), empty ones included. The model is any
frozen causal LM: POST tunes on the distilled student, direct tuning and FedPrompt on the large model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from fedprompt.data.task import Example, TaskSpec
from fedprompt.errors import ConfigError, DataError
from fedprompt.methods.post.config import OPTIMIZERS, TrainConfig  # noqa: F401 (declared in config)
from fedprompt.models.scoring import encode_label_words, prompted_logits
from fedprompt.models.soft_prompt import SoftPrompt


@dataclass
class TrainResult:
    """One call of :meth:`SoftPromptTuner.train`; ``epsilon`` and ``history`` only with DP."""

    prompt: SoftPrompt
    steps: int
    examples_seen: int
    tokens: int  # token positions run forward and backward (prompt and padding included)
    seconds: float
    losses: list[float] = field(default_factory=list)  # mean loss of each non-empty batch
    empty_batches: int = 0
    epsilon: float | None = None
    delta: float | None = None
    noise_multiplier: float | None = None
    history: list = field(default_factory=list)

    @property
    def mean_loss(self) -> float:
        return float(sum(self.losses) / len(self.losses)) if self.losses else float("nan")


def label_token_ids(tokenizer, label_words: Sequence[str]) -> list[int]:
    """The first token id of every label word (the logit the tuner reads); they must be distinct.

    For single-token label words (all of SmolLM2's task verbalizers) this is exactly what
    ``score_label_words`` scores; a multi-token word is represented by its first token.
    """
    firsts = [t[0] for t in encode_label_words(tokenizer, label_words)]
    if len(set(firsts)) != len(firsts):
        raise ConfigError(f"soft-prompt tuning reads each label word's first token, but label words "
                          f"{list(label_words)} share first tokens {firsts} with this tokenizer; choose label words "
                          "that start differently (task.label_words)")
    return firsts


def context_length(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def check_prompt_fits(num_tokens: int, longest_input: int, context: int | None,
                      remedy: str = "use fewer prompt tokens (method.prompt.num_tokens) or shorter inputs") -> None:
    """A ConfigError when the prompt plus the longest input exceed the model's context."""
    if context is not None and num_tokens + longest_input > context:
        raise ConfigError(f"a soft prompt of {num_tokens} tokens plus the longest input ({longest_input} tokens) "
                          f"exceeds the model's context of {context} positions; {remedy}")


class SoftPromptTuner:
    """Trains :class:`SoftPrompt` s for ``spec`` on the frozen ``model`` (any causal LM, any device)."""

    def __init__(self, model, tokenizer, spec: TaskSpec, train: TrainConfig) -> None:
        self.model, self.tokenizer, self.spec, self.config = model, tokenizer, spec, train
        self.label_ids = label_token_ids(tokenizer, spec.label_words)
        self.device = next(model.parameters()).device

    def encode(self, examples: Sequence[Example]) -> list[list[int]]:
        return self.tokenizer([self.spec.format(e) for e in examples], add_special_tokens=True)["input_ids"]

    def pad(self, seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.tokenizer.pad({"input_ids": list(seqs)}, padding=True, padding_side="left", return_tensors="pt")
        return batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)

    def answer_logits(self, prompt_module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``(B, V)`` float32 next-token logits over the whole vocabulary at the answer position (autograd on).

        The answer position is the last input position of the left-padded batch (the formatted example ends
        with the answer prefix), with ``prompt_module`` (a :class:`SoftPrompt`, a wrapper of one, or None)
        prepended. The LM head runs at that one position only (``keep_last=1``). POST's transfer reads all V
        logits (``transfer.logits=vocab``); :meth:`label_logits` reads the label words' columns of it.
        """
        logits = prompted_logits(self.model, input_ids, attention_mask, prompt_module, keep_last=1)[:, -1]
        return logits.float()

    def label_logits(self, prompt_module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``(B, C)`` float32 logits of the label words at the answer position (autograd on): the label
        words' columns of :meth:`answer_logits`."""
        return self.answer_logits(prompt_module, input_ids, attention_mask)[:, self.label_ids]

    def train(self, prompt: SoftPrompt, examples: Sequence[Example], steps: int | None = None, *, seed: int = 0,
              plan=None, history=None) -> TrainResult:
        """``steps`` (default ``local_steps``) optimizer steps on ``examples``; ``prompt`` is updated in place.

        ``plan`` (a :class:`~fedprompt.privacy.dp.DPPlan`) turns on DP-SGD; ``history`` is the accountant's
        history from earlier calls (rounds), so the returned epsilon is cumulative. ``seed`` fixes the batches
        (and the DP noise), except under a secure plan (``noise_seed=secure``): then they come from os.urandom.
        """
        if not examples:
            raise DataError("this client has no training examples; every client needs at least one "
                            "(check the partition: partition.min_size, partition.k_shot, federation.num_clients)")
        steps = self.config.local_steps if steps is None else int(steps)
        encoded = self.encode(examples)
        check_prompt_fits(prompt.num_tokens, max(len(s) for s in encoded), context_length(self.model))
        labels = torch.tensor([e.label for e in examples], device=self.device)
        prompt.to(self.device).train()
        generator = torch.Generator().manual_seed(int(seed))
        optimizer = self.optimizer(prompt.parameters())
        dp = None
        if plan is not None:
            from fedprompt.privacy.dp import DPSoftPromptSGD

            dp = DPSoftPromptSGD(prompt, optimizer, plan, history, generator)
        module = dp.module if dp else prompt
        batches = dp.batches(len(examples), steps) if dp else self._shuffled(len(examples), steps, generator)
        result = TrainResult(prompt=prompt, steps=steps, examples_seen=0, tokens=0, seconds=0.0)
        start = time.perf_counter()
        try:
            for idx in batches:
                if not idx:  # an empty Poisson batch: a noise-only step, still accounted
                    assert dp is not None  # only DP's Poisson batches can be empty
                    dp.step_empty()
                    result.empty_batches += 1
                    continue
                ids, mask = self.pad([encoded[i] for i in idx])
                loss = torch.nn.functional.cross_entropy(self.label_logits(module, ids, mask), labels[idx])
                loss.backward()
                if dp:
                    dp.step()
                else:
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                result.losses.append(float(loss.detach()))
                result.examples_seen += len(idx)
                result.tokens += int(ids.numel()) + prompt.num_tokens * len(idx)
        finally:
            if dp:
                result.epsilon, result.history = dp.epsilon(), dp.history()
                result.delta, result.noise_multiplier = plan.delta, plan.noise_multiplier
                dp.close()
        prompt.eval()
        result.seconds = time.perf_counter() - start
        return result

    def optimizer(self, params) -> torch.optim.Optimizer:
        if self.config.optimizer == "adam":
            return torch.optim.Adam(params, lr=self.config.lr)
        return torch.optim.SGD(params, lr=self.config.lr, momentum=self.config.momentum)

    def _shuffled(self, n: int, steps: int, generator: torch.Generator) -> Iterator[list[int]]:
        size = min(self.config.batch_size, n)
        order: list[int] = []
        for _ in range(steps):
            if len(order) < size:
                order += torch.randperm(n, generator=generator).tolist()
            yield order[:size]
            del order[:size]


def planned_steps(rounds: int, local_steps: int) -> int:
    """Steps a client takes when it trains in every round (its DP noise is planned for these)."""
    return int(rounds) * int(local_steps)

