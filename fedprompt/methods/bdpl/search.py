"""One client's BDPL: local policy-gradient steps against a black-box LM, from the global logits.

Each step (Diao et al., "Black-box Prompt Learning", TMLR 2023):

1. draw a batch of ``batch_size`` of the client's examples (without replacement within the step);
2. sample I = ``samples_per_step`` prompts from the policy (one candidate token per slot);
3. query the black box once per (sampled prompt, batch example): the query text is
   ``spec.format(example, prompt_text)``, the prompt text the sampled tokens joined by spaces;
4. loss_i = mean over the batch of the cross-entropy of the gold label under the black box's label
   log-probs, renormalised over the task's labels (log-softmax over the C candidates);
5. update the logits with the variance-reduced policy gradient (``policy.variance_reduced_gradient``)
   through Adam or SGD.

Every sampled prompt is scored on the same batch, so the mean-loss baseline compares prompts, not
batches. The client's examples, labels and losses never leave this object; the result carries the
logits and numbers. The final prompt of a policy is the argmax of each slot.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from fedprompt.blackbox.base import BlackBoxLM, Usage
from fedprompt.methods.bdpl.config import BDPLConfig
from fedprompt.methods.bdpl.policy import SGD, Adam, argmax_prompt, entropy, sample, variance_reduced_gradient


def candidate_vocab(tokenizer, config: BDPLConfig) -> list[str]:
    """The V candidate tokens of every slot: the tokenizer's ``candidates`` most frequent whole words.

    The whole-word vocabulary FedDTPT's proposers use too (fedprompt.models.vocab: word-start tokens of letters
    only, in id order: BPE merge order, roughly frequency), so every sampled prompt is plain text any service
    reads back as the same words. A small tokenizer may have fewer than ``candidates`` such words: V is then
    what it has.
    """
    # lazy: fedprompt.models imports torch, which choosing prompts here never needs
    from fedprompt.models.vocab import whole_word_vocab

    return whole_word_vocab(tokenizer, config.min_word_len, config.candidates)[0]


def prompt_text(vocab: Sequence[str], prompt: np.ndarray) -> str:
    """A sampled prompt (token indices) as the text that goes into the query."""
    return " ".join(vocab[int(i)] for i in prompt)


def label_losses(logprobs: np.ndarray, gold: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the cross-entropy of the gold label over the C candidates, and whether it is the argmax."""
    z = np.asarray(logprobs, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    log_softmax = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    rows = np.arange(len(gold))
    return -log_softmax[rows, gold], (z.argmax(axis=1) == gold)


@dataclass
class BDPLResult:
    logits: np.ndarray  # (L, V) float32: the client's updated policy
    prompt: list[str]  # its argmax prompt
    steps: int
    queries: int  # examples scored by the black box (I x batch per step)
    mean_loss: float | None  # mean of the sampled prompts' losses over all steps (None: no step)
    sample_accuracy: float | None  # accuracy of the sampled prompts' predictions over all steps
    entropy: float  # mean per-slot entropy of the returned policy
    usage: Usage = field(default_factory=Usage)
    seconds: float = 0.0
    optimizer: Adam | SGD | None = None  # its state after the steps (optimizer_state=keep)


class BDPLClient:
    """BDPL's local search: ``run`` = one client's local steps in one round."""

    def __init__(self, config: BDPLConfig, vocab: Sequence[str]) -> None:
        if len(vocab) < 2:
            raise ValueError(f"BDPL needs at least 2 candidate tokens per slot, got {len(vocab)}")
        self.config, self.vocab = config, list(vocab)

    @property
    def shape(self) -> tuple[int, int]:
        return self.config.prompt_length, len(self.vocab)

    def initial_logits(self) -> np.ndarray:
        """Round 0: uniform over the candidates in every slot (BDPL starts from a uniform policy)."""
        return np.zeros(self.shape, dtype=np.float32)

    def planned_steps(self, batch: int) -> int:
        """``local_steps``, fewer when ``query_budget`` cannot pay for them all (a step costs I x batch)."""
        steps = self.config.local_steps
        if self.config.query_budget is not None:
            steps = min(steps, self.config.query_budget // (self.config.samples_per_step * batch))
        return steps

    def make_optimizer(self) -> Adam | SGD:
        return Adam(self.config.lr) if self.config.optimizer == "adam" else SGD(self.config.lr)

    def run(self, blackbox: BlackBoxLM, spec, logits: np.ndarray, examples: Sequence, seed: int,
            optimizer: Adam | SGD | None = None) -> BDPLResult:
        """Local steps from ``logits`` on ``examples``; ``optimizer`` continues a kept state (else a fresh one)."""
        logits = np.asarray(logits, dtype=np.float64)
        if logits.shape != self.shape:
            raise ValueError(f"logits of shape {logits.shape}, expected (prompt_length, candidates) = {self.shape}")
        if not np.isfinite(logits).all():
            raise ValueError("the logits are not all finite")
        if not examples:
            raise ValueError("a BDPL client needs at least one training example")
        start = time.perf_counter()
        rng = np.random.default_rng(seed)
        optimizer = optimizer if optimizer is not None else self.make_optimizer()
        labels = list(spec.label_words)
        batch_size = min(self.config.batch_size, len(examples))
        usage, queries, losses, correct = Usage(), 0, [], []
        steps = self.planned_steps(batch_size)
        for _ in range(steps):
            batch = [examples[i] for i in rng.choice(len(examples), size=batch_size, replace=False)]
            gold = np.array([e.label for e in batch], dtype=np.int64)
            prompts = sample(logits, self.config.samples_per_step, rng)
            texts = [spec.format(e, prompt_text(self.vocab, p)) for p in prompts for e in batch]
            result = blackbox.classify(texts, labels)  # one call: I prompts x batch examples
            if result.logprobs is None:
                raise ValueError("BDPL needs the black box's label log-probs; this service answered labels only")
            usage.add(result.usage)
            queries += len(texts)
            logprobs = np.asarray(result.logprobs).reshape(len(texts), -1)
            row_loss, row_correct = label_losses(logprobs, np.tile(gold, len(prompts)))  # rows: prompt-major
            step_losses = row_loss.reshape(len(prompts), batch_size).mean(axis=1)
            losses.append(step_losses)
            correct.append(row_correct)
            logits = optimizer.step(logits, variance_reduced_gradient(logits, prompts, step_losses))
        final = logits.astype(np.float32)
        return BDPLResult(
            logits=final, prompt=[self.vocab[int(i)] for i in argmax_prompt(final)], steps=steps, queries=queries,
            mean_loss=float(np.mean(np.concatenate(losses))) if losses else None,
            sample_accuracy=float(np.mean(np.concatenate(correct))) if correct else None,
            entropy=entropy(final), usage=usage, seconds=time.perf_counter() - start, optimizer=optimizer,
        )
